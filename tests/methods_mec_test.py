"""Tests for umm_jax.methods.mec against a NumPy float64 reference of the paper's formulation.

The reference builds `C = λ p̂ ẑᵀ` and sums the series with `np.linalg.matrix_power`; for small λ
and many terms the series must equal the exact `log det(I + C)` (`np.linalg.slogdet`), which ties
the Taylor expansion to the coding length it approximates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import mec

MEC = mec.METHODS[0]


def np_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_series(c, order):
  return sum(
    (-1) ** (k + 1) * np.trace(np.linalg.matrix_power(c, k)) / k for k in range(1, order + 1)
  )


def np_mec_term(p, z, lamda, order):
  c = lamda * np_unit(p) @ np_unit(z).T
  return -np_series(c, order) / (len(p) * lamda), np_series(c, order)


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_constants_follow_the_paper():
  mu, lamda = mec.coding_constants(1024, 2048, eps2=64.0)
  assert mu == (1024 + 2048) / 2 and lamda == pytest.approx(2048 / (1024 * 64))
  with pytest.raises(ValueError, match="eps2"):
    mec.coding_constants(8, 4, eps2=0.0)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_taylor_series_matches_numpy(order):
  c = 0.3 * random((6, 6), 0)
  got = jax.jit(mec.taylor_log_det, static_argnames="order")(c, order=order)
  np.testing.assert_allclose(got, np_series(c.astype(np.float64), order), rtol=1e-5, atol=1e-6)


def test_series_converges_to_the_log_determinant():
  # ‖C‖ small: 12 terms of the series are log det(I + C) to float32 precision.
  p, z = random((2, 8, 5), 1)
  c = 0.05 * np_unit(p) @ np_unit(z).T
  _, exact = np.linalg.slogdet(np.eye(8) + c)
  np.testing.assert_allclose(
    mec.taylor_log_det(jnp.asarray(c, jnp.float32), order=12), exact, rtol=1e-4
  )


@pytest.mark.parametrize("lamda", [0.05, 0.3])
def test_mec_loss_matches_numpy(lamda):
  p, z = random((2, 8, 16), 2)
  loss, metrics = jax.jit(mec.mec_loss, static_argnames="order")(p, z, lamda=lamda, order=4)
  expected, series = np_mec_term(p, z, lamda, 4)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["series"], series, rtol=1e-5)


def test_small_lambda_limit_is_the_mean_cosine():
  # −T/(mλ) = −tr(p̂ẑᵀ)/m + O(λ): the loss tends to minus the mean cosine of the pairs.
  p, z = random((2, 8, 16), 3)
  loss, _ = mec.mec_loss(p, z, lamda=1e-4, order=4)
  np.testing.assert_allclose(loss, -np.mean(np.sum(np_unit(p) * np_unit(z), -1)), atol=1e-4)


def test_invariant_to_row_scale_and_joint_permutation():
  p, z = random((2, 8, 16), 4)
  perm = np.random.default_rng(5).permutation(8)
  base_loss, _ = mec.mec_loss(p, z, lamda=0.2, order=4)
  np.testing.assert_allclose(
    mec.mec_loss(3 * p, 0.5 * z, lamda=0.2, order=4)[0], base_loss, rtol=1e-5
  )
  np.testing.assert_allclose(
    mec.mec_loss(p[perm], z[perm], lamda=0.2, order=4)[0], base_loss, rtol=1e-5
  )


def test_gradient_matches_finite_differences_and_stops_at_the_teacher():
  p, z = random((2, 6, 8), 6)
  f = lambda p, z: mec.mec_loss(p, z, lamda=0.3, order=4)[0]
  gp, gz = jax.grad(f, argnums=(0, 1))(p, z)
  assert np.all(np.asarray(gz) == 0)
  direction = random((6, 8), 7).astype(np.float64)
  h = 1e-3
  numeric = (
    np_mec_term(p + h * direction, z, 0.3, 4)[0] - np_mec_term(p - h * direction, z, 0.3, 4)[0]
  ) / (2 * h)
  np.testing.assert_allclose(np.sum(np.asarray(gp) * direction), numeric, rtol=1e-3)


def test_warmup_of_lambda():
  lamda, warmup = 0.5, 100
  at = lambda step: float(mec.warmup_lamda(lamda, jnp.asarray(step), warmup_steps=warmup))
  # The official lamda_scheduler: np.linspace(8/λ, 1/λ, W) over the first W steps, then 1/λ.
  official = np.concatenate([np.linspace(8 / lamda, 1 / lamda, warmup), np.full(5, 1 / lamda)])
  for step in (0, 1, 50, 98, 99, 100, 104):
    assert 1 / at(step) == pytest.approx(official[step], rel=1e-6), step
  assert at(1000) == pytest.approx(lamda)
  assert float(mec.warmup_lamda(lamda, jnp.asarray(0), warmup_steps=1)) == pytest.approx(lamda)
  assert float(mec.warmup_lamda(lamda, jnp.asarray(0), warmup_steps=0)) == pytest.approx(lamda)


@pytest.mark.parametrize("step", [0, 40])
def test_objective_matches_numpy_and_counts_steps(step):
  hp = {**mec.DEFAULTS, "proj_output_dim": 8, "eps2": 2.0, "warmup_steps": 40}
  online = {"projection": random((2, 6, 8), 8), "prediction": random((2, 6, 8), 9)}
  target = {"projection": random((2, 6, 8), 10), "prediction": random((2, 6, 8), 11)}
  state = {"step": jnp.asarray(step, jnp.int32)}
  loss, metrics, new_state = jax.jit(lambda o, t, s: MEC.objective(o, t, s, hp))(
    online, target, state
  )
  m, d = 6, 8
  mu, lamda = (m + d) / 2, d / (m * 2.0)
  lamda = lamda / 8 if step == 0 else lamda
  (p1, p2), (z1, z2) = online["prediction"], target["projection"]
  (l1, t12), (l2, t21) = np_mec_term(p1, z2, lamda, 4), np_mec_term(p2, z1, lamda, 4)
  np.testing.assert_allclose(loss, (l1 + l2) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["coding_length"], mu * (t12 + t21) / 2 / m, rtol=1e-5)
  np.testing.assert_allclose(metrics["lamda"], lamda, rtol=1e-6)
  assert int(new_state["step"]) == step + 1 and new_state["step"].dtype == jnp.int32
  assert {"z_std", "z_offdiag_corr"} <= set(metrics)


def test_objective_needs_the_teacher():
  with pytest.raises(ValueError, match="target=None"):
    MEC.objective({"prediction": jnp.zeros((2, 4, 8))}, None, {"step": 0}, mec.DEFAULTS)


def test_heads_and_declaration():
  hp = {**mec.DEFAULTS, "proj_hidden_dim": 16, "proj_output_dim": 8, "pred_hidden_dim": 4}
  module = MEC.heads(hp)
  features = {"embedding": jnp.asarray(random((10, 12), 12))}
  variables = module.init(jax.random.key(0), features, train=False)
  out = module.apply(variables, features, train=False)
  assert out["projection"].shape == (10, 8) and out["prediction"].shape == (10, 8)
  assert MEC.target_momentum == (0.996, 1.0) and MEC.recipe == "byol"
  assert int(MEC.init_state(hp, jax.random.key(0))["step"]) == 0
