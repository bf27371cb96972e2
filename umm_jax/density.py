"""Per-view log-volume of the late layers and the JS term of UMM's inner loss.

Views are ROWS: early features `z_e` are `[m, ...]`, one view per row, each view an array of
any shape (`[d_e]` pooled, `[h, w, c]` a feature map) with `d_e` entries in all. `f_late` maps
ONE view's early features to its late feature vector `[d_l]` (any output shape is flattened);
it may close over parameters, and every result here is differentiable (to any order) with
respect to them. It must treat each view on its own (BatchNorm in inference mode), since it is
vmapped over the views.
Logarithms are natural.

A ReLU network is piecewise affine, and a map lowering dimension with Jacobian `J` scales volume
by `sqrt(det(J Jᵀ))`. With the early density taken as uniform, the late feature of view `i` has
density proportional to `exp(−v_i)`, with the log-volume
`v_i = ½ · logdet(J_i J_iᵀ)`, `J_i = ∂f_late(z_e,i)/∂z_e,i` flattened to `[d_l, d_e]`.
When `d_l > d_e`, `J Jᵀ` is singular and the smaller side `½ · logdet(Jᵀ J)` is used instead:
in both cases `v_i` is the sum of the logs of the `min(d_l, d_e)` singular values of `J_i`.
Estimators (`VOLUME_ESTIMATORS`):

- `exact`: the full Jacobian of every view (`vmap` over views of `jax.jacrev`, `d_l` VJPs a
  view); for small models and tests.
- `sketch`: `k` random orthonormal output directions `U ∈ R^{d_l × k}` shared by the batch,
  `v_i ≈ ½ · logdet(Uᵀ J_i J_iᵀ U)` from `k` VJPs a view (`J` is never built). For `k = d_l`,
  `U` is a rotation and the value equals `exact` exactly (no shift); for `k < d_l` it is the
  log-volume of the map projected on `span(U)`. Redraw the key every step.
- `grad_norm`: the UMM authors' proxy `v_i = log ‖∂L_SSL/∂z_e,i‖` from the gradient of the SSL
  loss that the caller passes. Compute that gradient inside the differentiated function
  (`jax.grad(ssl_loss)(z_e)` with the parameters of `f_late` live) so the term carries gradient
  (second order); the authors' code cut it, so the term had no effect there.

Two discrete distributions over the `m` views, `P_e = 1/m` (uniform) and `P_l = softmax(−v)`,
give the inner-loss term `JS(P_e ‖ P_l)` in `[0, ln 2]` (`layer_js`, `density_js`).

Every log-determinant is of the Gram matrix on the smaller side of `J` (or of `Uᵀ J`), with the
ridge `ridge · tr(G)/r` (relative: `ridge` times the Gram's mean eigenvalue, so its effect does
not depend on the scale of `J`) added to its diagonal: the value is `½ · logdet(G + λ I)` with
`λ = ridge · tr(G)/r`, `r` the Gram's size. Computation is float32 (float64 inputs stay float64),
matrix products at HIGHEST precision, in plain XLA operations (no LAPACK call, so nothing here
can deadlock XLA's CPU thread pool beside another factorisation; see `crr`), batched over views.
The Gram squares the condition number of `J`, and a Jacobian of lower rank (dead ReLUs, linearly
dependent rows, a bottleneck) leaves `G`'s small eigenvalues to float32 rounding, about
`1e-7 · λ_max`, far above a small ridge. So the factorisation is refined once: with `X` the
inverse Cholesky factor of the rounded `G + λ I` (held constant), `½ · logdet(G + λ I) =
½ · logdet(X (G + λ I) Xᵀ) − logdet(X)` holds for any invertible triangular `X`, and
`X (G + λ I) Xᵀ = (X A)(X A)ᵀ + λ X Xᵀ` is near the identity, so its Cholesky is accurate and its
derivatives (any order, forward or reverse) are those of `½ · logdet(G + λ I)`. In float32 this
matches a float64 reference to about 1e-5 nats on rank-deficient Jacobians where the plain
Cholesky of the Gram was off by 0.2 nats or NaN (tests/density_test.py). `ridge = 0` (a Python
number, static) gives the unregularised value, for full-rank Jacobians; a ridge > 0 keeps every
value finite.

`chunk` in `(0, m)` factorises `chunk` views at a time in a loop, to bound memory.

References: the UMM paper (arXiv 2410.00772), Sec. 5.2, Lemma 1 and Theorem 5.1; the project's
reading is `shared/spec/umm-math.md`, section 3.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

VOLUME_ESTIMATORS = ("exact", "sketch", "grad_norm")

# Sketch directions when the caller does not say; configs set `umm.num_directions` explicitly.
DEFAULT_NUM_DIRECTIONS = 16

_HIGHEST = jax.lax.Precision.HIGHEST

LateMap = Callable[[jax.Array], jax.Array]


def _views(z_e: jax.Array, fn: str) -> jax.Array:
  if z_e.ndim < 2:
    raise ValueError(
      f"{fn} expects early features z_e of shape [m, ...] (one view per row, e.g. [m, d_e] or "
      f"[m, h, w, c]), got {z_e.shape}"
    )
  return z_e


def _flat_output(f_late: LateMap) -> LateMap:
  return lambda z: jnp.ravel(f_late(z))


def _cholesky(s: jax.Array) -> jax.Array:
  """Lower Cholesky factor of symmetric positive-definite `[..., r, r]`, in plain XLA operations.

  Right-looking, one column a step in a loop (differentiable to any order, forward or reverse);
  pivots are floored at the smallest normal float, so the result is always finite.
  """
  r = s.shape[-1]
  below = jnp.arange(r)
  floor = jnp.finfo(s.dtype).tiny

  def column(j, carry):
    s, factor = carry
    pivot = jnp.maximum(s[..., j, j], floor)
    col = jnp.where(below >= j, s[..., :, j], 0.0) / jnp.sqrt(pivot)[..., None]
    return s - col[..., :, None] * col[..., None, :], factor.at[..., :, j].set(col)

  return jax.lax.fori_loop(0, r, column, (s, jnp.zeros_like(s)))[1]


def _triangular_inverse(lower: jax.Array) -> jax.Array:
  """Inverse of lower-triangular `[..., r, r]` by forward substitution, in plain XLA operations."""
  r = lower.shape[-1]
  eye = jnp.eye(r, dtype=lower.dtype)
  before = jnp.arange(r)

  def row(i, x):
    known = jnp.where(before < i, lower[..., i, :], 0.0)
    rest = jnp.einsum("...k,...kc->...c", known, x, precision=_HIGHEST)
    return x.at[..., i, :].set((eye[i] - rest) / lower[..., i, i][..., None])

  return jax.lax.fori_loop(0, r, row, jnp.zeros_like(lower))


def _gram(a: jax.Array) -> jax.Array:
  return jnp.einsum("...rc,...sc->...rs", a, a, precision=_HIGHEST)


def _half_logdet_gram(
  a: jax.Array, ridge: float, chunk: int = 0, normalize: bool = False
) -> jax.Array:
  """`[m]` values `½ · logdet(G_i + λ_i I)`, `G_i` the smaller Gram of `a` `[m, r, c]`.

  `λ_i = ridge · tr(G_i)/s` for the Gram's size `s`; refined once (module docstring). `chunk` in
  `(0, m)` factorises `chunk` Grams at a time in a loop (`lax.map`, forward and backward); it must
  divide `m`. 0: all at once. `normalize` divides each value by `s`, the number of log singular
  values it sums.
  """
  m = a.shape[0]
  if chunk and chunk < m:
    if m % chunk:
      raise ValueError(f"chunk={chunk} must divide the number of views {m}")
    blocks = a.reshape(m // chunk, chunk, *a.shape[1:])
    return jax.lax.map(lambda b: _half_logdet_gram(b, ridge, 0, normalize), blocks).reshape(m)
  # Cholesky in bfloat16/float16 is unreliable; float64 is kept for finite-difference checks.
  a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
  if a.shape[1] > a.shape[2]:
    a = jnp.swapaxes(a, 1, 2)
  size = a.shape[1]
  eye = jnp.eye(size, dtype=a.dtype)
  gram = _gram(a)
  lam = ridge * jnp.trace(gram, axis1=-2, axis2=-1)[:, None, None] / size
  # X: the inverse Cholesky factor of the rounded G + λI, a constant preconditioner.
  x = jax.lax.stop_gradient(_triangular_inverse(_cholesky(gram + lam * eye)))
  xa = jnp.einsum("mrs,msc->mrc", x, a, precision=_HIGHEST)
  near_identity = _gram(xa) + (lam * _gram(x) if ridge else 0.0)
  log_diag = lambda t: jnp.sum(jnp.log(jnp.abs(jnp.diagonal(t, axis1=-2, axis2=-1))), axis=-1)
  # ½ · logdet(K) = Σ log diag(L) for K = L Lᵀ; minus logdet(X) = Σ log |diag X|.
  half_logdet = log_diag(_cholesky(near_identity)) - log_diag(x)
  return half_logdet / size if normalize else half_logdet


def exact_log_volume(
  f_late: LateMap, z_e: jax.Array, *, ridge: float = 0.0, chunk: int = 0, normalize: bool = False
) -> jax.Array:
  """Log-volume `v` `[m]` of `f_late` at each view of `z_e` `[m, ...]`, from full Jacobians.

  `v_i = ½ · logdet(J_i J_iᵀ)` with `J_i = ∂f_late(z_e,i)/∂z_e,i` `[d_l, d_e]` (`½ · logdet(J_iᵀ
  J_i)` when `d_l > d_e`). Costs `d_l` VJPs and one `[d_l, d_e]` Jacobian per view.

  Args:
    f_late: maps one view's early features (`z_e.shape[1:]`) to its late features `[d_l]`.
    z_e: early features `[m, ...]`, one view per row.
    ridge: relative ridge, `ridge · tr(G)/r` added to the Gram's diagonal (module docstring).
    chunk: Grams factorised at a time, to bound memory (0: all at once).
    normalize: divide `v_i` by the number of log singular values it sums (the Gram's size), so
      that its scale does not grow with `d_l` or `k`.

  Returns:
    `v` `[m]`, float32 (float64 for float64 Jacobians).
  """
  z_e = _views(z_e, "exact_log_volume")
  f = _flat_output(f_late)

  def jacobian(z):
    jac = jax.jacrev(f)(z)  # [d_l, *z.shape]
    return jac.reshape(jac.shape[0], -1)

  return _half_logdet_gram(jax.vmap(jacobian)(z_e), ridge, chunk, normalize)


def sketch_directions(key: jax.Array, *, dim: int, num_directions: int) -> jax.Array:
  """`num_directions` random orthonormal columns `U` `[dim, num_directions]` (QR of a Gaussian).

  The distribution is invariant under rotations of `R^dim`; `Uᵀ U = I`.
  """
  if not 1 <= num_directions <= dim:
    raise ValueError(f"num_directions must lie in [1, {dim}] for dim = {dim}, got {num_directions}")
  gaussian = jax.random.normal(key, (dim, num_directions), jnp.float32)
  return jnp.linalg.qr(gaussian)[0]


def sketch_log_volume(
  f_late: LateMap,
  z_e: jax.Array,
  *,
  key: jax.Array,
  num_directions: int = DEFAULT_NUM_DIRECTIONS,
  ridge: float = 0.0,
  chunk: int = 0,
  normalize: bool = False,
) -> jax.Array:
  """Sketched log-volume `v` `[m]` of `f_late` at each view of `z_e` `[m, ...]`.

  `v_i ≈ ½ · logdet(Uᵀ J_i J_iᵀ U)` with `U = sketch_directions(key, dim=d_l, num_directions=k)`
  shared by all views, from the `k` VJPs `Uᵀ J_i` `[k, d_e]` per view (`J_i` is never built; the
  smaller Gram side is used when `k > d_e`). Equals `exact_log_volume` for `k = d_l`.

  Args:
    f_late: maps one view's early features (`z_e.shape[1:]`) to its late features `[d_l]`.
    z_e: early features `[m, ...]`, one view per row.
    key: PRNG key for the directions; fold the step in so they change every step.
    num_directions: `k`, in `[1, d_l]`; static under `jit`.
    ridge: relative ridge, `ridge · tr(G)/r` added to the Gram's diagonal (module docstring).
    chunk: Grams factorised at a time, to bound memory (0: all at once).
    normalize: divide `v_i` by the number of log singular values it sums (the Gram's size), so
      that its scale does not grow with `d_l` or `k`.

  Returns:
    `v` `[m]`, float32 (float64 for float64 VJPs).
  """
  z_e = _views(z_e, "sketch_log_volume")
  f = _flat_output(f_late)
  late = jax.eval_shape(f_late, jax.ShapeDtypeStruct(z_e.shape[1:], z_e.dtype))
  d_l = math.prod(late.shape)
  if not 1 <= num_directions <= d_l:
    raise ValueError(
      f"sketch_log_volume needs 1 <= num_directions <= d_l, got {num_directions} for late "
      f"features of shape {late.shape} (d_l = {d_l}) from z_e {z_e.shape}"
    )
  directions = sketch_directions(key, dim=d_l, num_directions=num_directions)
  cotangents = directions.T.astype(late.dtype)  # [k, d_l]

  def projected_jacobian(z):
    _, pullback = jax.vjp(f, z)
    (rows,) = jax.vmap(pullback)(cotangents)  # [k, *z.shape] = Uᵀ J
    return rows.reshape(num_directions, -1)

  return _half_logdet_gram(jax.vmap(projected_jacobian)(z_e), ridge, chunk, normalize)


def grad_norm_log_volume(grads: jax.Array) -> jax.Array:
  """The authors' proxy log-volume `v_i = log ‖g_i‖` `[m]` for per-view gradients `g` `[m, ...]`.

  `g_i = ∂L_SSL/∂z_e,i`, e.g. `jax.grad(lambda z: ssl_loss(jax.vmap(f_late)(z)))(z_e)`; computed
  inside the function being differentiated, `v` carries gradient to the parameters of `f_late`.
  Norms are floored at the smallest normal float so that a zero gradient gives a finite value.
  """
  if grads.ndim < 2:
    raise ValueError(
      f"grad_norm_log_volume expects per-view gradients of shape [m, ...] like z_e, got "
      f"{grads.shape}"
    )
  g = grads.reshape(grads.shape[0], -1).astype(jnp.promote_types(grads.dtype, jnp.float32))
  # ½ log of the squared norm: the norm's square root has no derivative at 0.
  squared = jnp.sum(g * g, axis=1)
  return 0.5 * jnp.log(jnp.maximum(squared, jnp.finfo(g.dtype).tiny))


def log_volume(
  f_late: LateMap | None,
  z_e: jax.Array,
  *,
  estimator: str,
  key: jax.Array | None = None,
  num_directions: int = DEFAULT_NUM_DIRECTIONS,
  grads: jax.Array | None = None,
  ridge: float = 0.0,
  chunk: int = 0,
  normalize: bool = False,
) -> jax.Array:
  """Log-volume `v` `[m]` of `f_late` at the views of `z_e` `[m, ...]` by a named estimator.

  Args:
    f_late: maps one view's early features to its late features `[d_l]` (unused, may be `None`,
      for 'grad_norm').
    z_e: early features `[m, ...]`, one view per row.
    estimator: 'exact', 'sketch' or 'grad_norm' (see the module docstring); static.
    key: PRNG key of the directions, for 'sketch'.
    num_directions: `k` for 'sketch'; static.
    grads: `∂L_SSL/∂z_e` `[m, ...]` (the shape of `z_e`), for 'grad_norm'.
    ridge: relative Gram ridge for 'exact' and 'sketch'.
    chunk: Grams factorised at a time for 'exact' and 'sketch' (0: all at once).
    normalize: for 'exact' and 'sketch', `v` per log singular value (see `exact_log_volume`).

  Returns:
    `v` `[m]`; the late density of view `i` is proportional to `exp(−v_i)`.
  """
  if estimator not in VOLUME_ESTIMATORS:
    raise ValueError(
      f"Unknown volume estimator {estimator!r}; valid estimators: {', '.join(VOLUME_ESTIMATORS)}"
    )
  if estimator == "exact":
    return exact_log_volume(f_late, z_e, ridge=ridge, chunk=chunk, normalize=normalize)
  if estimator == "sketch":
    if key is None:
      raise ValueError("volume estimator 'sketch' needs a PRNG key")
    return sketch_log_volume(
      f_late,
      z_e,
      key=key,
      num_directions=num_directions,
      ridge=ridge,
      chunk=chunk,
      normalize=normalize,
    )
  if grads is None or grads.shape != z_e.shape:
    raise ValueError(
      f"volume estimator 'grad_norm' needs grads = ∂L/∂z_e of the shape of z_e {z_e.shape}, got "
      f"{None if grads is None else grads.shape}"
    )
  return grad_norm_log_volume(grads)


def js_divergence(p_log: jax.Array, q_log: jax.Array) -> jax.Array:
  """Jensen–Shannon divergence of two discrete distributions given by log-probabilities `[m]`.

  `JS(P ‖ Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M)`, `M = ½ (P + Q)`, natural log, computed in log space
  (`log M = logaddexp(log P, log Q) − ln 2`); symmetric, in `[0, ln 2]` (clipped there against
  rounding), 0 iff `P = Q`, `ln 2` iff the supports are disjoint. Inputs are normalised first
  (`log_softmax`), so unnormalised log-weights are accepted; `−inf` marks probability 0 and keeps
  the value and gradient finite. Returns a scalar.
  """
  if p_log.ndim != 1 or p_log.shape != q_log.shape:
    raise ValueError(
      f"js_divergence expects two log-probability vectors of the same shape [m], got "
      f"{p_log.shape} and {q_log.shape}"
    )
  dtype = jnp.promote_types(jnp.result_type(p_log, q_log), jnp.float32)
  p_log = jax.nn.log_softmax(p_log.astype(dtype))
  q_log = jax.nn.log_softmax(q_log.astype(dtype))
  p_in, q_in = p_log > -jnp.inf, q_log > -jnp.inf
  # Outside both supports logaddexp(−inf, −inf) has a NaN derivative: give it zeros there.
  neither = ~(p_in | q_in)
  mix_log = jnp.logaddexp(jnp.where(neither, 0.0, p_log), jnp.where(neither, 0.0, q_log))
  mix_log = mix_log - math.log(2.0)

  def kl_to_mixture(a_log, a_in):
    # 0 · log 0 = 0; the safe log keeps 0 · (−inf) out of the value and the gradient.
    safe = jnp.where(a_in, a_log, 0.0)
    return jnp.sum(jnp.where(a_in, jnp.exp(safe) * (safe - mix_log), 0.0))

  js = 0.5 * (kl_to_mixture(p_log, p_in) + kl_to_mixture(q_log, q_in))
  return jnp.clip(js, 0.0, math.log(2.0))


def layer_js(v: jax.Array) -> jax.Array:
  """`JS(P_e ‖ P_l)` for log-volumes `v` `[m]`: `P_e = 1/m` uniform, `P_l = softmax(−v)`.

  The UMM inner-loss term (spec section 3); invariant to adding a constant to `v`. Scalar.
  """
  if v.ndim != 1:
    raise ValueError(f"layer_js expects log-volumes v of shape [m], got {v.shape}")
  dtype = jnp.promote_types(v.dtype, jnp.float32)
  uniform_log = jnp.full(v.shape, -math.log(v.shape[0]), dtype)
  return js_divergence(uniform_log, -v.astype(dtype))


def density_js(
  f_late: LateMap | None,
  z_e: jax.Array,
  *,
  estimator: str,
  key: jax.Array | None = None,
  num_directions: int = DEFAULT_NUM_DIRECTIONS,
  grads: jax.Array | None = None,
  ridge: float = 0.0,
  chunk: int = 0,
  normalize: bool = False,
) -> jax.Array:
  """`JS(P_e ‖ P_l)` of a batch: `layer_js(log_volume(f_late, z_e, estimator=..., ...))`.

  Arguments as in `log_volume`; differentiable with respect to the parameters `f_late` closes
  over (and, for 'grad_norm', those behind `grads`). Returns a scalar in `[0, ln 2]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from umm_jax import density
    >>> f_late = lambda z: z[:2] * z[2]  # [4] -> [2]; at z = s·1, J J^T = s^4 [[2, 1], [1, 2]]
    >>> z_e = jnp.array([1.0, 2.0, 1.0, 2.0])[:, None] * jnp.ones((4, 4))
    >>> v = density.log_volume(f_late, z_e, estimator="exact")  # ½ ln 3 + 2 ln s
    >>> print(" ".join(f"{x:.4f}" for x in v))
    0.5493 1.9356 0.5493 1.9356
    >>> print(f"{density.density_js(f_late, z_e, estimator='exact'):.4f}")  # P_l = .4 .1 .4 .1
    0.0507
  """
  v = log_volume(
    f_late,
    z_e,
    estimator=estimator,
    key=key,
    num_directions=num_directions,
    grads=grads,
    ridge=ridge,
    chunk=chunk,
    normalize=normalize,
  )
  return layer_js(v)
