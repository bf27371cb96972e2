"""One jitted SSL training step of every registered method on a tiny ResNet and synthetic data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from umm_jax import data, methods, train
from umm_jax.models import resnet

SIZE = 16
LR = 0.05


def _small(hp: dict) -> dict:
  """Shrinks widths, queues and prototype counts so a step compiles and runs in seconds."""
  small = {}
  for key, value in hp.items():
    is_size = isinstance(value, int) and not isinstance(value, bool)
    shrink = key.endswith("_dim") or key in ("num_prototypes", "queue_length", "queue_size")
    small[key] = min(value, 16) if is_size and shrink and value > 0 else value
  return small


def _setup(name: str):
  method = methods.get(name)
  hp = _small(dict(method.defaults))
  if name == "wmse":
    # W-MSE whitens sub-batches (here the whole batch of 8) and needs more rows than dimensions.
    hp["proj_output_dim"] = 4
  model = resnet.create("resnet10", stem="cifar", width=8)
  heads = method.heads(hp)
  tx = optax.sgd(LR)
  ds = data.synthetic("train", num_examples=8, image_size=SIZE, channels=3, num_classes=4, seed=0)
  mean, std = ds.channel_stats()
  state = train.init_state(
    jax.random.key(0),
    model=model,
    heads=heads,
    method=method,
    hp=hp,
    tx=tx,
    input_shape=(SIZE, SIZE, 3),
    num_classes=4,
    probe_tx=optax.sgd(0.1),
  )
  step = train.make_train_step(
    model=model,
    heads=heads,
    method=method,
    hp=hp,
    tx=tx,
    probe_tx=optax.sgd(0.1),
    num_classes=4,
    image_size=SIZE,
    mean=jnp.asarray(mean),
    std=jnp.asarray(std),
    total_steps=10,
  )
  # `index`: each image's row in the data set, which methods with `batch_keys` (BCL-I) read.
  batch = {"image": jnp.asarray(ds.images), "label": jnp.asarray(ds.labels), "index": jnp.arange(8)}
  return method, state, step, batch


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_one_step_of_every_method(name):
  method, state, step, batch = _setup(name)
  new_state, metrics = jax.jit(step)(state, batch, jax.random.key(1))
  assert int(new_state.step) == 1
  for key, value in metrics.items():
    assert np.all(np.isfinite(np.asarray(value))), (name, key, value)
  for key in ("loss", "z_std", "z_offdiag_corr", "probe_loss", "probe_acc"):
    assert key in metrics, (name, sorted(metrics))
  old = state.online["backbone"]["params"]
  new = new_state.online["backbone"]["params"]
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), old, new)
  assert max(jax.tree.leaves(moved)) > 0, f"{name}: the backbone did not move"
  # The method's state keeps its structure and shapes, so the step can be jitted once.
  assert jax.tree.structure(new_state.method_state) == jax.tree.structure(state.method_state)
  for a, b in zip(*map(jax.tree.leaves, (new_state.method_state, state.method_state)), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
  if method.target_momentum is None:
    assert new_state.target is None
  else:
    # EMA at step 0 uses the base momentum m: target' = m·target + (1 − m)·online'.
    m = method.target_momentum[0]
    np.testing.assert_allclose(float(metrics["target_momentum"]), m, rtol=1e-6)
    expected = jax.tree.map(
      lambda t, o: m * np.asarray(t) + (1 - m) * np.asarray(o),
      state.target["backbone"]["params"],
      new,
    )
    jax.tree.map(
      lambda e, t: np.testing.assert_allclose(t, e, rtol=1e-5, atol=1e-7),
      expected,
      new_state.target["backbone"]["params"],
    )


def test_step_is_a_function_of_state_images_and_key():
  _, state, step, batch = _setup("simclr")
  step = jax.jit(step)
  a, _ = step(state, batch, jax.random.key(1))
  b, _ = step(state, batch, jax.random.key(1))
  c, _ = step(state, batch, jax.random.key(2))
  leaves = lambda s: jax.tree.leaves(s.online["backbone"]["params"])
  assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))
  assert not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c), strict=True))


def test_sgd_step_moves_parameters_along_the_negative_gradient():
  # With plain SGD the update is −lr·∇L; a finite-difference probe along it must lower L.
  _, state, step, batch = _setup("barlow_twins")
  step = jax.jit(step)
  new_state, metrics = step(state, batch, jax.random.key(1))
  # Same key and step index, so the same views: the loss at the new parameters is lower.
  _, metrics_after = step(new_state.replace(step=state.step), batch, jax.random.key(1))
  assert float(metrics_after["loss"]) < float(metrics["loss"])
  assert float(metrics_after["probe_loss"]) < float(metrics["probe_loss"])


def test_probe_sees_a_stop_gradient_embedding():
  # Labels feed only the probe: other labels change the probe but not the backbone or heads.
  _, state, step, batch = _setup("simclr")
  step = jax.jit(step)
  a, _ = step(state, batch, jax.random.key(1))
  b, _ = step(state, {**batch, "label": (batch["label"] + 1) % 4}, jax.random.key(1))
  same = jax.tree.map(np.array_equal, a.online, b.online)
  assert all(jax.tree.leaves(same))
  assert not np.array_equal(
    a.probe["params"]["Dense_0"]["kernel"], b.probe["params"]["Dense_0"]["kernel"]
  )


def test_probe_loss_ignores_unlabelled_examples():
  # Label -1 marks unlabelled images (STL-10's unlabelled split): they add nothing to the loss.
  probe = {"params": {"Dense_0": {"kernel": jnp.eye(3), "bias": jnp.zeros(3)}}}
  emb = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, -5.0, 9.0]])
  loss, metrics = train.probe_loss(probe, emb, jnp.array([0, 2, -1]), 3)
  logits = np.asarray(emb[:2], np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(float(loss), -(log_p[0, 0] + log_p[1, 2]) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["probe_acc"]), 0.5)


def test_target_momentum_schedule_endpoints():
  np.testing.assert_allclose(train.target_momentum(jnp.array(0), 100, 0.99, 1.0), 0.99, rtol=1e-7)
  np.testing.assert_allclose(train.target_momentum(jnp.array(50), 100, 0.99, 1.0), 0.995, rtol=1e-7)
  np.testing.assert_allclose(train.target_momentum(jnp.array(100), 100, 0.99, 1.0), 1.0, rtol=1e-7)
  np.testing.assert_allclose(train.target_momentum(jnp.array(500), 100, 0.99, 1.0), 1.0, rtol=1e-7)


def test_state_with_a_target_network_can_be_donated():
  # The target starts as a copy of the online network: aliased buffers cannot be donated twice.
  _, state, step, batch = _setup("byol")
  _, metrics = jax.jit(step, donate_argnums=0)(state, batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))
