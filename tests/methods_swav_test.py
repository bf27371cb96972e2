"""Tests for umm_jax.methods.swav against NumPy float64 references of the official SwAV code.

References: `distributed_sinkhorn` of `facebookresearch/swav` (`main_swav.py`) on one process,
written on the transposed `[K, B]` matrix exactly as there; the swapped-prediction loop of
`main_swav.py` (codes of each assigned view against every other view, averaged), with the queue
scores prepended and the last `bs` codes kept; the queue as solo-learn shifts it (newest rows
first); the gradient of the loss with the codes held constant, in closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax import augment, methods
from umm_jax.methods import swav
from umm_jax.models import heads as heads_lib

(SWAV,) = swav.METHODS
_sinkhorn = jax.jit(swav.sinkhorn, static_argnames=("epsilon", "num_iters"))
_loss = jax.jit(swav.swav_loss, static_argnames=("temperature", "epsilon", "num_iters"))


def np_sinkhorn(scores, epsilon, num_iters):
  q = np.exp(np.asarray(scores, np.float64) / epsilon).T  # [K, B]
  k, b = q.shape
  q /= q.sum()
  for _ in range(num_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  q *= b
  return q.T


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_codes(preds, temperature, epsilon, num_iters, queue_scores=None):
  del temperature
  bs = len(preds[0])
  codes = []
  for v, out in enumerate(preds):
    out = np.asarray(out, np.float64)
    if queue_scores is not None:
      out = np.concatenate([np.asarray(queue_scores[v], np.float64), out])
    codes.append(np_sinkhorn(out, epsilon, num_iters)[-bs:])
  return codes


def np_swav_loss(s1, s2, temperature, epsilon, num_iters, queue_scores=None):
  preds = [np.asarray(s1, np.float64), np.asarray(s2, np.float64)]
  codes = np_codes(preds, temperature, epsilon, num_iters, queue_scores)
  loss = 0.0
  for crop_id, q in enumerate(codes):
    subloss = 0.0
    for v in np.delete(np.arange(len(preds)), crop_id):
      subloss -= np.mean(np.sum(q * np_log_softmax(preds[v] / temperature), axis=1))
    loss += subloss / (len(preds) - 1)
  return loss / len(codes)


def np_unit(x, axis=-1):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def cosine_scores(n, k, seed, d=8):
  return (np_unit(random((n, d), seed)) @ np_unit(random((d, k), seed + 1), axis=0)).astype(
    np.float32
  )


HP = dict(temperature=0.1, epsilon=0.05, num_iters=3)


@pytest.mark.parametrize("num_iters", [0, 1, 3])
@pytest.mark.parametrize("n, k", [(6, 10), (12, 5)])
def test_sinkhorn_matches_official_loop(n, k, num_iters):
  scores = cosine_scores(n, k, seed=n + k)
  q = _sinkhorn(scores, epsilon=0.05, num_iters=num_iters)
  assert q.shape == (n, k) and q.dtype == jnp.float32
  np.testing.assert_allclose(q, np_sinkhorn(scores, 0.05, num_iters), rtol=1e-5, atol=1e-12)


def test_sinkhorn_marginals():
  # Rows are samples: after the last row rescaling each sums to 1 (× n of the 1/n mass); columns
  # (prototypes) get mass 1/K, i.e. n/K after the scaling by n, once Sinkhorn has converged.
  n, k = 8, 5
  scores = cosine_scores(n, k, seed=3)
  for num_iters in (1, 3):
    q = np.asarray(_sinkhorn(scores, epsilon=0.05, num_iters=num_iters))
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
  q = np.asarray(_sinkhorn(scores, epsilon=0.05, num_iters=300))
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(q.sum(axis=0), n / k, rtol=1e-4)
  assert np.all(q >= 0)


def test_sinkhorn_is_shift_invariant_and_finite_for_large_scores():
  # The log domain keeps exp(scores / ε) from overflowing; the official loop would give inf.
  scores = 100.0 * cosine_scores(6, 10, seed=4)
  q = _sinkhorn(scores, epsilon=0.05, num_iters=3)
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(
    _sinkhorn(scores + 7.0, epsilon=0.05, num_iters=3), q, rtol=1e-5, atol=1e-12
  )


def test_sinkhorn_has_no_gradient():
  scores = cosine_scores(6, 10, seed=5)
  grad = jax.grad(lambda s: jnp.sum(swav.sinkhorn(s, epsilon=0.05, num_iters=3) ** 2))(scores)
  assert np.all(grad == 0)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_swav_loss_matches_numpy(temperature):
  s1, s2 = cosine_scores(6, 10, seed=6), cosine_scores(6, 10, seed=8)
  hp = {**HP, "temperature": temperature}
  loss, metrics = _loss(s1, s2, **hp)
  np.testing.assert_allclose(loss, np_swav_loss(s1, s2, **hp), rtol=1e-5)
  codes = np_codes([s1, s2], **hp)
  entropy = np.mean([-np.sum(q * np.log(q), axis=1) for q in codes])
  np.testing.assert_allclose(metrics["code_entropy"], entropy, rtol=1e-5)


def test_swav_loss_with_queue_matches_numpy():
  s1, s2 = cosine_scores(5, 7, seed=10), cosine_scores(5, 7, seed=12)
  queue_scores = np.stack([cosine_scores(9, 7, seed=14), cosine_scores(9, 7, seed=16)])
  loss, _ = _loss(s1, s2, queue_scores=queue_scores, **HP)
  np.testing.assert_allclose(loss, np_swav_loss(s1, s2, queue_scores=queue_scores, **HP), rtol=1e-5)
  # The queue changes the codes, hence the loss.
  assert abs(float(loss) - np_swav_loss(s1, s2, **HP)) > 1e-4


def test_swav_loss_gradient_holds_codes_constant():
  # With the codes q constant and rows summing to 1, ∂L/∂s_v = (softmax(s_v/τ) − q_other)/(2nτ).
  n, k, tau = 6, 10, HP["temperature"]
  s1, s2 = cosine_scores(n, k, seed=18), cosine_scores(n, k, seed=20)
  queue_scores = np.stack([cosine_scores(4, k, seed=22), cosine_scores(4, k, seed=24)])
  loss = lambda a, b, qs: swav.swav_loss(a, b, queue_scores=qs, **HP)[0]
  softmax = lambda s: np.exp(np_log_softmax(np.asarray(s, np.float64) / tau))
  for qs in (None, queue_scores):
    g1, g2 = jax.grad(loss, (0, 1))(s1, s2, qs)
    q1, q2 = np_codes([s1, s2], **HP, queue_scores=qs)
    np.testing.assert_allclose(g1, (softmax(s1) - q2) / (2 * n * tau), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g2, (softmax(s2) - q1) / (2 * n * tau), rtol=1e-4, atol=1e-7)
  assert np.all(jax.grad(loss, 2)(s1, s2, queue_scores) == 0)


def test_shape_errors_name_the_shapes():
  with pytest.raises(ValueError, match=r"\(6,\)"):
    swav.sinkhorn(jnp.zeros(6), epsilon=0.05, num_iters=3)
  with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
    swav.swav_loss(jnp.zeros((4, 5)), jnp.zeros((4, 6)), **HP)
  with pytest.raises(ValueError, match=r"\(2, 3, 6\)"):
    swav.swav_loss(jnp.zeros((4, 5)), jnp.zeros((4, 5)), queue_scores=jnp.zeros((2, 3, 6)), **HP)
  with pytest.raises(ValueError, match=r"\(2, 8, 4\).*\(2, 3, 5\)"):
    swav.enqueue(jnp.zeros((2, 8, 4)), jnp.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match="view axis"):
    SWAV.objective(
      {"projection": jnp.zeros((3, 4, 8)), "prototypes": jnp.zeros((3, 8, 5))},
      None,
      {"step": jnp.zeros((), jnp.int32)},
      {**swav.DEFAULTS, "queue_size": 0},
    )


def test_registry():
  assert methods.get("swav") is SWAV
  with pytest.raises(ValueError, match="swav"):
    methods.get("swap")


def test_enqueue_is_fifo_newest_first():
  size, n, d = 8, 3, 2
  queue_np = random((2, size, d), 26)
  queue, step = jnp.asarray(queue_np), jax.jit(swav.enqueue)
  for t in range(4):  # 12 rows through 8: every old row has dropped out by the end
    z = random((2, n, d), 30 + t)
    queue = step(queue, z)
    queue_np = queue_np.copy()
    queue_np[:, n:] = queue_np[:, :-n].copy()  # solo-learn's shift
    queue_np[:, :n] = z
    np.testing.assert_array_equal(queue, queue_np)
    assert queue.shape == (2, size, d) and queue.dtype == jnp.float32


def _inputs(n, d, k, seed):
  z = np_unit(random((2, n, d), seed)).astype(np.float32)
  w = np_unit(random((d, k), seed + 1), axis=0).astype(np.float32)
  return {"projection": z, "prototypes": np.stack([w, w])}


def test_objective_without_queue_matches_numpy():
  hp = {**swav.DEFAULTS, "queue_size": 0, "num_prototypes": 7}
  state = SWAV.init_state(hp, jax.random.key(0))
  assert set(state) == {"step"}
  online = _inputs(5, 8, 7, seed=40)
  loss, metrics, new_state = jax.jit(lambda o, s: SWAV.objective(o, None, s, hp))(online, state)
  z, w = online["projection"], online["prototypes"][0]
  expected = np_swav_loss(z[0] @ w, z[1] @ w, hp["temperature"], hp["sk_epsilon"], hp["sk_iters"])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert {"z_std", "z_offdiag_corr", "code_entropy"} <= set(metrics)
  assert int(new_state["step"]) == 1


@pytest.mark.parametrize("queue_start_step", [0, 4])
def test_objective_queue_starts_when_full_and_due(queue_start_step):
  n, d, k, size = 5, 8, 7, 12  # the queue is full after ceil(12 / 5) = 3 steps
  hp = {
    **swav.DEFAULTS,
    "proj_output_dim": d,
    "num_prototypes": k,
    "queue_size": size,
    "queue_start_step": queue_start_step,
  }
  state = SWAV.init_state(hp, jax.random.key(0))
  assert state["queue"].shape == (2, size, d) and state["queue"].dtype == jnp.float32
  assert np.all(state["queue"] == 0) and state["step"].dtype == jnp.int32
  step = jax.jit(lambda o, s: SWAV.objective(o, None, s, hp))
  queue_np = np.zeros((2, size, d))
  for t in range(6):
    online = _inputs(n, d, k, seed=50 + 2 * t)
    loss, metrics, new_state = step(online, state)
    z, w = online["projection"], online["prototypes"][0]
    used = t >= max(queue_start_step, 3)
    queue_scores = np.stack([queue_np[0] @ w, queue_np[1] @ w]) if used else None
    expected = np_swav_loss(
      z[0] @ w, z[1] @ w, hp["temperature"], hp["sk_epsilon"], hp["sk_iters"], queue_scores
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=f"step {t}")
    assert float(metrics["queue_used"]) == float(used)
    queue_np = np.concatenate([z, queue_np], axis=1)[:, :size]
    np.testing.assert_allclose(new_state["queue"], queue_np, rtol=1e-6)
    assert int(new_state["step"]) == t + 1
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
      assert new.shape == old.shape and new.dtype == old.dtype
    state = new_state


def test_prototypes_are_frozen_for_the_first_steps():
  hp = {**swav.DEFAULTS, "queue_size": 0, "num_prototypes": 7, "freeze_prototypes_steps": 2}
  online = _inputs(5, 8, 7, seed=70)

  def grads(step):
    state = {"step": jnp.asarray(step, jnp.int32)}
    return jax.grad(lambda o: SWAV.objective(o, None, state, hp)[0])(online)

  for step, frozen in ((0, True), (1, True), (2, False)):
    g = grads(step)
    assert np.abs(g["projection"]).max() > 0
    assert np.all(g["prototypes"] == 0) == frozen, step


def test_heads_scores_match_prototypes_module():
  hp = {**swav.DEFAULTS, "proj_hidden_dim": 16, "proj_output_dim": 8, "num_prototypes": 7}
  module = SWAV.heads(hp)
  features = {"embedding": jnp.asarray(random((10, 24), 80))}
  variables = module.init(jax.random.key(0), features, train=False)
  out = module.apply(variables, features, train=False)
  assert set(out) == {"projection", "prototypes"}
  assert out["projection"].shape == (10, 8) and out["prototypes"].shape == (8, 7)
  np.testing.assert_allclose(np.linalg.norm(out["projection"], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["prototypes"], axis=0), 1.0, rtol=1e-5)
  projector = {key: value["projector"] for key, value in variables.items()}
  z = heads_lib.MLP((16,), 8).apply(projector, features["embedding"], train=False)
  prototypes = {"params": {"prototypes": variables["params"]["prototypes"]}}
  expected = heads_lib.Prototypes(7).apply(prototypes, z)
  np.testing.assert_allclose(out["projection"] @ out["prototypes"], expected, rtol=1e-5, atol=1e-6)


def test_declarations():
  assert SWAV.optimizer == "lars" and SWAV.target_momentum is None
  assert SWAV.recipe == "swav" and SWAV.recipe in augment.RECIPES
  d = swav.DEFAULTS
  assert (d["proj_hidden_dim"], d["proj_output_dim"], d["num_prototypes"]) == (2048, 128, 3000)
  assert (d["temperature"], d["sk_epsilon"], d["sk_iters"], d["queue_size"]) == (0.1, 0.05, 3, 3840)
