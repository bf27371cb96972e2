"""Tests for umm_jax.methods.relic against a NumPy float64 RELIC v2 loss written per row with
explicit loops: for each ordered view pair (a, b) and image i, the cross-entropy of image i among
the other view's target projections plus β · KL(p_ab(·|i) ‖ p_ba(·|i)), averaged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import relic

RELIC = relic.METHODS[0]


def np_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def np_relic(q, t, temperature, beta):
  q, t = np_unit(q), np_unit(t)
  n = q.shape[1]
  dist = {}
  for a, b in [(0, 1), (1, 0)]:
    dist[a] = [
      np_softmax(np.array([q[a, i] @ t[b, j] for j in range(n)]) / temperature) for i in range(n)
    ]
  contrastive = kl = 0.0
  for a, b in [(0, 1), (1, 0)]:
    for i in range(n):
      contrastive -= np.log(dist[a][i][i])
      kl += np.sum(dist[a][i] * np.log(dist[a][i] / dist[b][i]))
  return (contrastive + beta * kl) / (2 * n), contrastive / (2 * n), kl / (2 * n)


def np_relic_parts(q, t, temperature):
  """`[2, n, n]` distributions p_ab(j | i), vectorised for the finite-difference test."""
  q, t = np_unit(q), np_unit(t)
  logits = np.einsum("vid,vjd->vij", q, t[::-1]) / temperature
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


_relic_loss = jax.jit(relic.relic_loss, static_argnames=("temperature", "beta"))


@pytest.mark.parametrize("beta", [0.0, 1.0, 3.0])
def test_relic_loss_matches_numpy(beta):
  q, t = random((2, 2, 6, 8), 0)
  loss, metrics = _relic_loss(q, t, temperature=0.2, beta=beta)
  expected, contrastive, kl = np_relic(q, t, 0.2, beta)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["contrastive"], contrastive, rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-4, atol=1e-7)
  assert metrics["kl"] >= 0


def test_kl_vanishes_when_views_agree():
  # Both views' predictions and target projections equal: the two distributions coincide.
  q, t = random((2, 6, 8), 1)
  loss, metrics = _relic_loss(np.stack([q, q]), np.stack([t, t]), temperature=0.2, beta=1.0)
  np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-7)
  np.testing.assert_allclose(loss, metrics["contrastive"], rtol=1e-6)


def test_gradient_holds_the_other_view_fixed():
  # Directional derivative against central differences of the NumPy loss in which the other
  # view's distribution (the stop-gradient side of the KL) is frozen at the base point.
  q, t = random((2, 2, 5, 8), 2)
  v = random((2, 5, 8), 3)
  temperature, beta, eps = 0.5, 2.0, 1e-4
  frozen = np_relic_parts(q, t, temperature)

  def f(qq):
    parts = np_relic_parts(qq, t, temperature)
    kl = np.mean(np.sum(parts * (np.log(parts) - np.log(frozen[::-1])), axis=-1))
    return -np.mean(np.log(np.diagonal(parts, axis1=1, axis2=2))) + beta * kl

  q64 = q.astype(np.float64)
  numeric = (f(q64 + eps * v) - f(q64 - eps * v)) / (2 * eps)
  grad = jax.grad(lambda qq: relic.relic_loss(qq, t, temperature=temperature, beta=beta)[0])(q)
  np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * v), numeric, rtol=1e-3)


def test_objective_and_no_gradient_to_target():
  hp = dict(RELIC.defaults)
  online = {"projection": random((2, 6, 8), 4), "prediction": random((2, 6, 8), 5)}
  target = {"projection": random((2, 6, 8), 6), "prediction": random((2, 6, 8), 7)}
  loss, metrics, state = jax.jit(lambda o, t: RELIC.objective(o, t, {}, hp))(online, target)
  expected, _, _ = np_relic(online["prediction"], target["projection"], hp["temperature"], 1.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert {"z_std", "z_offdiag_corr", "contrastive", "kl"} <= set(metrics) and state == {}
  g_online, g_target = jax.grad(lambda o, t: RELIC.objective(o, t, {}, hp)[0], argnums=(0, 1))(
    online, target
  )
  assert np.abs(g_online["prediction"]).max() > 0
  assert all(np.all(g == 0) for g in jax.tree.leaves(g_target))


def test_relic_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\(3, 4, 8\)"):
    relic.relic_loss(jnp.zeros((3, 4, 8)), jnp.zeros((3, 4, 8)), temperature=0.2, beta=1.0)


def test_heads_shapes_and_declarations():
  hp = {**RELIC.defaults, "proj_hidden_dim": 32, "proj_output_dim": 8, "pred_hidden_dim": 16}
  module = RELIC.heads(hp)
  features = {"embedding": jnp.asarray(random((10, 24), 8))}
  variables = module.init(jax.random.key(0), features, train=False)
  out = module.apply(variables, features, train=False)
  assert out["projection"].shape == (10, 8) and out["prediction"].shape == (10, 8)
  assert RELIC.name == "relic_v2" and RELIC.target_momentum == (0.99, 1.0)
