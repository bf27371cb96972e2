"""Tests for umm_jax.methods.ressl against a NumPy float64 reference of ReSSL's relational loss.

The reference writes the two distributions over the queue with explicit exponentials (one row at a
time) and the cross-entropy as a sum, the queue update as a loop over rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax import augment
from umm_jax.methods import ressl

RESSL = ressl.METHODS[0]


def np_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def np_ressl(q, k, queue, tau_s, tau_t):
  q, k, queue = np_unit(q), np_unit(k), np.float64(queue)
  losses = []
  for qi, ki in zip(q, k, strict=True):
    p_t = np_softmax(queue @ ki / tau_t)
    p_s = np_softmax(queue @ qi / tau_s)
    losses.append(-np.sum(p_t * np.log(p_s)))
  return np.mean(losses)


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("taus", [(0.1, 0.04), (0.5, 0.5)])
def test_loss_matches_numpy(taus):
  q, k = random((2, 6, 8), 0)
  queue = np_unit(random((20, 8), 1)).astype(np.float32)
  fn = jax.jit(ressl.ressl_loss, static_argnames=("temperature_student", "temperature_teacher"))
  loss, metrics = fn(q, k, queue, temperature_student=taus[0], temperature_teacher=taus[1])
  np.testing.assert_allclose(loss, np_ressl(q, k, queue, *taus), rtol=1e-5)
  assert 0 <= metrics["teacher_entropy"] <= np.log(20) + 1e-5


def test_sharp_teacher_is_the_nearest_queue_entry():
  # τ_t → 0: the target is one-hot on the key's nearest queue entry, and the loss its −log p_s.
  q, k = random((2, 5, 8), 2)
  queue = np_unit(random((12, 8), 3)).astype(np.float32)
  loss, metrics = ressl.ressl_loss(q, k, queue, temperature_student=0.2, temperature_teacher=1e-4)
  nearest = np.argmax(np_unit(k) @ np.float64(queue).T, axis=1)
  log_p_s = [
    np.log(np_softmax(np.float64(queue) @ qi / 0.2))[j]
    for qi, j in zip(np_unit(q), nearest, strict=True)
  ]
  np.testing.assert_allclose(loss, -np.mean(log_p_s), rtol=1e-4)
  assert metrics["teacher_entropy"] < 1e-3


def test_gradients_reach_only_the_student():
  q, k = random((2, 5, 8), 4)
  queue = np_unit(random((12, 8), 5)).astype(np.float32)
  f = lambda *a: ressl.ressl_loss(*a, temperature_student=0.1, temperature_teacher=0.04)[0]
  gq, gk, gqueue = jax.grad(f, argnums=(0, 1, 2))(q, k, queue)
  assert np.abs(gq).max() > 0 and np.all(gk == 0) and np.all(gqueue == 0)


def test_objective_uses_strong_student_weak_teacher_and_enqueues():
  hp = {**ressl.DEFAULTS, "proj_output_dim": 8, "queue_size": 10}
  state = {**RESSL.init_state(hp, jax.random.key(0)), "ptr": jnp.asarray(7, jnp.int32)}
  assert state["queue"].shape == (10, 8)
  np.testing.assert_allclose(np.linalg.norm(state["queue"], axis=-1), 1.0, rtol=1e-6)
  online = {"projection": random((2, 5, 8), 6)}
  target = {"projection": random((2, 5, 8), 7)}
  loss, metrics, new_state = jax.jit(lambda o, t, s: RESSL.objective(o, t, s, hp))(
    online, target, state
  )
  queue = np.asarray(state["queue"])
  q, k = online["projection"][0], target["projection"][1]
  np.testing.assert_allclose(loss, np_ressl(q, k, queue, 0.1, 0.04), rtol=1e-5)
  expected = queue.copy()
  for j, key in enumerate(np_unit(k)):
    expected[(7 + j) % 10] = key
  np.testing.assert_allclose(new_state["queue"], expected, rtol=1e-6)
  assert int(new_state["ptr"]) == 2
  assert {"teacher_entropy", "z_std"} <= set(metrics)


def test_objective_needs_the_teacher():
  with pytest.raises(ValueError, match="target=None"):
    RESSL.objective({"projection": jnp.zeros((2, 4, 8))}, None, {}, ressl.DEFAULTS)


def test_recipe_has_a_weak_second_view():
  strong, weak = augment.get_recipe("ressl").views
  assert strong == augment.get_recipe("simclr").views[0]
  assert weak.jitter_p == weak.grayscale_p == weak.blur_p == weak.solarize_p == 0
  assert weak == augment.get_recipe("minimal").views[0] and weak.flip_p == 0.5
  assert RESSL.recipe == "ressl" and RESSL.target_momentum == (0.99, 1.0)


def test_heads_shapes():
  hp = {**ressl.DEFAULTS, "proj_hidden_dim": 16, "proj_output_dim": 8}
  module = RESSL.heads(hp)
  features = {"embedding": jnp.asarray(random((6, 10), 8))}
  out = module.apply(module.init(jax.random.key(0), features, train=False), features, train=False)
  assert set(out) == {"projection"} and out["projection"].shape == (6, 8)
