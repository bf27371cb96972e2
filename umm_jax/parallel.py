"""The device mesh, shardings, and assembling per-process host batches into global arrays.

Data parallelism the modern way: one `Mesh` over every device of every process with a single
axis `data`; the batch is sharded on that axis and the training state is replicated. Functions
jitted over such arrays see the global batch, so BatchNorm statistics, similarity matrices and
ΔR's Gram matrices cover it with no hand-written collectives. The same code runs on one CPU,
eight GPUs or a TPU pod slice.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


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


def replicate(tree, mesh: Mesh):
  """`tree` placed on every device of `mesh` (the same values on each process)."""
  return jax.device_put(tree, replicated(mesh))
