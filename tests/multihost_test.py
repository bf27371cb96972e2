"""Multi-host: two processes of two CPU devices each reproduce one process of four devices.

Each run is `python -m umm_jax.main` on `configs/test.py` (one epoch of pre-training, 4 steps).
The two processes join on a free loopback port, one told by `--coordinator_address`,
`--num_processes` and `--process_id`, the other by the environment launch/slurm.sh gives it,
and share one work dir, the way hosts of a pod share a bucket. Their final checkpoint must hold
the parameters of the single process's, and only process 0 writes files other than checkpoints.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from umm_jax import checkpoint, parallel, pretrain

ROOT = pathlib.Path(__file__).resolve().parents[1]
_ARGS = ("--config=configs/test.py", "--config.train.epochs=1", "--config.stages=('pretrain',)")
_TIMEOUT_S = 300
_CLUSTER_VARIABLES = ("SLURM_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", parallel.DISTRIBUTED_ENV)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(log: pathlib.Path, devices: int, workdir: pathlib.Path, *flags: str, **env: str):
  # Not a cluster's own variables, should the tests run inside a SLURM job.
  inherited = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARIABLES)}
  env = {
    **inherited,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    **env,
  }
  command = [sys.executable, "-m", "umm_jax.main", *_ARGS, f"--workdir={workdir}", *flags]
  with log.open("w") as out:  # a file, not a pipe: a full pipe would block the process
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, pathlib.Path]) -> None:
  """Waits for every process to exit 0; on a failure or the timeout kills the rest and says why."""
  deadline = time.monotonic() + _TIMEOUT_S
  while any(p.poll() is None for p in procs.values()):
    failed = any(p.poll() not in (None, 0) for p in procs.values())
    if failed or time.monotonic() > deadline:
      break
    time.sleep(0.5)
  for p in procs.values():
    if p.poll() is None:
      p.kill()
      p.wait()
  if any(p.returncode for p in procs.values()):
    tails = [
      f"--- {name} (exit {procs[name].returncode}):\n{logs[name].read_text()[-3000:]}"
      for name in procs
    ]
    raise AssertionError("a run failed or timed out:\n" + "\n".join(tails))


def _steps(metrics: pathlib.Path) -> list[int]:
  return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
  shared, single = tmp_path / "shared", tmp_path / "single"
  address = f"127.0.0.1:{_free_port()}"
  logs = {name: tmp_path / f"{name}.log" for name in ("process0", "process1", "single")}
  procs = {"single": _start(logs["single"], 4, single)}
  # Process 0 from flags, listening on loopback only (JAX's default bind address: all).
  flags = (f"--coordinator_address={address}", "--num_processes=2", "--process_id=0")
  procs["process0"] = _start(
    logs["process0"], 2, shared, *flags, JAX_COORDINATOR_BIND_ADDRESS=address
  )
  # Process 1 as launch/slurm.sh starts it: UMM_DISTRIBUTED=1, the rest from srun's variables.
  slurm = dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2")
  slurm.update(SLURM_PROCID="1", SLURM_LOCALID="0")
  procs["process1"] = _start(
    logs["process1"], 2, shared, UMM_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=address, **slurm
  )
  _wait_all(procs, logs)

  assert "process 1 of 2; 2 local of 4 global devices (cpu)" in logs["process1"].read_text()
  written = {p.name for p in shared.iterdir()}
  assert written == {p.name for p in single.iterdir()}
  assert {"config.json", pretrain.METRICS_FILE, pretrain.CHECKPOINT_DIR} <= written
  # One writer: the metrics records and the TensorBoard event files are not doubled.
  steps = [_steps(d / pretrain.METRICS_FILE) for d in (shared, single)]
  assert steps[0] == steps[1] == [2, 4, 4]  # two train records, then the test record
  assert len(list((shared / pretrain.TENSORBOARD_DIR).iterdir())) == 1
  want = checkpoint.load_state_dict(single / pretrain.CHECKPOINT_DIR, 4)
  got = checkpoint.load_state_dict(shared / pretrain.CHECKPOINT_DIR, 4)
  flat_want, flat_got = jax.tree.leaves_with_path(want), jax.tree.leaves_with_path(got)
  assert [k for k, _ in flat_got] == [k for k, _ in flat_want] and len(flat_want) > 10
  for (path, a), (_, b) in zip(flat_got, flat_want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_one_process_without_flags_or_environment():
  assert not parallel.initialize_distributed(environ={})
  assert not parallel.initialize_distributed(environ={parallel.DISTRIBUTED_ENV: "0"})
