"""Entry point: `python -m umm_jax.main --config=configs/<x>.py --workdir=<dir>`.

Runs the stages named in `config.stages`, in order, in the work dir. Everything here is a thin
layer over library functions that tests and notebooks call too (`validate`, `run`).

Multi-host: every process runs this same command. With `UMM_DISTRIBUTED=1` in the environment
(launch/slurm.sh, launch/tpu_pod.sh) JAX finds the coordinator, the process count and this
process's id itself; `--coordinator_address`, `--num_processes` and `--process_id` give them
explicitly (anywhere else) or override what JAX would find. The work dir must be one that every
process sees; only process 0 writes to it, except for checkpoints, which every process writes.

The work dir is a local path or a URI that `etils.epath` reads and writes, such as the
`gs://bucket/run` launch/tpu_pod.sh requires: every stage receives it as an `epath.Path`, which
keeps the scheme (`pathlib.Path` would turn `gs://b/run` into the local `gs:/b/run`). Without
TensorFlow, epath reaches `gs://` through fsspec's `gcsfs`; orbax's checkpoints there also need
`google-cloud-storage` (a dependency of gcsfs), and TensorStore writes their arrays through its
own GCS driver.
"""

import json
import logging as std_logging
import os
from collections.abc import Callable

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from umm_jax import (
  crr,
  data,
  evaluate,
  export,
  methods,
  monitor,
  optim,
  parallel,
  pretrain,
  report,
  umm,
  umm_stage,
)
from umm_jax.models import resnet

STAGES: dict[str, Callable[[ml_collections.ConfigDict, epath.Path], None]] = {
  "pretrain": pretrain.run_stage,
  "monitor": monitor.run_stage,
  "umm": umm_stage.run_stage,
  "evaluate": evaluate.run_stage,
  "report": report.run_stage,
  "export": export.run_stage,
}
DTYPES = ("float32", "bfloat16")
# The evaluate stage's protocols (umm_jax.evaluate.PROTOCOLS).
EVALUATE_PROTOCOLS = ("knn_k5", "knn_k200_t0.1", "linear", "semi_1pct", "semi_10pct")
_POSITIVE_TRAIN_KEYS = (
  "epochs",
  "batch_size",
  "log_every_steps",
  "eval_every_epochs",
  "eval_batch_size",
  "checkpoint_every_epochs",
)

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory (or gs:// URI) for checkpoints, metrics and reports."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "Multi-host: host:port of process 0 (default: JAX's detection)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Multi-host: the number of processes (default: JAX's detection)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "Multi-host: this process's id in [0, num_processes) (default: detected)."
)


def _check(name: str, value, valid) -> None:
  if value not in valid:
    raise ValueError(f"Unknown {name} {value!r}; valid {name}s: {sorted(valid)}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the bad value and the valid ones, before any stage starts."""
  if not config.stages:
    raise ValueError(f"config.stages is empty; choose from {sorted(STAGES)}")
  for stage in config.stages:
    _check("stage", stage, STAGES)
  data.check_source(config.data.name)
  methods.get(config.method.name)
  model = resnet.create(config.model.name, stem=config.model.stem, width=config.model.width)
  _check("dtype", config.model.dtype, DTYPES)
  resnet.split(model, config.umm.split)
  variants = tuple(config.umm.variants)
  if not variants or len(set(variants)) != len(variants):
    raise ValueError(
      f"config.umm.variants must name distinct variants, got {variants}; valid: {umm.VARIANTS}"
    )
  for variant in variants:  # names and ranges of the UMM hyper-parameters
    umm.Settings.from_config(config.umm, variant)
  if config.umm.optimizer:
    _check("UMM optimizer", config.umm.optimizer, optim.OPTIMIZERS)
  _check("UMM schedule", config.umm.schedule, optim.SCHEDULES)
  for key in ("epochs", "checkpoint_every_epochs"):
    if config.umm[key] < 1:
      raise ValueError(f"config.umm.{key} must be a positive integer, got {config.umm[key]}")
  for layer in config.monitor.layers:
    _check("monitor layer", layer, resnet.STAGES)
  _check("membership", config.monitor.membership, crr.MEMBERSHIPS)
  for layer in config.evaluate.layers:
    _check("evaluate layer", layer, evaluate.FEATURE_LAYERS)
  for name in config.evaluate.protocols:
    _check("evaluate protocol", name, EVALUATE_PROTOCOLS)
  if config.optim.name:
    _check("optimizer", config.optim.name, optim.OPTIMIZERS)
  _check("schedule", config.optim.schedule, optim.SCHEDULES)
  for key in _POSITIVE_TRAIN_KEYS:
    if config.train[key] < 1:
      raise ValueError(f"config.train.{key} must be a positive integer, got {config.train[key]}")
  if config.train.max_to_keep < 0:
    raise ValueError(
      f"config.train.max_to_keep must be >= 0 (0 keeps all), got {config.train.max_to_keep}"
    )


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Validates `config`, records it in `workdir` (a path or a URI), then runs its stages."""
  validate(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
  for stage in config.stages:
    logging.info("stage %s", stage)
    STAGES[stage](config, workdir)


def quiet_orbax(record) -> bool:
  """orbax logs every checkpoint operation at INFO; the console keeps its warnings only."""
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(quiet_orbax)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  parallel.initialize_distributed(
    coordinator_address=_COORDINATOR.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
  )
  parallel.log_topology()
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
