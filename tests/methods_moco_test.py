"""Tests for umm_jax.methods.moco against NumPy float64 references of MoCo v2 and v3.

References: MoCo's InfoNCE with the positive logit first and the queue as negatives, averaged
over both directions with one queue per view (solo-learn's MoCo v2+); MoCo v3's in-batch
cross-entropy scaled by 2τ and summed over both directions (the official code); a ring buffer
written one row at a time in a Python loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import moco

MOCOV2, MOCOV3 = moco.METHODS


def np_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_moco_infonce(q, k, queue, temperature):
  q, k = np_unit(q), np_unit(k)
  losses = []
  for i in range(len(q)):
    logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / temperature
    losses.append(-np_log_softmax(logits)[0])
  return np.mean(losses)


def np_mocov3_loss(q, k, temperature):
  logits = np_unit(q) @ np_unit(k).T / temperature
  return -np.mean(np.diag(np_log_softmax(logits))) * 2 * temperature


def np_enqueue(queue, ptr, keys):
  queue = queue.copy()
  for key in keys:
    queue[ptr] = key
    ptr = (ptr + 1) % len(queue)
  return queue, ptr


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_moco_infonce_matches_numpy():
  q, k = random((2, 6, 8), 0)
  queue = np_unit(random((20, 8), 1)).astype(np.float32)
  loss, metrics = jax.jit(moco.moco_infonce, static_argnames="temperature")(
    q, k, queue, temperature=0.2
  )
  np.testing.assert_allclose(loss, np_moco_infonce(q, k, queue, 0.2), rtol=1e-5)
  assert 0.0 <= metrics["contrastive_acc"] <= 1.0


def test_moco_gradients_stop_at_keys_and_queue():
  q, k = random((2, 6, 8), 2)
  queue = np_unit(random((20, 8), 3)).astype(np.float32)
  grads = jax.grad(lambda *a: moco.moco_infonce(*a, temperature=0.2)[0], argnums=(0, 1, 2))(
    q, k, queue
  )
  assert np.abs(grads[0]).max() > 0
  assert np.all(grads[1] == 0) and np.all(grads[2] == 0)
  grads = jax.grad(lambda *a: moco.mocov3_loss(*a, temperature=0.2)[0], argnums=(0, 1))(q, k)
  assert np.abs(grads[0]).max() > 0 and np.all(grads[1] == 0)


def test_enqueue_is_fifo_with_wrap_around():
  size, n, d = 8, 3, 2
  queue_np = random((2, size, d), 4)
  queue, ptr = jnp.asarray(queue_np), jnp.zeros((), jnp.int32)
  ptr_np = 0
  step = jax.jit(moco.enqueue)
  for t in range(5):  # 15 keys through 8 rows: the pointer wraps around twice
    keys = random((2, n, d), 10 + t)
    queue, ptr = step(queue, ptr, keys)
    new = [np_enqueue(queue_np[v], ptr_np, keys[v]) for v in range(2)]
    queue_np, ptr_np = np.stack([q for q, _ in new]), new[0][1]
    np.testing.assert_array_equal(queue, queue_np)
    assert int(ptr) == ptr_np and ptr.dtype == jnp.int32
  # After 15 keys the buffer holds the 8 newest; the oldest of them sits at the pointer.
  assert ptr_np == 15 % size


def test_enqueue_rejects_more_keys_than_rows():
  with pytest.raises(ValueError, match=r"\(2, 9, 4\).*\(2, 8, 4\)"):
    moco.enqueue(jnp.zeros((2, 8, 4)), jnp.zeros((), jnp.int32), jnp.zeros((2, 9, 4)))


def test_init_queue():
  hp = {**moco.MOCOV2_DEFAULTS, "queue_size": 16, "proj_output_dim": 8}
  state = MOCOV2.init_state(hp, jax.random.key(0))
  assert state["queue"].shape == (2, 16, 8) and state["queue"].dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(state["queue"], axis=-1), 1.0, rtol=1e-6)
  assert state["ptr"].shape == () and state["ptr"].dtype == jnp.int32 and int(state["ptr"]) == 0


def test_mocov2_objective_matches_numpy_and_updates_queue():
  hp = {**moco.MOCOV2_DEFAULTS, "queue_size": 12, "proj_output_dim": 8}
  state = {**MOCOV2.init_state(hp, jax.random.key(1)), "ptr": jnp.asarray(9, jnp.int32)}
  online = {"projection": random((2, 5, 8), 5)}
  target = {"projection": random((2, 5, 8), 6)}
  step = jax.jit(lambda o, t, s: MOCOV2.objective(o, t, s, hp))
  loss, metrics, new_state = step(online, target, state)

  (q1, q2), (k1, k2), queue = online["projection"], target["projection"], np.asarray(state["queue"])
  tau = hp["temperature"]
  expected = (np_moco_infonce(q1, k2, queue[1], tau) + np_moco_infonce(q2, k1, queue[0], tau)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert {"z_std", "z_offdiag_corr", "contrastive_acc"} <= set(metrics)

  # The queue takes the normalised keys of its view, from row 9 round to row 1.
  q_new = [np_enqueue(queue[v], 9, np_unit(target["projection"][v])) for v in range(2)]
  np.testing.assert_allclose(new_state["queue"], np.stack([q for q, _ in q_new]), rtol=1e-6)
  assert int(new_state["ptr"]) == q_new[0][1] == 2
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
    assert new.shape == old.shape and new.dtype == old.dtype


def test_mocov3_objective_matches_numpy():
  hp = dict(moco.MOCOV3_DEFAULTS)
  online = {"projection": random((2, 6, 8), 7), "prediction": random((2, 6, 8), 8)}
  target = {"projection": random((2, 6, 8), 9), "prediction": random((2, 6, 8), 10)}
  loss, metrics, state = jax.jit(lambda o, t: MOCOV3.objective(o, t, {}, hp))(online, target)
  (p1, p2), (k1, k2) = online["prediction"], target["projection"]
  tau = hp["temperature"]
  expected = np_mocov3_loss(p1, k2, tau) + np_mocov3_loss(p2, k1, tau)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert {"z_std", "z_offdiag_corr"} <= set(metrics) and state == {}


def test_objectives_need_a_target():
  with pytest.raises(ValueError, match="target=None"):
    MOCOV3.objective({"prediction": jnp.zeros((2, 4, 8))}, None, {}, moco.MOCOV3_DEFAULTS)


@pytest.mark.parametrize("method", [MOCOV2, MOCOV3], ids=lambda m: m.name)
def test_heads_shapes(method):
  hp = {**method.defaults, "proj_hidden_dim": 32, "proj_output_dim": 8, "pred_hidden_dim": 16}
  module = method.heads(hp)
  features = {"embedding": jnp.asarray(random((10, 24), 11))}
  variables = module.init(jax.random.key(0), features, train=False)
  out = module.apply(variables, features, train=False)
  expected = {"projection"} if method is MOCOV2 else {"projection", "prediction"}
  assert set(out) == expected
  assert all(v.shape == (10, 8) for v in out.values())


def test_declarations():
  assert MOCOV2.target_momentum == (0.99, 0.999) and MOCOV2.recipe == "mocov2"
  assert MOCOV3.target_momentum == (0.99, 1.0)
