"""Tests for umm_jax.checkpoint: save/restore round trips checked leaf by leaf against NumPy copies.

The state has the kinds of leaves and nodes `train.TrainState` has, in a flax struct of its own
(so these tests do not follow the training state's fields as they change): flax Dense +
BatchNorm variables, an optax state with namedtuples, an empty state and an int32 count, a
queue in `method_state`, and the target network either present or `None`.
"""

import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from umm_jax import checkpoint


class _State(flax.struct.PyTreeNode):
  step: jax.Array
  online: dict
  target: dict | None
  method_state: dict
  opt_state: optax.OptState


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))


# State: (EmptyState(), (TraceState(trace), ScaleByScheduleState(count: int32))).
_TX = optax.chain(
  optax.clip_by_global_norm(1.0), optax.sgd(optax.cosine_decay_schedule(0.1, 10), momentum=0.9)
)


def _state(with_target: bool, *, seed: int = 0) -> _State:
  """A state whose every leaf depends on `seed`; the queue is sharded over all devices."""
  variables = _Net().init(jax.random.key(0), jnp.ones((2, 3)))
  online = {"backbone": variables}
  state = _State(
    step=jnp.zeros((), jnp.int32),
    online=online,
    target=jax.tree.map(jnp.copy, online) if with_target else None,
    method_state={"queue": jnp.zeros((2 * jax.device_count(), 4), jnp.float32)},
    opt_state=_TX.init({"backbone": variables["params"]}),
  )
  rng = np.random.default_rng(seed)

  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
      value = rng.integers(0, 1000, size=x.shape)
    else:
      value = rng.normal(size=x.shape)
    return jnp.asarray(value, x.dtype)

  state = jax.tree.map(fill, state)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state, replicated)
  return state.replace(method_state={"queue": jax.device_put(state.method_state["queue"], sharded)})


def _assert_same(actual, expected):
  """Same tree structure (node types included), and every leaf equal in value and dtype."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _write(directory, steps, *, with_target=True, **kwargs):
  """Saves a different state at each step; returns the NumPy copies of what was saved."""
  saved = {}
  with checkpoint.Checkpointer(directory, **kwargs) as ckpt:
    for step in steps:
      state = _state(with_target, seed=step)
      saved[step] = jax.device_get(state)
      ckpt.save(step, state, metadata={"epoch": step // 2, "loss": 1.0 / (step + 1)})
  return saved


@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no_target"])
def test_restore_every_step_exactly(tmp_path, with_target):
  saved = _write(tmp_path, [0, 3, 7], with_target=with_target)
  target = _state(with_target, seed=99)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [0, 3, 7]
    for step, expected in saved.items():
      restored = ckpt.restore(step, target)
      _assert_same(restored, expected)
      assert isinstance(restored, _State)
      assert restored.step.dtype == jnp.int32 and restored.step.shape == ()
      assert (restored.target is None) == (not with_target)
      # Optax's namedtuples come back as themselves, not as lists or dicts.
      assert type(restored.opt_state[0]) is optax.EmptyState
      assert type(restored.opt_state[1][0]) is optax.TraceState
      assert type(restored.opt_state[1][1]) is optax.ScaleByScheduleState
      assert restored.opt_state[1][1].count.dtype == jnp.int32
      for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert isinstance(r, jax.Array)
        assert r.sharding == t.sharding


def test_restore_from_abstract_target(tmp_path):
  saved = _write(tmp_path, [1])
  target = _state(True, seed=5)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
  )
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore(1, abstract)
  _assert_same(restored, saved[1])
  assert restored.method_state["queue"].sharding == target.method_state["queue"].sharding


def test_restore_empty_method_state(tmp_path):
  state = _state(False).replace(method_state={})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(0, state, metadata={})
    restored = ckpt.restore(0, _state(False, seed=1).replace(method_state={}))
  assert restored.method_state == {}
  _assert_same(restored, jax.device_get(state))


def test_all_steps_kept_by_default(tmp_path):
  _write(tmp_path, range(0, 12, 2), with_target=False)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [0, 2, 4, 6, 8, 10]
    assert ckpt.latest_step() == 10


def test_max_to_keep_keeps_newest(tmp_path):
  saved = _write(tmp_path, [1, 2, 3, 4], with_target=False, max_to_keep=2)
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [3, 4]
    _assert_same(ckpt.restore(4, _state(False, seed=0)), saved[4])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_to_keep_must_be_positive(tmp_path, bad):
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.Checkpointer(tmp_path, max_to_keep=bad)


def test_metadata_round_trips(tmp_path):
  metadata = {
    "epoch": np.int64(3),
    "metrics": {"loss": jnp.float32(0.25), "knn_top1": 0.5, "per_layer": [0.1, 0.2]},
    "config": "simclr_cifar10",
    "finished": False,
  }
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, _state(False), metadata=metadata)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    loaded = ckpt.metadata(5)
  assert loaded == {
    "epoch": 3,
    "metrics": {"loss": 0.25, "knn_top1": 0.5, "per_layer": [0.1, 0.2]},
    "config": "simclr_cifar10",
    "finished": False,
  }
  assert type(loaded["epoch"]) is int and type(loaded["metrics"]["loss"]) is float


def test_missing_step_names_available_steps(tmp_path):
  _write(tmp_path, [2, 4], with_target=False)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    for read in (
      lambda: ckpt.restore(3, _state(False)),
      lambda: ckpt.restore_raw(3),
      lambda: ckpt.metadata(3),
    ):
      with pytest.raises(ValueError, match=r"step 3 .*available steps: \[2, 4\]"):
        read()


def test_resume_sees_earlier_steps(tmp_path):
  saved = _write(tmp_path, [0, 1], with_target=True)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    state = ckpt.restore(ckpt.latest_step(), _state(True, seed=42))
    _assert_same(state, saved[1])
    ckpt.save(2, state, metadata={"epoch": 1})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [0, 1, 2]
    _assert_same(ckpt.restore(2, _state(True, seed=42)), saved[1])


def test_empty_or_missing_directory_has_no_steps(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.all_steps() == []
  missing = tmp_path / "missing"
  with checkpoint.Checkpointer(missing, read_only=True) as ckpt:
    assert ckpt.latest_step() is None
  assert not missing.exists()
  with pytest.raises(ValueError, match="No checkpoints"):
    checkpoint.load_state_dict(missing)


def test_partial_save_is_ignored(tmp_path):
  saved = _write(tmp_path, [1], with_target=False)
  # What a run killed mid-save leaves behind: orbax's temporary directory, never renamed.
  partial = tmp_path / "2.orbax-checkpoint-tmp-1712345678901234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"\x00" * 10)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    assert ckpt.latest_step() == 1
    with pytest.raises(ValueError, match=r"step 2 .*\[1\]"):
      ckpt.restore(2, _state(False))
    _assert_same(ckpt.restore(ckpt.latest_step(), _state(False, seed=3)), saved[1])
    # The interrupted step can be written again.
    ckpt.save(2, _state(False, seed=2), metadata={})
    assert ckpt.all_steps() == [1, 2]


def test_restore_raw_is_numpy_nested_dicts(tmp_path):
  saved = _write(tmp_path, [0, 6], with_target=True)
  s = saved[6]
  expected = {
    "step": s.step,
    "online": s.online,
    "target": s.target,
    "method_state": {"queue": s.method_state["queue"]},
    "opt_state": [None, [{"trace": s.opt_state[1][0].trace}, {"count": s.opt_state[1][1].count}]],
  }
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    raw = ckpt.restore_raw(6)
  _assert_same(raw, expected)
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(raw))
  _assert_same(checkpoint.load_state_dict(tmp_path), expected)
  _assert_same(checkpoint.load_state_dict(tmp_path, 0)["online"], saved[0].online)


def test_restore_into_a_different_structure_raises(tmp_path):
  _write(tmp_path, [0], with_target=False)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="Cannot restore checkpoint step 0"):
      ckpt.restore(0, _state(True))


def test_save_rejects_bad_input(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, _state(False), metadata={})
    with pytest.raises(ValueError, match="latest checkpoint is step 3"):
      ckpt.save(3, _state(False), metadata={})
    with pytest.raises(ValueError, match="latest checkpoint is step 3"):
      ckpt.save(2, _state(False), metadata={})
    with pytest.raises(ValueError, match="non-negative int"):
      ckpt.save(-1, _state(False), metadata={})
    with pytest.raises(ValueError, match="JSON"):
      ckpt.save(4, _state(False), metadata={"queue": np.zeros(3)})
    assert ckpt.all_steps() == [3]
  with checkpoint.Checkpointer(tmp_path, read_only=True) as ckpt:
    with pytest.raises(ValueError, match="read-only"):
      ckpt.save(4, _state(False), metadata={})


def test_a_relative_directory_works(tmp_path, monkeypatch):
  # orbax itself rejects relative paths; work dirs such as runs/demo are relative.
  monkeypatch.chdir(tmp_path)
  state = {"w": np.arange(3.0, dtype=np.float32)}
  with checkpoint.Checkpointer("runs/demo/checkpoints") as ckpt:
    ckpt.save(5, state, metadata={"epoch": 1})
  with checkpoint.Checkpointer("runs/demo/checkpoints", read_only=True) as ckpt:
    assert ckpt.directory == str(tmp_path / "runs/demo/checkpoints")
    np.testing.assert_array_equal(ckpt.restore_raw(5)["w"], state["w"])
