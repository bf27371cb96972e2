"""The device mesh, shardings, and assembling per-process host batches into global arrays.

Data parallelism the modern way: one `Mesh` over every device of every process with a single
axis `data`; the batch is sharded on that axis and the training state is replicated. Functions
jitted over such arrays see the global batch, so BatchNorm statistics, similarity matrices and
ΔR's Gram matrices cover it with no hand-written collectives. The same code runs on one CPU,
eight GPUs or a TPU pod slice.

Multi-host: every process runs the same program; `initialize_distributed` joins them into one
JAX runtime before anything touches a device, after which `jax.devices()` lists the devices of
every process and the mesh spans them all.
"""

import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# Set to 1 by launch/slurm.sh and launch/tpu_pod.sh: this process is one of several.
DISTRIBUTED_ENV = "UMM_DISTRIBUTED"


def initialize_distributed(
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  environ: Mapping[str, str] = os.environ,
) -> bool:
  """Joins the processes of a multi-host run; returns whether it did (False: a single process).

  Must run before anything touches a device. It calls `jax.distributed.initialize` when any
  argument is given (those given override JAX's cluster detection), or when `environ` has
  `UMM_DISTRIBUTED=1`; JAX then reads the rest itself: `JAX_COORDINATOR_ADDRESS`,
  `JAX_LOCAL_DEVICE_IDS`, SLURM's task variables, or a TPU VM's metadata. Otherwise it does
  nothing, and the run is one process over its local devices.
  """
  explicit = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  explicit = {k: v for k, v in explicit.items() if v is not None}
  if not explicit and environ.get(DISTRIBUTED_ENV) != "1":
    return False
  # Cross-process collectives of the CPU backend (GPUs and TPUs have their own): jax < 0.5.1
  # has none unless asked, so a CPU-only run would fail at its first all-reduce. A choice made
  # (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) is kept.
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**explicit)
  return True


def log_topology() -> None:
  """One line: this process among all, and its devices among all."""
  logging.info(
    "process %d of %d; %d local of %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh (`data`) over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the `data` axis, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (the training state)."""
  return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices and over processes."""
  devices, processes = mesh.devices.size, jax.process_count()
  if global_batch % devices or global_batch % processes:
    raise ValueError(
      f"global batch {global_batch} must be divisible by the number of devices ({devices}) "
      f"and of processes ({processes})"
    )


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's rows `[global_batch / process_count, ...]` as one batch-sharded array.

  Every process calls it with its own slice; the result is the global `[global_batch, ...]`
  array, each device holding its rows. With one process it is a sharded `device_put`.
  """
  return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local))


def fetch(array: jax.Array) -> np.ndarray:
  """The whole of `array` as NumPy on every process, also when it is sharded across processes.

  `np.asarray` refuses an array with shards on other processes' devices (a batch-sharded output
  of a multi-host run); this gathers them first. With one process it is `np.asarray`.
  """
  return multihost_utils.process_allgather(array, tiled=True)


def replicate(tree, mesh: Mesh):
  """`tree` placed on every device of `mesh` (the same values on each process)."""
  return jax.device_put(tree, replicated(mesh))
