"""Orbax checkpoints of the training state in the work dir: save, restore, resume.

Each checkpoint is a step directory `<directory>/<step>/` holding two items: `state`, the state
pytree (orbax's standard pytree format, one OCDBT/TensorStore store), and `metadata`, a JSON
dict (epoch, metrics summary, config name, ...). Every checkpoint is kept unless `max_to_keep`
says otherwise, since the layer-wise monitor reads all of them.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>/` and renames it to
`<step>/` only once every file is written (on GCS, where rename is not atomic, a
`commit_success.txt` file marks completion). `save` returns only once that is done, so a run
interrupted mid-save leaves at most a temporary directory, which `all_steps`, `latest_step` and
`restore` ignore.

Multi-host: every process constructs the `Checkpointer` and calls `save`/`restore` with the same
arguments. Orbax coordinates the processes itself: each writes the shards of the arrays it
holds, and only the primary process (process 0) writes the JSON metadata and finalises the step
directory. `restore` with a target of sharded `jax.Array`s reads on each process just the shards
that process needs.

Example:
  with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
    if (step := ckpt.latest_step()) is not None:
      state = ckpt.restore(step, state)
      epoch = ckpt.metadata(step)["epoch"]
    ...
    ckpt.save(int(state.step), state, metadata={"epoch": epoch, "loss": loss})

  raw = checkpoint.load_state_dict(workdir / "checkpoints", step)  # numpy, no target needed
"""

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_STATE = "state"
_METADATA = "metadata"


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Handlers for the two items, so that a fresh manager can read what an earlier run wrote."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state_handler = ocp.StandardCheckpointHandler()
  registry.add(_STATE, ocp.args.StandardSave, state_handler)
  registry.add(_STATE, ocp.args.StandardRestore, state_handler)
  # Restoring without a target, as numpy arrays, needs per-leaf `RestoreArgs(restore_type=...)`,
  # which only the underlying pytree handler accepts; it reads the same on-disk format.
  registry.add(_STATE, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
  json_handler = ocp.JsonCheckpointHandler()
  registry.add(_METADATA, ocp.args.JsonSave, json_handler)
  registry.add(_METADATA, ocp.args.JsonRestore, json_handler)
  return registry


def _json_scalar(value: Any) -> Any:
  """`json.dumps` hook: NumPy and JAX scalars (metrics pulled off the device) as Python numbers."""
  if isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) == 0:
    return np.asarray(value).item()
  raise TypeError(f"{type(value).__name__} {getattr(value, 'shape', '')} is not JSON-serialisable")


def _as_json(metadata: dict) -> dict:
  if not isinstance(metadata, dict):
    raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}.")
  try:
    return json.loads(json.dumps(metadata, default=_json_scalar))
  except (TypeError, ValueError) as e:
    raise ValueError(f"metadata must be JSON-serialisable (scalars, not arrays): {e}") from e


def _is_int(value: Any) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _abstract_leaf(leaf: Any) -> Any:
  """A `jax.Array` as a `ShapeDtypeStruct` carrying its sharding; other leaves unchanged."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


def _numpy_restore_args(leaf_metadata: Any) -> ocp.RestoreArgs:
  if isinstance(leaf_metadata, ocp.metadata.ArrayMetadata):
    return ocp.RestoreArgs(restore_type=np.ndarray)
  return ocp.RestoreArgs()


class Checkpointer:
  """Saves and restores the training state and a JSON metadata dict per step.

  A thin layer over `orbax.checkpoint.CheckpointManager` that always waits for a save to be
  committed, keeps every checkpoint by default, and raises `ValueError`s that name the
  directory and the steps it holds. Use it as a context manager, or call `close()`.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = None,
    read_only: bool = False,
  ):
    """Opens (and, unless `read_only`, creates) the checkpoint directory.

    Args:
      directory: the checkpoint directory; earlier checkpoints in it are found (resume). A
        local path (made absolute: orbax refuses relative ones) or a URI such as `gs://b/run`,
        given to orbax unchanged. On `gs://`, orbax lists and commits steps through
        `etils.epath` (gcsfs, or TensorFlow), asks `google-cloud-storage` for the bucket's
        layout, and TensorStore writes the arrays through its own GCS driver.
      max_to_keep: keep only this many newest checkpoints; `None` keeps all of them.
      read_only: for readers (notebooks, the monitor): never creates the directory and
        refuses to save.
    """
    if max_to_keep is not None and not (_is_int(max_to_keep) and max_to_keep >= 1):
      raise ValueError(f"max_to_keep must be None or a positive int, got {max_to_keep!r}.")
    directory = os.fspath(directory)
    self._directory = directory if "://" in directory else os.path.abspath(directory)
    self._read_only = read_only
    options = ocp.CheckpointManagerOptions(
      # The caller decides the cadence; orbax's save-decision policy must not skip a step.
      save_interval_steps=1,
      preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
      create=not read_only,
      # `save` waits anyway, so a synchronous checkpointer spares the background thread.
      enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(
      self._directory, options=options, handler_registry=_handler_registry()
    )

  @property
  def directory(self) -> str:
    return self._directory

  def all_steps(self) -> list[int]:
    """The committed steps in the directory, ascending (re-read from disk on every call)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or `None` when the directory holds no checkpoint."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _check_step(self, step: int) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise ValueError(
        f"No checkpoint for step {step} in {self._directory}; available steps: {steps}."
      )

  def save(self, step: int, state: PyTree, *, metadata: dict) -> None:
    """Writes `state` and `metadata` as step `step` and waits until the step is committed.

    Args:
      step: a non-negative int, larger than every step already saved.
      state: a pytree of `jax.Array`/NumPy leaves (e.g. `TrainState`); `None` leaves and
        empty containers are kept.
      metadata: a JSON-serialisable dict; NumPy/JAX scalars are stored as Python numbers.

    Raises:
      ValueError: a read-only checkpointer, a bad step, or metadata that is not JSON.
    """
    if self._read_only:
      raise ValueError(f"Checkpointer on {self._directory} is read-only; cannot save.")
    if not (_is_int(step) and step >= 0):
      raise ValueError(f"step must be a non-negative int, got {step!r}.")
    step = int(step)
    latest = self.latest_step()
    if latest is not None and step <= latest:
      # Orbax would silently skip such a save; say so instead.
      raise ValueError(
        f"Cannot save step {step} in {self._directory}: the latest checkpoint is step {latest}, "
        "and steps must increase."
      )
    args = ocp.args.Composite(
      **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(_as_json(metadata))}
    )
    self._manager.save(step, args=args, force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, target: PyTree) -> PyTree:
    """Step `step` with the tree structure, dtypes and shardings of `target`.

    Args:
      step: a saved step.
      target: a state of the same structure, e.g. from `train.init_state` (its values are not
        read), or its abstract form (`jax.ShapeDtypeStruct`s with `sharding`, as from
        `jax.eval_shape`). `jax.Array` leaves are restored onto their sharding, NumPy leaves as
        NumPy; custom pytree nodes (`TrainState`, optax's namedtuples) are rebuilt.

    Raises:
      ValueError: the step does not exist, or `target` does not match the saved tree.
    """
    self._check_step(step)
    abstract = jax.tree.map(_abstract_leaf, target)
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
    try:
      restored = self._manager.restore(step, args=args)
    except (KeyError, ValueError) as e:
      raise ValueError(
        f"Cannot restore checkpoint step {step} of {self._directory} into the given target "
        f"(a different tree structure, shape or sharding?): {e}"
      ) from e
    return restored[_STATE]

  def restore_raw(self, step: int) -> dict:
    """Step `step` without a target: nested dicts (tuples as lists) of NumPy arrays.

    Custom nodes become dicts keyed by field name (`TrainState` fields, optax namedtuple
    fields); empty optax states become `None`.
    """
    self._check_step(step)
    tree = self._manager.metadata(step).item_metadata[_STATE].tree
    restore_args = jax.tree.map(_numpy_restore_args, tree)
    args = ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(restore_args=restore_args)})
    return self._manager.restore(step, args=args)[_STATE]

  def metadata(self, step: int) -> dict:
    """The JSON metadata dict saved with step `step`."""
    self._check_step(step)
    args = ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
    return self._manager.restore(step, args=args)[_METADATA]

  def close(self) -> None:
    """Waits for pending operations and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def load_state_dict(directory: str | os.PathLike, step: int | None = None) -> dict:
  """Step `step` (default: the latest) of `directory` as nested dicts of NumPy arrays.

  For notebooks and the monitor: needs no model, no target and no devices matching the ones
  that saved it.

  Raises:
    ValueError: the directory holds no checkpoint, or not step `step`.
  """
  with Checkpointer(directory, read_only=True) as ckpt:
    if step is None:
      step = ckpt.latest_step()
      if step is None:
        raise ValueError(f"No checkpoints in {os.fspath(directory)}.")
    return ckpt.restore_raw(step)
