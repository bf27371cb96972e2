"""Tests for umm_jax.methods.corinfomax against a NumPy float64 reference of the official loss.

The reference follows serdarozsoy/corinfomax-ssl `loss.py` step by step: moving mean, centring
by the new mean, moving covariance, `slogdet` of `R + εI` per view, and the element-wise MSE.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import corinfomax

CORINFOMAX = corinfomax.METHODS[0]
KW = dict(alpha=250.0, forget_mean=0.01, forget_cov=0.01, eps=1e-6)


def np_corinfomax(z1, z2, means, covs, alpha, forget_mean, forget_cov, eps):
  z1, z2 = np.float64(z1), np.float64(z2)
  new_means, new_covs, log_dets = [], [], []
  for v, z in enumerate((z1, z2)):
    mu = forget_mean * means[v] + (1 - forget_mean) * z.mean(0)
    zc = z - mu
    cov = forget_cov * covs[v] + (1 - forget_cov) * zc.T @ zc / len(z)
    sign, log_det = np.linalg.slogdet(cov + eps * np.eye(len(cov)))
    assert sign > 0
    new_means.append(mu)
    new_covs.append(cov)
    log_dets.append(log_det)
  d = z1.shape[1]
  loss = -(log_dets[0] + log_dets[1]) / d + alpha * np.mean((z1 - z2) ** 2)
  return loss, np.stack(new_means), np.stack(new_covs)


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_state(d, seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(2, d, d))
  covs = a @ np.swapaxes(a, 1, 2) / d + 0.1 * np.eye(d)
  return rng.normal(size=(2, d)).astype(np.float32), covs.astype(np.float32)


@pytest.mark.parametrize("n", [16, 4])  # more and fewer samples than dimensions
def test_loss_and_moments_match_numpy(n):
  z1, z2 = random((2, n, 8), n)
  means, covs = random_state(8, 1)
  fn = jax.jit(lambda *a: corinfomax.corinfomax_loss(*a, **KW))
  loss, metrics, (new_means, new_covs) = fn(z1, z2, means, covs)
  expected, exp_means, exp_covs = np_corinfomax(z1, z2, means, covs, **KW)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  np.testing.assert_allclose(new_means, exp_means, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_covs, exp_covs, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["invariance"], np.mean((z1 - z2) ** 2), rtol=1e-5)
  np.testing.assert_allclose(
    metrics["cov_loss"] + KW["alpha"] * metrics["invariance"], loss, rtol=1e-5
  )


def test_gradient_matches_finite_differences_and_not_the_state():
  z1, z2 = random((2, 12, 6), 2)
  means, covs = random_state(6, 3)
  f = lambda z1, m, c: corinfomax.corinfomax_loss(z1, z2, m, c, **KW)[0]
  g, g_means, g_covs = jax.grad(f, argnums=(0, 1, 2))(z1, means, covs)
  assert np.all(np.asarray(g_means) == 0) and np.all(np.asarray(g_covs) == 0)
  direction = random((12, 6), 4)
  h = 1e-4
  ref = lambda z: np_corinfomax(z, z2, means, covs, **KW)[0]
  numeric = (ref(z1 + h * direction) - ref(z1 - h * direction)) / (2 * h)
  np.testing.assert_allclose(np.sum(np.asarray(g) * direction), numeric, rtol=2e-3)


def test_invariant_to_a_joint_permutation_of_the_batch():
  z1, z2 = random((2, 10, 6), 5)
  means, covs = random_state(6, 6)
  perm = np.random.default_rng(7).permutation(10)
  a = corinfomax.corinfomax_loss(z1, z2, means, covs, **KW)
  b = corinfomax.corinfomax_loss(z1[perm], z2[perm], means, covs, **KW)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  np.testing.assert_allclose(a[2][1], b[2][1], rtol=1e-5, atol=1e-6)


def test_forgetting_factor_one_keeps_the_state():
  z1, z2 = random((2, 10, 6), 8)
  means, covs = random_state(6, 9)
  kw = {**KW, "forget_mean": 1.0, "forget_cov": 1.0}
  _, _, (new_means, new_covs) = corinfomax.corinfomax_loss(z1, z2, means, covs, **kw)
  np.testing.assert_allclose(new_means, means)
  np.testing.assert_allclose(new_covs, covs)


def test_shape_checks():
  with pytest.raises(ValueError, match=r"\[2, 6\]"):
    corinfomax.corinfomax_loss(
      jnp.zeros((4, 6)), jnp.zeros((4, 6)), jnp.zeros((6,)), jnp.zeros((2, 6, 6)), **KW
    )


def test_objective_normalises_and_updates_state():
  hp = {**corinfomax.DEFAULTS, "proj_output_dim": 8, "eps": 1e-6}
  state = CORINFOMAX.init_state(hp, jax.random.key(0))
  assert state["mean"].shape == (2, 8) and state["cov"].shape == (2, 8, 8)
  np.testing.assert_allclose(state["cov"][1], np.eye(8))
  online = {"projection": random((2, 12, 8), 10)}
  loss, metrics, new_state = jax.jit(lambda o, s: CORINFOMAX.objective(o, None, s, hp))(
    online, state
  )
  z1, z2 = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in online["projection"])
  kw = {k: hp[k] for k in ("alpha", "forget_mean", "forget_cov", "eps")}
  expected, exp_means, exp_covs = np_corinfomax(z1, z2, state["mean"], state["cov"], **kw)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  np.testing.assert_allclose(new_state["cov"], exp_covs, rtol=1e-4, atol=1e-6)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert {"cov_loss", "invariance", "z_std"} <= set(metrics)


def test_heads_and_declaration():
  hp = {**corinfomax.DEFAULTS, "proj_hidden_dim": 16, "proj_output_dim": 4}
  module = CORINFOMAX.heads(hp)
  features = {"embedding": jnp.asarray(random((6, 10), 11))}
  out = module.apply(module.init(jax.random.key(0), features, train=False), features, train=False)
  assert set(out) == {"projection"} and out["projection"].shape == (6, 4)
  assert CORINFOMAX.target_momentum is None and CORINFOMAX.optimizer == "sgd"
