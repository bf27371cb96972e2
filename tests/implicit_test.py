"""Tests for umm_jax.implicit against closed forms on quadratic (and quartic) bi-level problems.

Inner `L_in(w) = ½ wᵀAw − bᵀw` (A SPD, so `H = A`), outer `L_out(w) = ½‖Cw − d‖²`; the NumPy
float64 references are the formulas of `shared/spec/umm-math.md`, section 4:
proximal point `θ* = (I + ηA)⁻¹(θ + ηb)`, implicit `g = (I + ηA)⁻¹ Cᵀ(Cθ* − d)`, unrolled
(K = 1) `g = (I − ηA) Cᵀ(Cθ₁ − d)` with `θ₁ = θ − η(Aθ − b)`.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax import implicit

N = 4
EXACT = dict(num_steps=60, cg_maxiter=50, cg_ridge=0.0, cg_tol=1e-13)  # ηλ_max(A) = 0.3: 0.3⁶⁰


def problem(seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(N, N)))
  a = q @ np.diag([0.5, 1.0, 2.0, 3.0]) @ q.T
  return dict(
    a=a,
    b=rng.normal(size=N),
    c=rng.normal(size=(3, N)),
    d=rng.normal(size=3),
    theta=rng.normal(size=N),
  )


def loss_in(w, a, b):
  return 0.5 * w @ a @ w - b @ w


def quartic_in(w, a, b):
  return loss_in(w, a, b) + 0.25 * jnp.sum(w**4)


def loss_out(w, c, d):
  return 0.5 * jnp.sum((c @ w - d) ** 2)


# Traced eta / cg_ridge / cg_tol: one compilation per mode, loss, K, cg_maxiter and dtype.
hypergradient = jax.jit(
  implicit.hypergradient,
  static_argnums=(0, 1, 2),
  static_argnames=("num_steps", "has_aux_in", "has_aux_out", "cg_maxiter", "hessian_loss"),
)


def run(mode, p, *, inner=loss_in, dtype=jnp.float64, jit=True, **kwargs):
  cast = lambda x: jnp.asarray(x, dtype)
  return (hypergradient if jit else implicit.hypergradient)(
    mode,
    inner,
    loss_out,
    cast(p["theta"]),
    args_in=(cast(p["a"]), cast(p["b"])),
    args_out=(cast(p["c"]), cast(p["d"])),
    **kwargs,
  )


def np_prox(p, eta):
  return np.linalg.solve(np.eye(N) + eta * p["a"], p["theta"] + eta * p["b"])


def np_implicit(p, eta, ridge=0.0):
  v = p["c"].T @ (p["c"] @ np_prox(p, eta) - p["d"])
  return np.linalg.solve((1 + ridge) * np.eye(N) + eta * p["a"], v)


def np_unrolled_point(p, eta, num_steps):
  w = p["theta"]
  for _ in range(num_steps):
    w = w - eta * (p["a"] @ w - p["b"])
  return w


def np_unrolled(p, eta, num_steps=1):
  step = np.eye(N) - eta * p["a"]
  w = p["theta"]
  for _ in range(num_steps):
    w = step @ w + eta * p["b"]
  return np.linalg.matrix_power(step, num_steps) @ p["c"].T @ (p["c"] @ w - p["d"])


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def test_inner_solution_is_the_explicit_step_then_the_proximal_point():
  p, eta = problem(), 0.1
  args = (jnp.asarray(p["a"]), jnp.asarray(p["b"]))
  theta = jnp.asarray(p["theta"])
  one = implicit.inner_solution(loss_in, theta, eta=eta, args_in=args)
  np.testing.assert_allclose(one.theta_star, p["theta"] - eta * (p["a"] @ p["theta"] - p["b"]))
  np.testing.assert_allclose(one.loss, loss_in(*(np.asarray(x) for x in (theta, *args))))
  exact = implicit.inner_solution(loss_in, theta, eta=eta, num_steps=60, args_in=args)
  np.testing.assert_allclose(exact.theta_star, np_prox(p, eta), rtol=0, atol=1e-12)
  # Gradient descent from θ is another path (to argmin L_in); they agree at K = 1 only.
  steps = implicit.explicit_steps(loss_in, theta, eta=eta, num_steps=3, args_in=args)
  np.testing.assert_allclose(steps.theta_star, np_unrolled_point(p, eta, 3))


def test_implicit_matches_closed_form_and_true_solution_map():
  p, eta = problem(), 0.1
  out = run("implicit", p, eta=eta, **EXACT)
  np.testing.assert_allclose(out.grad, np_implicit(p, eta), rtol=0, atol=1e-10)
  np.testing.assert_allclose(out.theta_star, np_prox(p, eta), rtol=0, atol=1e-12)
  w = np_prox(p, eta)
  np.testing.assert_allclose(out.metrics["loss_out"], 0.5 * np.sum((p["c"] @ w - p["d"]) ** 2))
  assert out.metrics["inner_residual"] < 1e-12 and out.metrics["cg_residual"] < 1e-10

  # Central differences of the true map θ ↦ L_out(θ*(θ)).
  def true_map(theta):
    w = np.linalg.solve(np.eye(N) + eta * p["a"], theta + eta * p["b"])
    return 0.5 * np.sum((p["c"] @ w - p["d"]) ** 2)

  h, eye = 1e-6, np.eye(N)
  fd = [(true_map(p["theta"] + h * e) - true_map(p["theta"] - h * e)) / (2 * h) for e in eye]
  np.testing.assert_allclose(out.grad, fd, rtol=0, atol=1e-7)


def test_implicit_is_the_gradient_through_inner_solution():
  p, eta = problem(1), 0.2
  args = (jnp.asarray(p["a"]), jnp.asarray(p["b"]))

  def composed(theta):
    sol = implicit.inner_solution(loss_in, theta, eta=eta, args_in=args, **EXACT)
    return loss_out(sol.theta_star, p["c"], p["d"])

  g = jax.jit(jax.grad(composed))(jnp.asarray(p["theta"]))
  np.testing.assert_allclose(g, np_implicit(p, eta), rtol=0, atol=1e-10)


def test_implicit_float32_defaults():
  p, eta = problem(), 0.1
  # A strongly typed float64 eta must not promote the float32 parameters.
  out = run("implicit", p, eta=jnp.float64(eta), num_steps=60, dtype=jnp.float32)
  assert out.grad.dtype == jnp.float32 and out.theta_star.dtype == jnp.float32
  assert all(m.dtype == jnp.float32 for m in out.metrics.values())
  # The default ridge 1e-4 biases g by about 1e-4 relative.
  np.testing.assert_allclose(out.grad, np_implicit(p, eta), rtol=3e-4, atol=3e-4)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_unrolled_matches_closed_form(num_steps):
  p, eta = problem(), 0.1
  out = run("unrolled", p, eta=eta, num_steps=num_steps)
  np.testing.assert_allclose(out.grad, np_unrolled(p, eta, num_steps), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(out.theta_star, np_unrolled_point(p, eta, num_steps), atol=1e-12)


def test_finite_difference_is_exact_on_a_quadratic():
  p, eta = problem(), 0.1
  fd = run("finite_difference", p, eta=eta)
  np.testing.assert_allclose(fd.grad, np_unrolled(p, eta), rtol=0, atol=1e-10)
  np.testing.assert_allclose(fd.metrics["fd_radius"], 0.01 / fd.metrics["grad_out_norm"])


def test_finite_difference_error_is_the_third_derivative_term():
  # For L_in + ¼Σw⁴, [∇L(θ + rv) − ∇L(θ − rv)]/(2r) = Hv + r²/6 · ∇⁴L[v, v, v] = Hv + r²v³
  # exactly (∇⁴ of ¼w⁴ is 6; elementwise cube), so finite_difference − unrolled = −η r² v³ with
  # r = 0.01/‖v‖, v = ∇L_out(θ₁).
  p, eta = problem(), 0.1
  fd = run("finite_difference", p, inner=quartic_in, eta=eta)
  un = run("unrolled", p, inner=quartic_in, eta=eta)
  theta1 = p["theta"] - eta * (p["a"] @ p["theta"] - p["b"] + p["theta"] ** 3)
  v = p["c"].T @ (p["c"] @ theta1 - p["d"])
  r = 0.01 / np.linalg.norm(v)
  expected = -eta * r**2 * v**3
  np.testing.assert_allclose(fd.grad - un.grad, expected, rtol=1e-6, atol=1e-14)
  assert np.abs(expected).max() > 1e-7  # the r² term is well above float64 noise here


def test_modes_agree_to_first_order_in_eta():
  p = problem(2)
  gaps = {}
  for eta in (0.01, 0.005):
    g = {
      "implicit_k1": run("implicit", p, inner=quartic_in, eta=eta, cg_ridge=0.0, cg_tol=1e-13),
      "implicit": run("implicit", p, inner=quartic_in, eta=eta, **EXACT),
      "unrolled": run("unrolled", p, inner=quartic_in, eta=eta),
      "finite_difference": run("finite_difference", p, inner=quartic_in, eta=eta),
    }
    g = {k: np.asarray(v.grad) for k, v in g.items()}
    base = jax.grad(loss_out)(jnp.asarray(p["theta"]), p["c"], p["d"])
    gaps[eta] = {k: np.linalg.norm(v - g["unrolled"]) for k, v in g.items() if k != "unrolled"}
    gaps[eta]["fd_vs_implicit"] = np.linalg.norm(g["finite_difference"] - g["implicit"])
    gaps[eta]["first_order"] = np.linalg.norm(g["unrolled"] - base)
  ratio = {k: gaps[0.01][k] / gaps[0.005][k] for k in gaps[0.01]}
  # Each mode moves g away from ∇L_out(θ) at first order (ratio 2), so the test is not vacuous.
  assert 1.8 < ratio.pop("first_order") < 2.2, ratio
  # Finite differences differ from unrolled only by η r² v³ (exact, tested above): ratio 2.
  assert 1.8 < ratio.pop("finite_difference") < 2.2, ratio
  for name, value in ratio.items():
    assert 3.5 < value < 4.5, (name, ratio)


@pytest.mark.parametrize("mode", implicit.HYPERGRADS)
def test_pytree_params_match_flat(mode):
  p, eta = problem(), 0.1
  flat = run(mode, p, eta=eta, num_steps=3)
  tree = {"x": jnp.asarray(p["theta"][:1]), "y": jnp.asarray(p["theta"][1:])}
  unflat = lambda w: jnp.concatenate([w["x"], w["y"]])
  out = implicit.hypergradient(
    mode,
    lambda w, a, b: loss_in(unflat(w), a, b),
    lambda w, c, d: loss_out(unflat(w), c, d),
    tree,
    eta=eta,
    num_steps=3,
    args_in=(p["a"], p["b"]),
    args_out=(p["c"], p["d"]),
  )
  np.testing.assert_allclose(unflat(out.grad), flat.grad, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(unflat(out.theta_star), flat.theta_star, rtol=1e-12, atol=1e-12)
  for k, v in flat.metrics.items():
    np.testing.assert_allclose(out.metrics[k], v, rtol=1e-9, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("mode", implicit.HYPERGRADS)
def test_aux_passes_through(mode):
  p, eta = problem(), 0.1
  # An integer batch entry (labels, indices) rides along in args_in: jaxopt gives it a float0
  # cotangent.
  args_in, args_out = (p["a"], p["b"], jnp.int32(2)), (p["c"], p["d"])
  theta = jnp.asarray(p["theta"])

  def in_aux(w, a, b, k):
    return loss_in(w, a, b), {"picked": w[k], "count": jnp.int32(7)}

  out = implicit.hypergradient(
    mode,
    in_aux,
    lambda w, c, d: (loss_out(w, c, d), c @ w),
    theta,
    eta=eta,
    args_in=args_in,
    args_out=args_out,
    has_aux_in=True,
    has_aux_out=True,
  )
  plain = run(mode, p, eta=eta)
  np.testing.assert_allclose(out.grad, plain.grad, rtol=1e-12)
  assert out.aux_in["picked"] == theta[2] and out.aux_in["count"] == 7  # aux of L_in at θ
  np.testing.assert_allclose(out.aux_out, p["c"] @ np.asarray(plain.theta_star))
  assert plain.aux_in is None and plain.aux_out is None


def test_jit_does_not_retrace_and_eta_may_be_traced():
  p = problem()
  traces = []

  def counted(w, a, b):
    traces.append(1)
    return loss_in(w, a, b)

  step = jax.jit(functools.partial(implicit.hypergradient, "implicit", counted, loss_out))
  for seed, eta in ((0, 0.1), (1, 0.2)):
    q = problem(seed)
    out = step(
      q["theta"], eta=jnp.float64(eta), args_in=(p["a"], p["b"]), args_out=(p["c"], p["d"])
    )
    assert np.isfinite(out.metrics["cg_residual"])
  first = len(traces)
  step(
    problem(3)["theta"], eta=jnp.float64(0.3), args_in=(p["a"], p["b"]), args_out=(p["c"], p["d"])
  )
  assert first > 0 and len(traces) == first


def test_invalid_arguments_raise():
  p = problem()
  with pytest.raises(ValueError, match="implicit, unrolled, finite_difference"):
    run("darts", p, eta=0.1)
  with pytest.raises(ValueError, match="num_steps"):
    run("unrolled", p, eta=0.1, num_steps=0)
  with pytest.raises(ValueError, match="eta"):
    run("finite_difference", p, eta=0.0, jit=False)
  with pytest.raises(ValueError, match="cg_maxiter"):
    run("implicit", p, eta=0.1, cg_maxiter=0)
  with pytest.raises(ValueError, match="cg_ridge"):
    run("implicit", p, eta=0.1, cg_ridge=-1.0, jit=False)


def test_cg_residual_reports_maxiter_and_ridge():
  # I + ηA has condition number 1.75/1.125, so one CG iteration is not enough; ηλ_max(A) = 0.75
  # needs more fixed-point iterations to reach the proximal point.
  p, eta, exact = problem(), 0.25, {**EXACT, "num_steps": 200}
  full = run("implicit", p, eta=eta, **exact)
  capped = run("implicit", p, eta=eta, **{**exact, "cg_maxiter": 1})
  assert full.metrics["cg_residual"] < 1e-10
  assert capped.metrics["cg_residual"] > 1e3 * full.metrics["cg_residual"]
  assert capped.metrics["cg_residual"] > 1e-4
  # The reported residual is that of the system CG solved, with the ridge.
  ridged = run("implicit", p, eta=eta, **{**exact, "cg_ridge": 0.5})
  np.testing.assert_allclose(ridged.grad, np_implicit(p, eta, ridge=0.5), rtol=0, atol=1e-10)
  assert ridged.metrics["cg_residual"] < 1e-10
  assert np.linalg.norm(ridged.grad - full.grad) > 1e-2


def test_import_is_silent():
  # jaxopt warns on import that it is unmaintained; the module silences exactly that warning.
  code = "import umm_jax.implicit"
  result = subprocess.run(
    [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stderr


def test_hessian_loss_replaces_the_curvature_only():
  # L_in = quadratic + ¼Σw⁴, hessian_loss = the quadratic alone (H = A): θ* still steps on ∇L_in,
  # while every mode multiplies by A in place of ∇²L_in. Closed forms with A.
  p, eta = problem(3), 0.1
  theta1 = p["theta"] - eta * (p["a"] @ p["theta"] - p["b"] + p["theta"] ** 3)
  v = p["c"].T @ (p["c"] @ theta1 - p["d"])
  kw = dict(inner=quartic_in, eta=eta, hessian_loss=loss_in)
  un = run("unrolled", p, **kw)
  np.testing.assert_allclose(un.theta_star, theta1, atol=1e-12)
  np.testing.assert_allclose(un.grad, (np.eye(N) - eta * p["a"]) @ v, rtol=1e-10, atol=1e-12)
  fd = run("finite_difference", p, **kw)  # a central difference of a linear gradient is exact
  np.testing.assert_allclose(fd.grad, un.grad, rtol=1e-8, atol=1e-10)
  im = run("implicit", p, **kw, cg_ridge=0.0, cg_tol=1e-13, cg_maxiter=50)
  np.testing.assert_allclose(im.theta_star, theta1, atol=1e-12)
  np.testing.assert_allclose(im.grad, np.linalg.solve(np.eye(N) + eta * p["a"], v), rtol=1e-9)
  assert "inner_residual" not in im.metrics and im.metrics["cg_residual"] < 1e-9
  # Without it, the quartic's curvature 3w² is in: a different g.
  full = run("unrolled", p, inner=quartic_in, eta=eta)
  assert np.abs(np.asarray(full.grad) - np.asarray(un.grad)).max() > 1e-3


@pytest.mark.parametrize("maxiter", [2, 4, 12])
def test_unrolled_cg_matches_jax_scipy_cg(maxiter):
  # The same iterates as jax.scipy's while-loop CG; past convergence x stays where it stopped.
  rng = np.random.default_rng(11)
  q, _ = np.linalg.qr(rng.normal(size=(N, N)))
  a = q @ np.diag([0.5, 1.0, 2.0, 3.0]) @ q.T
  b = {"u": rng.normal(size=2), "v": rng.normal(size=2)}
  mat = lambda x: jnp.concatenate([x["u"], x["v"]])
  matvec = lambda x: (lambda y: {"u": y[:2], "v": y[2:]})(jnp.asarray(a) @ mat(x))
  b = jax.tree.map(jnp.asarray, b)
  for tol in (1e-3, 1e-12):
    ours = implicit.solve_cg_unrolled(matvec, b, ridge=0.1, maxiter=maxiter, tol=tol)
    ridged = lambda x: jax.tree.map(lambda p, q: p + 0.1 * q, matvec(x), x)
    ref = jax.scipy.sparse.linalg.cg(ridged, b, tol=tol, maxiter=maxiter)[0]
    np.testing.assert_allclose(mat(ours), mat(ref), rtol=1e-9, atol=1e-12)
  if maxiter >= N:  # exact in N steps in exact arithmetic
    expected = np.linalg.solve(a + 0.1 * np.eye(N), np.asarray(mat(b)))
    np.testing.assert_allclose(mat(ours), expected, rtol=1e-8)
