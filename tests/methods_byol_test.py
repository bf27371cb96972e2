"""Tests for umm_jax.methods.byol against a NumPy float64 BYOL loss: the paper's
`‖p̂ − ẑ'‖²` per view pair, SUMMED over the two symmetric pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import byol

BYOL = byol.METHODS[0]


def np_byol_term(p, z):
  p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
  p = p / np.linalg.norm(p, axis=1, keepdims=True)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  return np.mean(np.sum((p - z) ** 2, axis=1))


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_byol_loss_matches_numpy():
  p, z = random((2, 7, 8), 0)
  loss, metrics = jax.jit(byol.byol_loss)(p, z)
  np.testing.assert_allclose(loss, np_byol_term(p, z), rtol=1e-5)
  np.testing.assert_allclose(metrics["cos_sim"], 1 - loss / 2, rtol=1e-5)


def test_objective_sums_both_terms():
  online = {"projection": random((2, 6, 8), 1), "prediction": random((2, 6, 8), 2)}
  target = {"projection": random((2, 6, 8), 3), "prediction": random((2, 6, 8), 4)}
  step = jax.jit(lambda o, t: BYOL.objective(o, t, {}, BYOL.defaults))
  loss, metrics, state = step(online, target)
  (p1, p2), (t1, t2) = online["prediction"], target["projection"]
  np.testing.assert_allclose(loss, np_byol_term(p1, t2) + np_byol_term(p2, t1), rtol=1e-5)
  assert np.isfinite(loss) and state == {}
  assert {"z_std", "z_offdiag_corr", "cos_sim"} <= set(metrics)

  # Closed forms of the sum: 0 when predictions equal the targets, 2 · 4 when opposite.
  aligned = {**online, "prediction": target["projection"][::-1]}
  np.testing.assert_allclose(step(aligned, target)[0], 0.0, atol=1e-6)
  opposite = {**online, "prediction": -target["projection"][::-1]}
  np.testing.assert_allclose(step(opposite, target)[0], 8.0, rtol=1e-6)


def test_gradients_do_not_reach_the_target():
  online = {"projection": random((2, 6, 8), 5), "prediction": random((2, 6, 8), 6)}
  target = {"projection": random((2, 6, 8), 7), "prediction": random((2, 6, 8), 8)}
  g_online, g_target = jax.grad(
    lambda o, t: BYOL.objective(o, t, {}, BYOL.defaults)[0], argnums=(0, 1)
  )(online, target)
  assert np.abs(g_online["prediction"]).max() > 0
  assert all(np.all(g == 0) for g in jax.tree.leaves(g_target))


def test_objective_needs_a_target():
  with pytest.raises(ValueError, match="target=None"):
    BYOL.objective({"prediction": jnp.zeros((2, 4, 8))}, None, {}, BYOL.defaults)


def test_heads_shapes_and_declarations():
  hp = {"proj_hidden_dim": 32, "proj_output_dim": 8, "pred_hidden_dim": 16}
  module = BYOL.heads(hp)
  features = {"embedding": jnp.asarray(random((10, 24), 9))}
  variables = module.init(jax.random.key(0), features, train=False)
  out, _ = module.apply(variables, features, train=True, mutable=["batch_stats"])
  assert out["projection"].shape == (10, 8) and out["prediction"].shape == (10, 8)
  assert BYOL.target_momentum == (0.99, 1.0) and BYOL.recipe == "byol"
