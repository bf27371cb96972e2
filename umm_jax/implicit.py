"""Hyper-gradients of the bi-level problem `min_θ L_out(θ*(θ))`, independent of UMM.

Parameters `θ` are any pytree of float arrays (float32 or float64). The losses are pure functions
`loss_in(w, *args_in)` and `loss_out(w, *args_out)` returning a scalar, or `(scalar, aux)` when
`has_aux_in` / `has_aux_out` is set: the positional `args` carry the batches (and, for instance,
BatchNorm state), the aux carries new BatchNorm statistics and metrics back to the caller and
receives no gradient. `v = ∇L_out(θ*)` below is the outer gradient at the inner solution, `H` a
Hessian of `L_in`, `η` the inner step size and `K` the number of inner iterations.

Modes (`HYPERGRADS`):

- `implicit` [default]: `θ*(θ)` is the proximal point
  `argmin_w L_in(w) + ‖w − θ‖² / (2η)`, i.e. the backward-Euler step `θ* = θ − η ∇L_in(θ*)`,
  approximated by `K` fixed-point iterations `w ← θ − η ∇L_in(w)` from `w = θ` (`K = 1` is the
  explicit step; the iterations converge when `η` times the Lipschitz constant of `∇L_in` is
  below 1). The optimality condition, declared with `jaxopt.implicit_diff.custom_root`, is
  `F(w, θ) = η ∇L_in(w) + w − θ = 0` (the spec's `∇L_in(w) + (w − θ)/η = 0` times `η`, so
  that `∂F/∂w = I + η H` is exactly the system below and the ridge is in its units). With
  `∂F/∂θ = −I` the chain rule gives `g = (I + η H(θ*))^{-1} v`: the backward pass solves
  `(I + η H(θ*) + ridge · I) g = v` by conjugate gradients on Hessian-vector products (no
  Hessian is built), at most `cg_maxiter` iterations, relative tolerance `cg_tol`. `H` may be
  indefinite for a network loss, so the cap matters; the residual
  `‖(I + η H + ridge · I) g − v‖` is reported (one extra HVP) with the proximal residual
  `‖θ* − θ + η ∇L_in(θ*)‖` (zero at the exact proximal point), which comes from the same JVP.
- `unrolled`: reverse-mode autodiff through `K` gradient steps `w ← w − η ∇L_in(w)` from
  `w = θ`; for `K = 1`, `g = (I − η H(θ)) v` (the paper's "quadratic gradient").
- `finite_difference`: the approximation of the UMM authors' code (Betty's DARTS mode) with
  `θ*` from `K` gradient steps: `g = v − η · [∇L_in(θ + r v) − ∇L_in(θ − r v)] / (2r)`,
  `r = fd_radius / ‖v‖` (Betty's `fd_radius = 0.01` by default). On the test network in float32
  (`tests/umm_test.py`), `finite_difference` differs from the exact `unrolled` by 1.1e-2 of `‖g‖`
  at 0.01, 1.6e-2 at 1e-3 and 4.5e-2 at 1e-4, against a whole `η` correction of 2.7e-2: a smaller
  radius crosses fewer ReLU kinks but drowns in float32 rounding, so 0.01 stays the default.
  For `K = 1` it is `unrolled` with `H(θ) v` replaced by a central difference, which is exact for
  a quadratic `L_in` and otherwise off by `r²/6 · ∇⁴L_in(θ)[v, v, v, ·]` (the third derivative of
  `∇L_in`), so `g` is off by `η` times that.

Hessian-vector products. Every mode multiplies by `H` only through `H u`, never builds `H`: the
gradient of `L_in` inside the steps and inside `F` carries a custom VJP that computes `H u` as one
JVP of the gradient (forward over reverse; `H` is symmetric), about a third of the cost of the
reverse-over-reverse product autodiff would build (a JS term's VJPs differentiated twice more).
`hessian_loss` replaces `L_in` in those products only (`finite_difference`: in the difference),
while `θ*` still steps on `∇L_in`: e.g. a UMM inner loss's `L_SSL` alone, leaving the costly JS
term out of the curvature (a Gauss–Newton-style approximation that changes `g` by `O(η · β)`; off
unless asked). Arguments `args_in` receive no gradient through these products.

The three agree to first order in `η`: `implicit` (any `K`) and `unrolled` differ by `O(η²)`,
and `finite_difference` is `unrolled` (`K = 1`) up to `η · O(r²)`. The caller discards `θ*` and
moves `θ` by its outer optimiser with `g`.

`hypergradient` traces once per mode, `num_steps`, `cg_maxiter`, loss functions and aux flags
(all static under `jit`); `eta`, `cg_ridge` and `cg_tol` may be traced. Jit it, e.g.
`jax.jit(functools.partial(hypergradient, "implicit", loss_in, loss_out, eta=0.01))`: called
eagerly, jaxopt's backward pass also computes cotangents for `eta` and `args_in`, which `jit`
removes as dead code.

References: the UMM paper (arXiv 2410.00772), Eq. 8–9; the project's reading is
`shared/spec/umm-math.md`, section 4; Blondel et al., "Efficient and Modular Implicit
Differentiation" (jaxopt); Liu et al., "DARTS" (finite-difference hyper-gradient).
"""

import functools
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

with warnings.catch_warnings():
  # jaxopt's `__init__` warns that the package is unmaintained; this module pins and tests the
  # piece it uses (`custom_root`), so the warning says nothing a user can act on.
  warnings.filterwarnings(
    "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
  )
  from jaxopt import implicit_diff

HYPERGRADS = ("implicit", "unrolled", "finite_difference")

# Defaults for direct calls; the UMM config passes its own values.
DEFAULT_CG_MAXITER = 20
DEFAULT_CG_RIDGE = 1e-4
DEFAULT_CG_TOL = 1e-5

# Betty's DARTS radius `r = 0.01 / ‖v‖`, the default of direct calls.
DEFAULT_FD_RADIUS = 0.01

Params = Any
Loss = Callable[..., Any]


class InnerSolution(NamedTuple):
  """Result of an inner solver.

  Attributes:
    theta_star: the inner solution `θ*`, a pytree like `θ`.
    loss: `L_in(θ)`, the inner loss at the starting point (no gradient flows through it).
    aux: the aux of `L_in(θ)` when `has_aux`, else None (no gradient flows through it).
  """

  theta_star: Params
  loss: jax.Array
  aux: Any


class Hypergradient(NamedTuple):
  """Result of `hypergradient`.

  Attributes:
    grad: `g ≈ dL_out(θ*(θ))/dθ`, a pytree like `θ` (same dtypes).
    theta_star: the inner solution `θ*` (the look-ahead the caller usually discards).
    metrics: scalars. Every mode: `loss_in` (`L_in(θ)`), `loss_out` (`L_out(θ*)`), `grad_norm`
      (`‖g‖`). `implicit` adds `grad_out_norm` (`‖v‖`), `cg_residual`
      (`‖(I + ηH + ridge·I) g − v‖` at `θ*`) and `inner_residual` (`‖θ* − θ + η ∇L_in(θ*)‖`);
      `finite_difference` adds `grad_out_norm` and `fd_radius` (`r`).
    aux_in: the aux of `L_in(θ)` when `has_aux_in`, else None.
    aux_out: the aux of `L_out(θ*)` when `has_aux_out`, else None.
  """

  grad: Params
  theta_star: Params
  metrics: dict[str, jax.Array]
  aux_in: Any
  aux_out: Any


def _value_and_grad(loss: Loss, has_aux: bool) -> Callable[..., tuple[jax.Array, Any, Params]]:
  """`(w, *args) -> (value, aux or None, ∇_w loss)`."""
  fn = jax.value_and_grad(loss, has_aux=has_aux)

  def value_and_grad(w, *args):
    out, grad = fn(w, *args)
    value, aux = out if has_aux else (out, None)
    return value, aux, grad

  return value_and_grad


def _grad(loss: Loss, has_aux: bool) -> Callable[..., Params]:
  """`(w, *args) -> ∇_w loss`, aux dropped."""
  fn = jax.grad(loss, has_aux=has_aux)
  return (lambda w, *args: fn(w, *args)[0]) if has_aux else fn


def _zero_cotangent(x):
  """A zero cotangent for `x` (float0 for integer and boolean leaves, as JAX expects)."""
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(np.shape(x), jax.dtypes.float0)


def _hvp_value_and_grad(
  loss: Loss, has_aux: bool, hessian_loss: Loss | None
) -> Callable[[Params, tuple], tuple[jax.Array, Any, Params]]:
  """`(w, args) -> (value, aux, ∇_w loss)` whose VJP is forward-over-reverse.

  The VJP of the gradient output with a cotangent `u` is `H u` with `H` the Hessian of
  `hessian_loss` (of `loss` when None), by one JVP of its gradient: `H` is symmetric, so `Hᵀu =
  H u`, and a JVP of the gradient costs about a third of the reverse-over-reverse VJP that
  autodiff would build. The value's cotangent adds `ct · ∇loss`; `aux` and `args` receive no
  gradient (zero cotangents), as everywhere in this module.
  """
  value_and_grad = _value_and_grad(loss, has_aux)
  hess_grad = _grad(loss if hessian_loss is None else hessian_loss, has_aux)

  @jax.custom_vjp
  def fn(w, args):
    return value_and_grad(w, *args)

  def fwd(w, args):
    out = value_and_grad(w, *args)
    return out, (w, args, out[2])

  def bwd(residuals, cotangents):
    w, args, grad = residuals
    ct_value, _, ct_grad = cotangents
    _, hvp = jax.jvp(lambda x: hess_grad(x, *args), (w,), (ct_grad,))
    ct_w = jax.tree.map(lambda h, g: h + ct_value * g, hvp, grad)
    return ct_w, jax.tree.map(_zero_cotangent, args)

  fn.defvjp(fwd, bwd)
  return fn


def _axpy(a, x: Params, y: Params) -> Params:
  """`y + a · x` leaf by leaf, in the dtypes of `y` (a float64 `a` must not promote float32)."""
  return jax.tree.map(lambda xi, yi: (yi + a * xi).astype(yi.dtype), x, y)


def solve_cg_unrolled(matvec: Callable, b: Params, *, ridge, maxiter: int, tol) -> Params:
  """Conjugate gradients on `(A + ridge · I) x = b` from `x = 0`, `maxiter` iterations unrolled.

  The iterations of `jax.scipy.sparse.linalg.cg` (jaxopt's `solve_cg`) as straight-line code: on
  XLA's CPU backend a network's Hessian-vector product inside a `while` loop ran 13× slower than
  the same product outside one (3 products of the UMM step: 83 s in `fori_loop`, 6.3 s unrolled;
  `benchmarks/umm_bench.py`). Iterations after convergence (`‖r‖ <= tol · ‖b‖`, as
  `jax.scipy`'s test) leave `x` unchanged, so the result is the same as stopping there, but every
  one of the `maxiter` products is computed. `A` must be symmetric positive definite on the
  Krylov space (the cap on iterations bounds the damage when it is not).
  """
  vdot = otu.tree_vdot
  x = jax.tree.map(jnp.zeros_like, b)
  r, p = b, b
  rs = vdot(r, r)
  bound = jnp.square(tol) * rs
  for _ in range(maxiter):
    live = rs > bound
    with jax.named_scope("implicit_cg"):  # the profile's part (benchmarks/step_profile.py)
      ap = _axpy(ridge, p, matvec(p))
    alpha = jnp.where(live, rs / jnp.where(live, vdot(p, ap), 1.0), 0.0)
    x = _axpy(alpha, p, x)
    r = _axpy(-alpha, ap, r)
    rs_new = vdot(r, r)
    beta = jnp.where(live, rs_new / jnp.where(live, rs, 1.0), 0.0)
    p = _axpy(beta, p, r)
    rs = jnp.where(live, rs_new, rs)
  return x


def _check(*, num_steps: int, eta, **positive) -> None:
  if not isinstance(num_steps, numbers.Integral) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
  if isinstance(eta, numbers.Real) and not eta > 0:
    raise ValueError(f"eta must be > 0, got {eta!r}.")
  for name, value in positive.items():
    if isinstance(value, numbers.Real) and not value >= 0:
      raise ValueError(f"{name} must be >= 0, got {value!r}.")


def explicit_steps(
  loss_in: Loss,
  theta: Params,
  *,
  eta,
  num_steps: int = 1,
  args_in: tuple = (),
  has_aux: bool = False,
  hessian_loss: Loss | None = None,
) -> InnerSolution:
  """`K` gradient steps `w ← w − η ∇L_in(w)` from `w = θ`, differentiable in `θ` by autodiff.

  Reverse mode through a step multiplies by `I − η H(w)` with forward-over-reverse Hessian-vector
  products (`H` of `hessian_loss`, default `L_in`); forward mode is not defined.

  Args:
    loss_in: `loss_in(w, *args_in)`, a scalar (or `(scalar, aux)` when `has_aux`).
    theta: the starting point `θ`, a pytree of float arrays.
    eta: the step size `η > 0` (may be traced).
    num_steps: the number of steps `K >= 1` (static).
    args_in: extra positional arguments of `loss_in` (batches); not differentiated.
    has_aux: whether `loss_in` returns `(loss, aux)`.
    hessian_loss: `hessian_loss(w, *args_in)` like `loss_in` (same aux flag), whose Hessian
      replaces `L_in`'s in the differentiation (None: `L_in`'s own); see the module docstring.

  Returns:
    `InnerSolution(theta_star=w_K, loss=L_in(θ), aux=aux of L_in(θ))`.
  """
  _check(num_steps=num_steps, eta=eta)
  value_and_grad = _hvp_value_and_grad(loss_in, has_aux, hessian_loss)
  value, aux, g = value_and_grad(theta, args_in)
  w = _axpy(-eta, g, theta)
  # Unrolled in Python (K is static and small): loop bodies run far slower on XLA's CPU backend.
  for _ in range(num_steps - 1):
    w = _axpy(-eta, value_and_grad(w, args_in)[2], w)
  return InnerSolution(w, value, aux)


def inner_solution(
  loss_in: Loss,
  theta: Params,
  *,
  eta,
  num_steps: int = 1,
  args_in: tuple = (),
  has_aux: bool = False,
  cg_maxiter: int = DEFAULT_CG_MAXITER,
  cg_ridge=DEFAULT_CG_RIDGE,
  cg_tol=DEFAULT_CG_TOL,
  hessian_loss: Loss | None = None,
) -> InnerSolution:
  """The proximal point `argmin_w L_in(w) + ‖w − θ‖²/(2η)`, implicitly differentiable in `θ`.

  `K` fixed-point iterations `w ← θ − η ∇L_in(w)` from `w = θ`. Autodiff does not go through
  them: `jaxopt.implicit_diff.custom_root` on `F(w, θ) = η ∇L_in(w) + w − θ` makes the VJP
  of `θ*` with a cotangent `v` the solution `g` of `(I + η H(θ*) + ridge · I) g = v` by
  conjugate gradients (`cg_maxiter`, `cg_ridge`, `cg_tol`), each product `H u` one JVP of the
  gradient (forward over reverse; `H` of `hessian_loss`, default `L_in`). So `jax.grad` of any
  function of `theta_star` w.r.t. `θ` is the implicit hyper-gradient.

  Args:
    loss_in: `loss_in(w, *args_in)`, a scalar (or `(scalar, aux)` when `has_aux`).
    theta: the proximal centre `θ`, a pytree of float arrays.
    eta: the proximal step `η > 0` (may be traced).
    num_steps: the number of fixed-point iterations `K >= 1` (static).
    args_in: extra positional arguments of `loss_in` (batches); not differentiated.
    has_aux: whether `loss_in` returns `(loss, aux)`.
    cg_maxiter: the cap on conjugate-gradient iterations of the backward pass (static).
    cg_ridge: `ridge >= 0` added to the diagonal of `I + η H` in the backward pass.
    cg_tol: the relative residual at which conjugate gradients stops.
    hessian_loss: `hessian_loss(w, *args_in)` like `loss_in` (same aux flag), whose Hessian
      replaces `L_in`'s in the differentiation (None: `L_in`'s own); see the module docstring.

  Returns:
    `InnerSolution(theta_star=w_K, loss=L_in(θ), aux=aux of L_in(θ))`; only `theta_star` carries
    gradient.
  """
  _check(num_steps=num_steps, eta=eta, cg_ridge=cg_ridge, cg_tol=cg_tol)
  if not isinstance(cg_maxiter, numbers.Integral) or cg_maxiter < 1:
    raise ValueError(f"cg_maxiter must be an integer >= 1, got {cg_maxiter!r}.")
  value_and_grad = _value_and_grad(loss_in, has_aux)
  grad = _grad(loss_in, has_aux)
  # jaxopt's matvec is the VJP of `optimality` in `w`: through this gradient, one JVP each.
  hvp_grad = _hvp_value_and_grad(loss_in, has_aux, hessian_loss)

  def optimality(w, theta, eta, args_in):
    return _axpy(eta, hvp_grad(w, args_in)[2], otu.tree_sub(w, theta))

  # `eta` and `args_in` are explicit arguments, not closures, as jaxopt's design expects: its
  # backward pass returns (unused) cotangents for them, which `jit` eliminates.
  @implicit_diff.custom_root(
    optimality,
    has_aux=True,
    solve=functools.partial(solve_cg_unrolled, ridge=cg_ridge, maxiter=cg_maxiter, tol=cg_tol),
  )
  def solve(init, theta, eta, args_in):
    value, aux, g = value_and_grad(init, *args_in)
    w = _axpy(-eta, g, theta)
    for _ in range(num_steps - 1):  # unrolled, as in `explicit_steps`
      w = _axpy(-eta, grad(w, *args_in), theta)
    return w, (value, aux)

  w, (value, aux) = solve(theta, theta, eta, args_in)
  return InnerSolution(w, value, aux)


def hypergradient(
  mode: str,
  loss_in: Loss,
  loss_out: Loss,
  theta: Params,
  *,
  eta,
  num_steps: int = 1,
  args_in: tuple = (),
  args_out: tuple = (),
  has_aux_in: bool = False,
  has_aux_out: bool = False,
  cg_maxiter: int = DEFAULT_CG_MAXITER,
  cg_ridge=DEFAULT_CG_RIDGE,
  cg_tol=DEFAULT_CG_TOL,
  fd_radius=DEFAULT_FD_RADIUS,
  hessian_loss: Loss | None = None,
) -> Hypergradient:
  """The hyper-gradient `g ≈ dL_out(θ*(θ))/dθ` by `mode` (see the module docstring).

  Args:
    mode: one of `HYPERGRADS` (static).
    loss_in: `loss_in(w, *args_in)`, a scalar (or `(scalar, aux)` when `has_aux_in`).
    loss_out: `loss_out(w, *args_out)`, a scalar (or `(scalar, aux)` when `has_aux_out`).
    theta: the outer parameters `θ`, a pytree of float arrays.
    eta: the inner step size `η > 0` (may be traced).
    num_steps: `K >= 1`, fixed-point iterations (`implicit`) or gradient steps (others); static.
    args_in: extra positional arguments of `loss_in`; not differentiated.
    args_out: extra positional arguments of `loss_out`; not differentiated.
    has_aux_in: whether `loss_in` returns `(loss, aux)`.
    has_aux_out: whether `loss_out` returns `(loss, aux)`.
    cg_maxiter: `implicit` only: the cap on conjugate-gradient iterations (static).
    cg_ridge: `implicit` only: `ridge >= 0` added to `I + η H`.
    cg_tol: `implicit` only: the relative residual at which conjugate gradients stops.
    fd_radius: `finite_difference` only: the difference step is `r = fd_radius / ‖v‖` (> 0).
    hessian_loss: `hessian_loss(w, *args_in)` like `loss_in` (same aux flag), whose Hessian
      replaces `L_in`'s in the differentiation (None: `L_in`'s own); see the module docstring.

  Returns:
    `Hypergradient(grad, theta_star, metrics, aux_in, aux_out)`; see its docstring.

  Raises:
    ValueError: for an unknown `mode` (the message lists `HYPERGRADS`) or an invalid scalar.
  """
  if mode not in HYPERGRADS:
    raise ValueError(f"Unknown hyper-gradient mode {mode!r}; valid modes: {', '.join(HYPERGRADS)}.")
  if isinstance(fd_radius, numbers.Real) and not fd_radius > 0:
    raise ValueError(f"fd_radius must be > 0, got {fd_radius!r}.")
  inner = dict(
    eta=eta, num_steps=num_steps, args_in=args_in, has_aux=has_aux_in, hessian_loss=hessian_loss
  )
  if mode == "implicit":
    inner.update(cg_maxiter=cg_maxiter, cg_ridge=cg_ridge, cg_tol=cg_tol)
  extra = {"fd_radius": fd_radius} if mode == "finite_difference" else {}
  return _MODES[mode](loss_in, loss_out, theta, inner, args_out, has_aux_out, **extra)


def _implicit(loss_in, loss_out, theta, inner, args_out, has_aux_out) -> Hypergradient:
  def solve(t):
    sol = inner_solution(loss_in, t, **inner)
    return sol.theta_star, sol

  theta_star, vjp, sol = jax.vjp(solve, theta, has_aux=True)
  value, aux_out, v = _value_and_grad(loss_out, has_aux_out)(theta_star, *args_out)
  (g,) = vjp(v)
  # One HVP checks the linear solve; with L_in's own Hessian its primal output is ∇L_in(θ*),
  # for the proximal residual.
  hessian_loss, args_in, eta = inner["hessian_loss"], inner["args_in"], inner["eta"]
  grad_hess = _grad(loss_in if hessian_loss is None else hessian_loss, inner["has_aux"])
  grad_star, hvp = jax.jvp(lambda w: grad_hess(w, *args_in), (theta_star,), (g,))
  residual = otu.tree_sub(_axpy(eta, hvp, _axpy(inner["cg_ridge"], g, g)), v)
  extra = dict(grad_out_norm=otu.tree_norm(v), cg_residual=otu.tree_norm(residual))
  if hessian_loss is None:
    prox_residual = _axpy(eta, grad_star, otu.tree_sub(theta_star, theta))
    extra["inner_residual"] = otu.tree_norm(prox_residual)
  return _result(g, sol, value, aux_out, extra)


def _unrolled(loss_in, loss_out, theta, inner, args_out, has_aux_out) -> Hypergradient:
  def through_steps(t):
    sol = explicit_steps(loss_in, t, **inner)
    out = loss_out(sol.theta_star, *args_out)
    value, aux_out = out if has_aux_out else (out, None)
    return value, (sol, aux_out)

  (value, (sol, aux_out)), g = jax.value_and_grad(through_steps, has_aux=True)(theta)
  return _result(g, sol, value, aux_out, {})


def _finite_difference(
  loss_in, loss_out, theta, inner, args_out, has_aux_out, fd_radius
) -> Hypergradient:
  sol = explicit_steps(loss_in, theta, **inner)
  value, aux_out, v = _value_and_grad(loss_out, has_aux_out)(sol.theta_star, *args_out)
  v_norm = otu.tree_norm(v)
  # `v = 0` gives `g = 0`, not 0/0: the difference of two equal gradients is then exactly 0.
  r = fd_radius / jnp.maximum(v_norm, jnp.finfo(v_norm.dtype).tiny)
  hessian_loss, args_in = inner["hessian_loss"], inner["args_in"]
  grad_in = _grad(loss_in if hessian_loss is None else hessian_loss, inner["has_aux"])
  diff = otu.tree_sub(grad_in(_axpy(r, v, theta), *args_in), grad_in(_axpy(-r, v, theta), *args_in))
  g = _axpy(-inner["eta"] / (2 * r), diff, v)
  return _result(g, sol, value, aux_out, dict(grad_out_norm=v_norm, fd_radius=r))


def _result(g, sol: InnerSolution, value, aux_out, extra) -> Hypergradient:
  metrics = dict(loss_in=sol.loss, loss_out=value, grad_norm=otu.tree_norm(g), **extra)
  return Hypergradient(g, sol.theta_star, metrics, sol.aux, aux_out)


_MODES = {"implicit": _implicit, "unrolled": _unrolled, "finite_difference": _finite_difference}
