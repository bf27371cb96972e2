"""Tests for umm_jax.methods.ssl_hsic against NumPy float64 references of the HSIC estimators.

The reference builds the kernel matrix entry by entry, sums HSIC(Z, Y)'s same-image pairs with
loops over images and views (deepmind/ssl_hsic's estimator with exact kernels instead of random
features), and HSIC(Z, Z) as `tr(K H K H) / B²` with an explicit centring matrix `H`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import ssl_hsic

SSL_HSIC = ssl_hsic.METHODS[0]


def np_kernel(x, y, kernel, c):
  d2 = np.sum((np.float64(x) - np.float64(y)) ** 2)
  return c / np.sqrt(c**2 + d2) if kernel == "imq" else np.exp(-d2 / (2 * c**2))


def np_hsic(views, kernel, c):
  m, n, _ = views.shape
  b = m * n
  rows = views.reshape(b, -1)
  k = np.array([[np_kernel(x, y, kernel, c) for y in rows] for x in rows])
  same = sum(
    np_kernel(views[p, i], views[q, i], kernel, c)
    for i in range(n)
    for p in range(m)
    for q in range(m)
  )
  hsic_zy = same / (n * m * (m - 1)) - k.sum() / b**2
  h = np.eye(b) - np.ones((b, b)) / b
  hsic_zz = np.trace(k @ h @ k @ h) / b**2
  return hsic_zy, hsic_zz


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("kernel", ssl_hsic.KERNELS)
@pytest.mark.parametrize("m", [2, 3])
def test_hsic_terms_match_numpy(kernel, m):
  views = 0.5 * random((m, 5, 4), m)
  zy, zz = jax.jit(ssl_hsic.hsic_terms, static_argnames=("kernel", "scale"))(
    views, kernel=kernel, scale=1.5
  )
  exp_zy, exp_zz = np_hsic(views, kernel, 1.5)
  np.testing.assert_allclose(zy, exp_zy, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(zz, exp_zz, rtol=1e-4, atol=1e-7)


def test_loss_matches_numpy():
  views = 0.5 * random((2, 6, 4), 4)
  loss, metrics = ssl_hsic.ssl_hsic_loss(views, gamma=3.0, kernel="imq", scale=1.0)
  zy, zz = np_hsic(views, "imq", 1.0)
  np.testing.assert_allclose(loss, -zy + 3.0 * np.sqrt(zz), rtol=1e-4)
  np.testing.assert_allclose(metrics["hsic_zy"], zy, rtol=1e-4, atol=1e-6)


def test_kernels_at_zero_distance_and_known_values():
  z = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
  imq = ssl_hsic.kernel_matrix(z, kernel="imq", scale=5.0)
  np.testing.assert_allclose(imq, [[1, 5 / np.sqrt(50)], [5 / np.sqrt(50), 1]], rtol=1e-6)
  gauss = ssl_hsic.kernel_matrix(z, kernel="gaussian", scale=5.0)
  np.testing.assert_allclose(gauss[0, 1], np.exp(-25 / 50), rtol=1e-6)
  with pytest.raises(ValueError, match="valid kernels"):
    ssl_hsic.kernel_matrix(z, kernel="laplace", scale=1.0)


def test_invariant_to_image_order_and_view_order():
  views = random((2, 6, 4), 5)
  perm = np.random.default_rng(6).permutation(6)
  a = ssl_hsic.hsic_terms(views, kernel="imq", scale=1.0)
  b = ssl_hsic.hsic_terms(views[:, perm], kernel="imq", scale=1.0)
  c = ssl_hsic.hsic_terms(views[::-1], kernel="imq", scale=1.0)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(a, c, rtol=1e-5)


def test_identical_views_raise_the_dependence():
  # Views equal to each other maximise the same-image kernel sum: HSIC(Z, Y) is larger.
  views = random((2, 6, 4), 7)
  same = np.stack([views[0], views[0]])
  assert (
    ssl_hsic.hsic_terms(same, kernel="imq", scale=1.0)[0]
    > (ssl_hsic.hsic_terms(views, kernel="imq", scale=1.0)[0])
  )


def test_gradient_matches_finite_differences():
  views = 0.5 * random((2, 4, 3), 8)
  f = lambda v: ssl_hsic.ssl_hsic_loss(v, gamma=3.0, kernel="gaussian", scale=1.0)[0]
  g = jax.grad(f)(views)
  direction = random((2, 4, 3), 9)
  h = 1e-3

  def ref(v):
    zy, zz = np_hsic(v, "gaussian", 1.0)
    return -zy + 3.0 * np.sqrt(zz)

  numeric = (ref(views + h * direction) - ref(views - h * direction)) / (2 * h)
  np.testing.assert_allclose(np.sum(np.asarray(g) * direction), numeric, rtol=2e-3)


def test_objective_normalises_the_projections():
  hp = {**ssl_hsic.DEFAULTS, "proj_output_dim": 4}
  online = {"projection": random((2, 6, 4), 10)}
  loss, metrics, state = jax.jit(lambda o: SSL_HSIC.objective(o, None, {}, hp))(online)
  unit = online["projection"] / np.linalg.norm(online["projection"], axis=-1, keepdims=True)
  zy, zz = np_hsic(unit, "imq", 1.0)
  np.testing.assert_allclose(loss, -zy + 3.0 * np.sqrt(zz), rtol=1e-4)
  assert state == {} and {"hsic_zy", "hsic_zz", "z_std"} <= set(metrics)


def test_heads_and_declaration():
  hp = {**ssl_hsic.DEFAULTS, "proj_hidden_dim": 16, "proj_output_dim": 8}
  module = SSL_HSIC.heads(hp)
  features = {"embedding": jnp.asarray(random((6, 10), 11))}
  out = module.apply(module.init(jax.random.key(0), features, train=False), features, train=False)
  assert out["projection"].shape == (6, 8)
  assert SSL_HSIC.target_momentum is None and ssl_hsic.DEFAULTS["gamma"] == 3.0
