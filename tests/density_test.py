"""Tests for umm_jax.density against NumPy float64 references.

Jacobians of the references come from central finite differences of NumPy forward passes (an MLP,
a convolution), never from autodiff; log-determinants from `np.linalg.slogdet` on the smaller
Gram side; the JS divergence from its definition with explicit `0 · log 0 = 0`.
"""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax import density

LN2 = math.log(2.0)


def rng_normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape)


# --- references ----------------------------------------------------------------------------------


def np_half_logdet(jac):
  """½ · logdet of the smaller Gram side of `jac` `[d_l, d_e]`."""
  gram = jac @ jac.T if jac.shape[0] <= jac.shape[1] else jac.T @ jac
  sign, logdet = np.linalg.slogdet(gram)
  assert sign > 0
  return 0.5 * logdet


def np_jacobian(f, x, h=1e-6):
  """Central-difference Jacobian `[d_l, x.size]` of `f` at `x` (float64)."""
  x = np.asarray(x, np.float64)
  cols = []
  for idx in np.ndindex(*x.shape):
    step = np.zeros_like(x)
    step[idx] = h
    cols.append((np.ravel(f(x + step)) - np.ravel(f(x - step))) / (2 * h))
  return np.stack(cols, axis=1)


def np_js(p, q):
  """JS divergence of probability vectors `p`, `q` (float64, natural log)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  mix = 0.5 * (p + q)

  def kl(a):
    nz = a > 0
    return np.sum(a[nz] * np.log(a[nz] / mix[nz]))

  return 0.5 * kl(p) + 0.5 * kl(q)


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


_ACTS = {"tanh": (jnp.tanh, np.tanh), "relu": (jax.nn.relu, lambda x: np.maximum(x, 0.0))}


def mlp_params(seed, sizes):
  rng = np.random.default_rng(seed)
  return [
    (rng.normal(size=(n_out, n_in)) / np.sqrt(n_in), 0.1 * rng.normal(size=n_out))
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False)
  ]


def jax_mlp(params, act="tanh"):
  """`f_late` of one view `[d_e] -> [d_l]`: hidden layers with `act`, a linear last layer."""

  def f(z):
    for i, (w, b) in enumerate(params):
      z = w @ z + b
      if i < len(params) - 1:
        z = _ACTS[act][0](z)
    return z

  return f


def np_mlp(params, act="tanh"):
  def f(z):
    for i, (w, b) in enumerate(params):
      z = w @ z + b
      if i < len(params) - 1:
        z = _ACTS[act][1](z)
    return z

  return f


def to_jax(tree, dtype=jnp.float32):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


# f_late is static: a Python callable, hashed by identity (one compilation per test).
_log_volume = jax.jit(
  density.log_volume, static_argnames=("f_late", "estimator", "num_directions", "ridge")
)
_exact = jax.jit(density.exact_log_volume, static_argnums=0)
_js = jax.jit(density.js_divergence)
_layer_js = jax.jit(density.layer_js)


# --- log-volume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("d_l, d_e", [(3, 8), (8, 3), (4, 4)])
def test_exact_linear_map(d_l, d_e):
  a = rng_normal(0, d_l, d_e)
  z_e = jnp.asarray(rng_normal(1, 5, d_e), jnp.float32)
  v = _log_volume(lambda z: jnp.asarray(a, jnp.float32) @ z, z_e, estimator="exact")
  assert v.shape == (5,) and v.dtype == jnp.float32
  np.testing.assert_allclose(v, np.full(5, np_half_logdet(a)), rtol=1e-5, atol=1e-5)


def test_exact_linear_map_on_feature_maps():
  a = rng_normal(2, 4, 2 * 3 * 2)
  z_e = jnp.asarray(rng_normal(3, 3, 2, 3, 2), jnp.float32)  # [m, h, w, c]
  v = _log_volume(lambda z: jnp.asarray(a, jnp.float32) @ z.ravel(), z_e, estimator="exact")
  np.testing.assert_allclose(v, np.full(3, np_half_logdet(a)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["tanh", "relu"])
# d_l < d_e and d_l > d_e; the hidden layer is wide enough that no view's ReLUs leave fewer than
# min(d_l, d_e) active units (that would make J rank deficient: see the ridge test).
@pytest.mark.parametrize("sizes", [(6, 16, 4), (3, 12, 5)])
def test_exact_mlp_matches_finite_difference_jacobians(act, sizes):
  params = mlp_params(4, sizes)
  z_e = rng_normal(5, 5, sizes[0])
  expected = [np_half_logdet(np_jacobian(np_mlp(params, act), z)) for z in z_e]
  v = _exact(jax_mlp(to_jax(params), act), jnp.asarray(z_e, jnp.float32))
  np.testing.assert_allclose(v, expected, rtol=1e-4, atol=1e-4)
  assert np.std(expected) > 0.01  # the views really differ


@pytest.mark.parametrize("sizes", [(6, 10, 4), (3, 8, 5)])
def test_sketch_with_all_directions_equals_exact(sizes):
  # U is a rotation of R^{d_l} for k = d_l, so Uᵀ J Jᵀ U has the determinant of J Jᵀ (and
  # Jᵀ U Uᵀ J = Jᵀ J on the other side): the constant shift of the spec is exactly 0.
  f = jax_mlp(to_jax(mlp_params(6, sizes)))
  z_e = jnp.asarray(rng_normal(7, 6, sizes[0]), jnp.float32)
  exact = _log_volume(f, z_e, estimator="exact")
  for seed in range(2):
    sketch = _log_volume(
      f, z_e, estimator="sketch", key=jax.random.key(seed), num_directions=sizes[-1]
    )
    np.testing.assert_allclose(sketch, exact, atol=2e-5)


def test_sketch_matches_numpy_projection_and_is_deterministic():
  sizes, k = (7, 9, 5), 2
  params = mlp_params(8, sizes)
  z_e = rng_normal(9, 4, sizes[0])
  key = jax.random.key(3)
  u = np.asarray(density.sketch_directions(key, dim=sizes[-1], num_directions=k), np.float64)
  np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-6)
  expected = [np_half_logdet(u.T @ np_jacobian(np_mlp(params), z)) for z in z_e]

  f = jax_mlp(to_jax(params))
  z = jnp.asarray(z_e, jnp.float32)
  sketch = lambda key: _log_volume(f, z, estimator="sketch", key=key, num_directions=k)
  v = sketch(key)
  np.testing.assert_allclose(v, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(sketch(jax.random.key(3)), v)
  assert np.max(np.abs(sketch(jax.random.key(4)) - v)) > 1e-3
  # Sketched and exact log-volumes differ by more than a constant when k < d_l.
  exact = _log_volume(f, z, estimator="exact")
  assert np.std(np.asarray(exact - v)) > 1e-3


def test_sketch_of_a_scaled_isometry_is_closed_form():
  # Rows of A orthonormal times c: Uᵀ A Aᵀ U = c² I_k, so v = k · ln c for every k and key.
  q = np.linalg.qr(rng_normal(10, 12, 6))[0].T  # [6, 12], orthonormal rows
  f = lambda z: jnp.asarray(3.0 * q, jnp.float32) @ z
  z_e = jnp.asarray(rng_normal(11, 3, 12), jnp.float32)
  for k in (2, 6):
    v = _log_volume(f, z_e, estimator="sketch", key=jax.random.key(k), num_directions=k)
    np.testing.assert_allclose(v, np.full(3, k * np.log(3.0)), rtol=1e-5)


def test_grad_norm_is_log_of_numpy_norms():
  grads = rng_normal(12, 4, 3, 2, 2)
  grads[2] = 0.0
  v = _log_volume(
    None, jnp.zeros(grads.shape), estimator="grad_norm", grads=jnp.asarray(grads, jnp.float32)
  )
  norms = np.linalg.norm(grads.reshape(4, -1), axis=1)
  np.testing.assert_allclose(np.asarray(v)[[0, 1, 3]], np.log(norms[[0, 1, 3]]), rtol=1e-6)
  # A zero gradient is floored at the smallest normal float, not -inf.
  assert float(v[2]) == pytest.approx(0.5 * np.log(np.finfo(np.float32).tiny))


def np_half_logdet_ridged(jac, ridge):
  """½ · logdet(G + ridge · tr(G)/r · I), `G` the smaller Gram side of `jac` (float64)."""
  jac = np.asarray(jac, np.float64)
  gram = jac @ jac.T if jac.shape[0] <= jac.shape[1] else jac.T @ jac
  lam = ridge * np.trace(gram) / gram.shape[0]
  sign, logdet = np.linalg.slogdet(gram + lam * np.eye(gram.shape[0]))
  assert sign > 0
  return 0.5 * logdet


def _rank_deficient(kind):
  """A linear late map `[d_l, d_e]` of lower rank than `d_l`, as ReLU networks give."""
  rng = np.random.default_rng(31)
  if kind == "zero rows":  # the reproduction: 8 × 32 with two zero rows
    w = rng.normal(size=(8, 32))
    w[[2, 5]] = 0.0
  elif kind == "dependent rows":  # rows 6, 7 are sums of others
    w = rng.normal(size=(6, 40))
    w = np.concatenate([w, w[:2] + w[2:4]])
  else:  # "wide": 16 outputs of which 5 dead, from 512 inputs
    w = rng.normal(size=(16, 512))
    w[:5] = 0.0
  return w


@pytest.mark.parametrize("kind", ["zero rows", "dependent rows", "wide"])
@pytest.mark.parametrize("ridge", [1e-6, 1e-4])
@pytest.mark.parametrize("scale", [1.0, 30.0, 0.01])
def test_rank_deficient_jacobians_match_float64_in_float32(kind, ridge, scale):
  # The plain float32 Cholesky of the (rotated) Gram was NaN or off by up to 0.2 nats here.
  w = scale * _rank_deficient(kind)
  d_l, d_e = w.shape
  z_e = jnp.asarray(rng_normal(32, 6, d_e), jnp.float32)
  f = lambda z: jnp.asarray(w, jnp.float32) @ z
  expected = np_half_logdet_ridged(w.astype(np.float32), ridge)
  exact = _log_volume(f, z_e, estimator="exact", ridge=ridge)
  key = jax.random.key(4)
  sketch = _log_volume(f, z_e, estimator="sketch", key=key, num_directions=d_l, ridge=ridge)
  # All directions: U is a rotation, so the sketch's Gram is Uᵀ (W Wᵀ) U, same determinant.
  np.testing.assert_allclose(exact, np.full(6, expected), rtol=0, atol=1e-4)
  np.testing.assert_allclose(sketch, np.full(6, expected), rtol=0, atol=1e-4)
  # Fewer directions: the projection's own float64 value.
  k = d_l // 2
  u = np.asarray(density.sketch_directions(key, dim=d_l, num_directions=k), np.float64)
  part = _log_volume(f, z_e, estimator="sketch", key=key, num_directions=k, ridge=ridge)
  np.testing.assert_allclose(
    part, np.full(6, np_half_logdet_ridged(u.T @ w.astype(np.float32), ridge)), rtol=0, atol=1e-4
  )


def test_dead_relu_units_match_float64_and_keep_gradients_finite():
  # A ReLU layer with dead units: rows of J are exactly zero at every input.
  rng = np.random.default_rng(33)
  w1, w2 = rng.normal(size=(24, 10)), rng.normal(size=(12, 24)) / 5
  b1 = np.where(np.arange(24) < 9, -100.0, 0.1)  # 9 of 24 hidden units never fire
  z_e = rng_normal(34, 5, 10)

  def make(xp, relu, dtype):
    w1_, b1_, w2_ = (xp.asarray(x, dtype) for x in (w1, b1, w2))
    return lambda z: w2_ @ relu(w1_ @ z + b1_)

  f64 = make(np, lambda x: np.maximum(x, 0.0), np.float64)
  expected = [np_half_logdet_ridged(np_jacobian(f64, z), 1e-6) for z in z_e]
  f32 = make(jnp, jax.nn.relu, jnp.float32)
  z32 = jnp.asarray(z_e, jnp.float32)
  exact = _log_volume(f32, z32, estimator="exact", ridge=1e-6)
  sketch = _log_volume(
    f32, z32, estimator="sketch", key=jax.random.key(6), num_directions=12, ridge=1e-6
  )
  np.testing.assert_allclose(exact, expected, rtol=0, atol=1e-4)
  np.testing.assert_allclose(sketch, expected, rtol=0, atol=1e-4)

  def js(w2_):
    f = lambda z: w2_ @ jax.nn.relu(jnp.asarray(w1, jnp.float32) @ z + jnp.asarray(b1, jnp.float32))
    key = jax.random.key(6)
    return density.density_js(f, z32, estimator="sketch", key=key, num_directions=12, ridge=1e-6)

  grad = jax.jit(jax.grad(js))(jnp.asarray(w2, jnp.float32))
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


@pytest.mark.parametrize("d_l, d_e", [(3, 8), (8, 3)])
def test_normalize_divides_by_the_number_of_singular_values(d_l, d_e):
  a = rng_normal(40, d_l, d_e)
  z_e = jnp.asarray(rng_normal(41, 4, d_e), jnp.float32)
  f = lambda z: jnp.asarray(a, jnp.float32) @ z
  v = density.log_volume(f, z_e, estimator="exact", normalize=True)
  np.testing.assert_allclose(v, np.full(4, np_half_logdet(a) / min(d_l, d_e)), rtol=1e-5)
  key = jax.random.key(3)
  k = min(d_l, 2)
  u = np.asarray(density.sketch_directions(key, dim=d_l, num_directions=k), np.float64)
  v = density.log_volume(f, z_e, estimator="sketch", key=key, num_directions=k, normalize=True)
  np.testing.assert_allclose(v, np.full(4, np_half_logdet(u.T @ a) / min(k, d_e)), rtol=1e-5)


def test_ridge_is_relative_to_the_gram_scale():
  # ½ logdet(G + ρ tr(G)/r I) shifts by r · log(s) when J is scaled by s: no absolute floor.
  a = rng_normal(13, 3, 2) @ rng_normal(14, 2, 5)  # [3, 5] of rank 2: J Jᵀ is singular
  z_e = jnp.asarray(rng_normal(15, 2, 5), jnp.float32)
  values = []
  for s in (1.0, 1e3):
    f = lambda z, s=s: jnp.asarray(s * a, jnp.float32) @ z
    v = _log_volume(f, z_e, estimator="exact", ridge=1e-2)
    np.testing.assert_allclose(v, np.full(2, np_half_logdet_ridged(s * a, 1e-2)), rtol=1e-5)
    values.append(float(v[0]))
  assert values[1] - values[0] == pytest.approx(3 * np.log(1e3), abs=1e-4)


# --- convolutional late map ----------------------------------------------------------------------


def np_conv_late(kernel):
  """3×3 VALID convolution `[h, w, c] -> [h-2, w-2, o]`, tanh, spatial mean: `[o]`."""

  def f(z):
    h, w = z.shape[0] - 2, z.shape[1] - 2
    out = np.zeros((h, w, kernel.shape[-1]))
    for i in range(h):
      for j in range(w):
        out[i, j] = np.einsum("abc,abco->o", z[i : i + 3, j : j + 3], kernel)
    return np.tanh(out).mean(axis=(0, 1))

  return f


def jax_conv_late(kernel):
  def f(z):
    y = jax.lax.conv_general_dilated(
      z[None], kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.tanh(y[0]).mean(axis=(0, 1))

  return f


def test_conv_map_on_feature_maps():
  kernel = rng_normal(16, 3, 3, 2, 3)
  z_e = rng_normal(17, 3, 5, 5, 2)  # [m, h, w, c]: d_e = 50, d_l = 3
  expected = [np_half_logdet(np_jacobian(np_conv_late(kernel), z)) for z in z_e]
  f = jax_conv_late(jnp.asarray(kernel, jnp.float32))
  z = jnp.asarray(z_e, jnp.float32)
  exact = _log_volume(f, z, estimator="exact")
  np.testing.assert_allclose(exact, expected, rtol=1e-4, atol=1e-4)
  sketch = _log_volume(f, z, estimator="sketch", key=jax.random.key(0), num_directions=3)
  np.testing.assert_allclose(sketch, exact, atol=2e-5)
  grad = jax.jit(
    jax.grad(
      lambda w: density.density_js(jax_conv_late(w), z, estimator="exact"),
    )
  )(jnp.asarray(kernel, jnp.float32))
  assert grad.shape == kernel.shape and np.all(np.isfinite(grad)) and np.any(grad != 0)


# --- JS divergence -------------------------------------------------------------------------------


def random_distribution(seed, m, temperature=1.0):
  return np_softmax(rng_normal(seed, m) / temperature)


@pytest.mark.parametrize("seed", range(4))
def test_js_matches_numpy_and_is_symmetric(seed):
  m = 3 + 2 * seed
  p, q = random_distribution(seed, m, 0.5), random_distribution(seed + 10, m)
  p_log, q_log = jnp.log(jnp.asarray(p, jnp.float32)), jnp.log(jnp.asarray(q, jnp.float32))
  js = _js(p_log, q_log)
  np.testing.assert_allclose(js, np_js(p, q), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(_js(q_log, p_log), js, rtol=1e-6, atol=1e-8)
  # Unnormalised log-weights are normalised first.
  np.testing.assert_allclose(_js(p_log + 3.0, q_log - 1.0), js, rtol=1e-5)


def test_js_bounds_and_extremes():
  values = []
  for seed in range(20):
    p, q = random_distribution(seed, 5, 0.2), random_distribution(seed + 50, 5, 0.2)
    values.append(float(_js(jnp.log(p), jnp.log(q))))
  assert min(values) >= 0.0 and max(values) <= LN2
  p_log = jnp.log(jnp.asarray(random_distribution(0, 6), jnp.float32))
  assert float(_js(p_log, p_log)) == pytest.approx(0.0, abs=1e-7)
  # Disjoint supports, marked by −inf: exactly ln 2, with a finite gradient.
  half = jnp.log(jnp.array([0.5, 0.5, 0.0, 0.0]))
  js, grad = jax.jit(jax.value_and_grad(density.js_divergence))(half, half[::-1])
  assert float(js) == pytest.approx(LN2, abs=1e-6)
  assert np.all(np.isfinite(grad))
  # Nearly disjoint supports approach ln 2; overlapping zeros contribute nothing.
  gaps = [
    LN2 - float(_js(jnp.array([0.0, 0.0, -s]), jnp.array([-s, -s, 0.0]))) for s in (2.0, 8.0, 30.0)
  ]
  assert gaps[0] > gaps[1] > gaps[2] and abs(gaps[2]) < 1e-6
  with_zero = jnp.array([0.0, 0.0, -jnp.inf])
  np.testing.assert_allclose(
    _js(with_zero, jnp.array([0.0, -1.0, -jnp.inf])),
    np_js([0.5, 0.5], np_softmax(np.array([0.0, -1.0]))),
    rtol=1e-5,
  )


def test_layer_js_matches_numpy_and_is_shift_and_permutation_invariant():
  v = rng_normal(18, 8)
  js = _layer_js(jnp.asarray(v, jnp.float32))
  np.testing.assert_allclose(js, np_js(np.full(8, 1 / 8), np_softmax(-v)), rtol=1e-5)
  np.testing.assert_allclose(_layer_js(jnp.asarray(v + 7.0, jnp.float32)), js, rtol=1e-5)
  perm = np.random.default_rng(19).permutation(8)
  np.testing.assert_allclose(_layer_js(jnp.asarray(v[perm], jnp.float32)), js, rtol=1e-5)
  assert float(_layer_js(jnp.full(8, 2.5))) == pytest.approx(0.0, abs=1e-7)


# --- gradients with respect to the parameters of f_late ------------------------------------------


def _finite_difference(loss, params, h=1e-6):
  """Central differences of the scalar `loss(params)` for every entry of every leaf (float64)."""
  leaves, treedef = jax.tree.flatten(params)
  grads = []
  for n, leaf in enumerate(leaves):
    grad = np.zeros(leaf.shape)
    for idx in np.ndindex(*leaf.shape):
      shifted = []
      for sign in (1.0, -1.0):
        moved = [np.array(x) for x in leaves]
        moved[n][idx] += sign * h
        shifted.append(float(loss(jax.tree.unflatten(treedef, moved))))
      grad[idx] = (shifted[0] - shifted[1]) / (2 * h)
    grads.append(grad)
  return jax.tree.unflatten(treedef, grads)


def _tree_vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _assert_trees_close(actual, expected, rtol, atol):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


# chunk = 2: the Grams of the 6 views are factorised two at a time in a loop.
@pytest.mark.parametrize("estimator, chunk", [("exact", 0), ("sketch", 0), ("sketch", 2)])
def test_js_gradient_matches_finite_differences(estimator, chunk):
  sizes = (5, 6, 3)
  params = mlp_params(20, sizes)
  z_e = rng_normal(21, 6, sizes[0])
  key = jax.random.key(5)

  @jax.jit
  def loss(params, z):
    f = jax_mlp(params)
    return density.density_js(f, z, estimator=estimator, key=key, num_directions=2, chunk=chunk)

  with jax.enable_x64(True):
    z64 = jnp.asarray(z_e, jnp.float64)
    grad64 = jax.jit(jax.grad(loss))(to_jax(params, jnp.float64), z64)
    expected = _finite_difference(lambda p: loss(p, z64), to_jax(params, jnp.float64))
  _assert_trees_close(grad64, expected, rtol=1e-5, atol=1e-8)
  assert max(np.abs(g).max() for g in jax.tree.leaves(expected)) > 1e-3
  grad32 = jax.grad(loss)(to_jax(params), jnp.asarray(z_e, jnp.float32))
  scale = max(np.abs(g).max() for g in jax.tree.leaves(expected))
  _assert_trees_close(grad32, expected, rtol=0, atol=2e-3 * scale)


def test_grad_norm_term_carries_gradient():
  sizes = (4, 5, 3)
  params = mlp_params(22, sizes)
  z_e = rng_normal(23, 6, sizes[0])

  def ssl_loss(z_l):  # couples the views, like a contrastive loss
    return jnp.sum(jnp.tanh(z_l @ z_l.T)) / z_l.shape[0]

  @jax.jit
  def loss(params, z):
    f = jax_mlp(params)
    grads = jax.grad(lambda x: ssl_loss(jax.vmap(f)(x)))(z)
    return density.density_js(None, z, estimator="grad_norm", grads=grads)

  with jax.enable_x64(True):
    z64 = jnp.asarray(z_e, jnp.float64)
    grad = jax.jit(jax.grad(loss))(to_jax(params, jnp.float64), z64)
    expected = _finite_difference(lambda p: loss(p, z64), to_jax(params, jnp.float64))
  _assert_trees_close(grad, expected, rtol=1e-5, atol=1e-8)
  assert max(np.abs(g).max() for g in jax.tree.leaves(grad)) > 1e-3


def test_hessian_vector_products_match_finite_differences():
  """The implicit hyper-gradient differentiates the inner loss twice (reverse over reverse)."""
  sizes = (4, 5, 3)
  params = mlp_params(26, sizes)
  z_e = rng_normal(27, 5, sizes[0])
  direction = mlp_params(28, sizes)
  key = jax.random.key(2)

  def loss(params, z):
    return density.density_js(jax_mlp(params), z, estimator="sketch", key=key, num_directions=2)

  grad = jax.jit(jax.grad(loss))
  with jax.enable_x64(True):
    p64, d64 = to_jax(params, jnp.float64), to_jax(direction, jnp.float64)
    z64 = jnp.asarray(z_e, jnp.float64)
    hvp = jax.jit(jax.grad(lambda p: _tree_vdot(grad(p, z64), d64)))(p64)
    h = 1e-5
    shifted = [
      grad(jax.tree.map(lambda x, d, s=s: x + s * h * d, p64, d64), z64) for s in (1.0, -1.0)
    ]
    expected = jax.tree.map(lambda a, b: (a - b) / (2 * h), *shifted)
  _assert_trees_close(hvp, expected, rtol=1e-5, atol=1e-8)


# --- tracing, errors, docs -----------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_no_retracing_for_same_shapes(estimator):
  traces = []

  @jax.jit
  def js(params, z, key):
    traces.append(z.shape)
    return density.density_js(jax_mlp(params), z, estimator=estimator, key=key, num_directions=2)

  for seed in range(3):
    params = to_jax(mlp_params(seed, (4, 5, 3)))
    z = jnp.asarray(rng_normal(seed, 6, 4), jnp.float32)
    assert np.isfinite(js(params, z, jax.random.key(seed)))
  assert len(traces) == 1


def test_bad_inputs_raise():
  f = lambda z: z[:3]
  z = jnp.ones((4, 6))
  with pytest.raises(ValueError, match=r"\(5,\)"):
    density.log_volume(f, jnp.ones(5), estimator="exact")
  with pytest.raises(ValueError, match=r"\(5,\)"):
    density.log_volume(f, jnp.ones(5), estimator="sketch", key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"d_l = 3\) from z_e \(4, 6\)"):
    density.log_volume(f, z, estimator="sketch", key=jax.random.key(0), num_directions=4)
  with pytest.raises(ValueError, match="PRNG key"):
    density.log_volume(f, z, estimator="sketch")
  with pytest.raises(ValueError, match=r"\(4, 6\), got \(4, 5\)"):
    density.log_volume(None, z, estimator="grad_norm", grads=jnp.ones((4, 5)))
  with pytest.raises(ValueError, match="got None"):
    density.log_volume(None, z, estimator="grad_norm")
  with pytest.raises(ValueError, match="exact, sketch, grad_norm"):
    density.log_volume(f, z, estimator="hutchinson")
  with pytest.raises(ValueError, match="chunk=3 must divide the number of views 4"):
    density.log_volume(f, z, estimator="exact", chunk=3)
  with pytest.raises(ValueError, match=r"\(3,\)"):
    density.grad_norm_log_volume(jnp.ones(3))
  with pytest.raises(ValueError, match=r"\(4,\) and \(5,\)"):
    density.js_divergence(jnp.zeros(4), jnp.zeros(5))
  with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 3\)"):
    density.js_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"\(2, 3\)"):
    density.layer_js(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"\[1, 3\]"):
    density.sketch_directions(jax.random.key(0), dim=3, num_directions=4)


def test_docstring_examples_run():
  results = doctest.testmod(density, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert results.attempted > 0
  assert results.failed == 0
