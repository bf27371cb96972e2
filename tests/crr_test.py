"""Tests for umm_jax.crr against a NumPy float64 implementation of the MCR² formulas.

The reference works on the d × d side with `np.linalg.slogdet`, a Python loop over groups and
explicit `diag(P[:, j])` matrices, exactly as the formulas are written (samples as rows).
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax import crr

_rate_reduction = jax.jit(crr.rate_reduction, static_argnames=("eps2", "normalize"))


def np_unit(z):
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def np_rate(z, eps2):
  m, d = z.shape
  return 0.5 * np.linalg.slogdet(np.eye(d) + d / (m * eps2) * z.T @ z)[1]


def np_compressed(z, p, eps2):
  m, d = z.shape
  total = 0.0
  for j in range(p.shape[1]):
    t = p[:, j].sum()
    if t == 0:
      continue
    gram = z.T @ np.diag(p[:, j]) @ z
    total += t / (2 * m) * np.linalg.slogdet(np.eye(d) + d / (t * eps2) * gram)[1]
  return total


def np_rate_reduction(z, p, eps2=0.5, normalize=True):
  z = np.asarray(z, np.float64)
  if normalize:
    z = np_unit(z)
  rate, compressed = np_rate(z, eps2), np_compressed(z, np.asarray(p, np.float64), eps2)
  return np.array([rate - compressed, rate, compressed])


def np_soft(z, tau):
  u = np_unit(np.asarray(z, np.float64))
  m = len(u)
  p = np.zeros((m, m))
  for i in range(m):
    others = [j for j in range(m) if j != i]
    s = np.array([u[i] @ u[j] for j in others]) / tau
    e = np.exp(s - s.max())
    p[i, others] = e / e.sum()
  return p


def np_instance(n):
  p = np.zeros((2 * n, n))
  for view in range(2):
    for i in range(n):
      p[view * n + i, i] = 1.0
  return p


def np_labels(labels, k):
  p = np.zeros((len(labels), k))
  p[np.arange(len(labels)), labels] = 1.0
  return p


def np_membership(kind, z, labels=None, k=None, tau=0.1):
  if kind == "soft":
    return np_soft(z, tau)
  if kind == "instance":
    return np_instance(len(z) // 2)
  return np_labels(labels, k)


def as_array(out):
  return np.array([out.delta, out.rate, out.compressed], np.float64)


def random_features(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# Spec section 2 (samples written as columns there, rows here).
_EXAMPLE_1 = np.eye(4)
_EXAMPLE_2 = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0.6, 0.8]])


@pytest.mark.parametrize(
  "z, eps2, rate, compressed",
  [
    (_EXAMPLE_1, 0.5, 2.197225, 1.609438),
    (_EXAMPLE_1, 0.1, None, None),
    (_EXAMPLE_2, 0.5, 1.527981, 1.273158),
    (_EXAMPLE_2, 0.1, 3.354066, 2.582393),
  ],
)
def test_spec_reference_values(z, eps2, rate, compressed):
  p = crr.label_membership(jnp.array([0, 0, 1, 1]), num_classes=2)
  out = as_array(_rate_reduction(jnp.asarray(z, jnp.float32), p, eps2=eps2))
  if rate is None:  # I_4 at ε² = 0.1: R = 2 ln(1 + 10), R^c = ln(1 + 20) in closed form.
    rate, compressed = 2 * np.log(11.0), np.log(21.0)
  np.testing.assert_allclose(out, [rate - compressed, rate, compressed], atol=2e-6)


@pytest.mark.parametrize("kind", ["soft", "instance", "labels"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_numpy(kind, normalize):
  z = random_features(0, 8, 6)
  labels = np.array([0, 1, 2, 0, 1, 2, 2, 0])
  p = crr.make_membership(
    kind, jnp.asarray(z), temperature=0.5, labels=jnp.asarray(labels), num_classes=3
  )
  p_ref = np_membership(kind, z, labels, 3, tau=0.5)
  np.testing.assert_allclose(p, p_ref, atol=1e-6)
  out = _rate_reduction(jnp.asarray(z), p, eps2=0.5, normalize=normalize)
  np.testing.assert_allclose(as_array(out), np_rate_reduction(z, p_ref, 0.5, normalize), rtol=2e-5)


def test_soft_membership_properties():
  z = random_features(1, 7, 3)
  p = np.asarray(crr.soft_membership(jnp.asarray(z), temperature=0.2))
  np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(np.diagonal(p), 0.0)
  # Stop-gradient: the soft membership acts as labels.
  weights = jnp.asarray(random_features(2, 7, 7))
  grad = jax.grad(lambda x: jnp.sum(crr.soft_membership(x) * weights))(jnp.asarray(z))
  np.testing.assert_array_equal(grad, 0.0)
  assert crr.instance_membership(3).shape == (6, 3)


@pytest.mark.parametrize("m, d", [(16, 3), (6, 10)])
def test_logdet_side_identity(m, d):
  # Both shapes must exercise different sides for this test to cover both code paths.
  assert crr._sample_side_is_cheaper(m, d, 2) == (d > m)
  z = random_features(2, m, d)
  labels = np.arange(m) % 2
  p = crr.label_membership(jnp.asarray(labels), num_classes=2)
  np.testing.assert_allclose(
    as_array(_rate_reduction(jnp.asarray(z), p, eps2=0.1)),
    np_rate_reduction(z, np_labels(labels, 2), 0.1),
    rtol=2e-5,
  )


@pytest.mark.parametrize("kind", ["soft", "labels"])
def test_invariance_to_rotation_and_permutation(kind):
  rng = np.random.default_rng(3)
  z = random_features(3, 10, 6)
  labels = rng.integers(0, 3, size=10)
  rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0].astype(np.float32)
  perm = rng.permutation(10)

  def rr(feats, labs):
    p = crr.make_membership(kind, jnp.asarray(feats), labels=jnp.asarray(labs), num_classes=3)
    return as_array(_rate_reduction(jnp.asarray(feats), p))

  base = rr(z, labels)
  np.testing.assert_allclose(rr(z @ rotation, labels), base, rtol=1e-5)
  np.testing.assert_allclose(rr(z[perm], labels[perm]), base, rtol=1e-5)


def _finite_difference(f, z, h):
  grad = np.zeros_like(z)
  for idx in np.ndindex(*z.shape):
    step = np.zeros_like(z)
    step[idx] = h
    grad[idx] = (f(z + step) - f(z - step)) / (2 * h)
  return grad


@pytest.mark.parametrize("kind, m, d", [("soft", 6, 4), ("soft", 4, 7), ("labels", 8, 3)])
def test_gradient_matches_finite_differences(kind, m, d):
  z = random_features(4, m, d).astype(np.float64)
  labels = (np.arange(m) % 2).astype(np.int32)
  # The membership is held fixed (stop-gradient semantics) in the reference.
  p_ref = np_membership(kind, z, labels, 2)
  expected = _finite_difference(lambda x: np_rate_reduction(x, p_ref)[0], z, 1e-6)

  def delta(x):
    p = crr.make_membership(kind, x, labels=jnp.asarray(labels), num_classes=2)
    return crr.rate_reduction(x, p).delta

  grad_fn = jax.jit(jax.grad(delta))
  with jax.enable_x64(True):
    grad64 = np.asarray(grad_fn(jnp.asarray(z)))
  np.testing.assert_allclose(grad64, expected, atol=1e-7, rtol=1e-6)
  grad32 = np.asarray(grad_fn(jnp.asarray(z, jnp.float32)))
  np.testing.assert_allclose(grad32, expected, atol=2e-4 * np.abs(expected).max())


def test_empty_and_tiny_groups_are_finite():
  z = random_features(5, 6, 4)
  labels = np.array([0, 0, 1, 1, 3, 3])  # class 2 is empty
  p = np.asarray(np_labels(labels, 5), np.float32)
  p[:, 4] = 1e-40  # a group whose weight is below the smallest normal float32
  expected = np_rate_reduction(z, np_labels(labels, 4))

  out, grad = jax.value_and_grad(lambda x: crr.rate_reduction(x, jnp.asarray(p)).delta)(
    jnp.asarray(z)
  )
  np.testing.assert_allclose(out, expected[0], rtol=1e-5)
  assert np.all(np.isfinite(grad))
  assert np.abs(np.asarray(grad)).sum() > 0


def test_soft_at_low_temperature_approaches_instance():
  n, d = 4, 8
  rng = np.random.default_rng(6)
  centers = np.eye(d)[:n]
  views = np.concatenate([centers, centers]) + 1e-3 * rng.normal(size=(2 * n, d))
  z = jnp.asarray(views, jnp.float32)
  instance = float(_rate_reduction(z, crr.instance_membership(n)).delta)
  gaps = [
    abs(float(_rate_reduction(z, crr.soft_membership(z, temperature=tau)).delta) - instance)
    for tau in (1.0, 0.01)
  ]
  assert gaps[1] < 1e-3 < gaps[0]


def test_no_retracing_for_same_shapes():
  traces = []

  @jax.jit
  def delta(z):
    traces.append(z.shape)
    return crr.rate_reduction(z, crr.soft_membership(z)).delta

  for seed in range(3):
    delta(jnp.asarray(random_features(seed, 8, 4))).block_until_ready()
  assert len(traces) == 1


def test_bad_shapes_raise():
  z = jnp.ones((8, 4))
  with pytest.raises(ValueError, match=r"\(8,\)"):
    crr.rate_reduction(jnp.ones(8), jnp.ones((8, 2)))
  with pytest.raises(ValueError, match=r"\(7, 2\)"):
    crr.rate_reduction(z, jnp.ones((7, 2)))
  with pytest.raises(ValueError, match=r"\(2, 8, 4\)"):
    crr.coding_rate(jnp.ones((2, 8, 4)))
  with pytest.raises(ValueError, match="soft, instance, labels"):
    crr.make_membership("hard", z)
  with pytest.raises(ValueError, match=r"\(7, 4\)"):
    crr.make_membership("instance", jnp.ones((7, 4)))
  with pytest.raises(ValueError, match=r"\(5,\)"):
    crr.make_membership("labels", z, labels=jnp.zeros(5, jnp.int32), num_classes=2)
  with pytest.raises(ValueError, match="integer labels"):
    crr.label_membership(jnp.zeros(4), num_classes=2)
  with pytest.raises(ValueError, match="chunk_size=5"):
    crr.dataset_rate_reduction(jnp.ones((2, 8, 4)), chunk_size=5)
  with pytest.raises(ValueError, match=r"\(16, 4\)"):
    crr.dataset_rate_reduction(jnp.ones((16, 4)), chunk_size=4, membership="instance")
  with pytest.raises(ValueError, match=r"\(3, 4\)"):
    crr.dataset_rate_reduction(jnp.ones((3, 4)), chunk_size=4)
  with pytest.raises(ValueError, match="soft, instance, labels"):
    crr.dataset_rate_reduction(z, chunk_size=4, membership="hard")


def test_vmap_over_feature_sets_equals_loop():
  stack = random_features(7, 3, 8, 5)
  labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
  p = crr.label_membership(jnp.asarray(labels), num_classes=3)
  by_labels = jax.jit(jax.vmap(crr.rate_reduction, in_axes=(0, None)))(jnp.asarray(stack), p)
  by_soft = jax.jit(jax.vmap(lambda z: crr.rate_reduction(z, crr.soft_membership(z))))(
    jnp.asarray(stack)
  )
  for i, z in enumerate(stack):
    np.testing.assert_allclose(
      [o[i] for o in by_labels], np_rate_reduction(z, np_labels(labels, 3)), rtol=2e-5
    )
    np.testing.assert_allclose(
      [o[i] for o in by_soft], np_rate_reduction(z, np_soft(z, 0.1)), rtol=2e-5
    )


@pytest.mark.parametrize("kind", ["soft", "instance", "labels"])
def test_dataset_rate_reduction_equals_mean_over_chunks(kind):
  n, d, chunk = 11, 5, 6  # 3 chunks of 3 images × 2 views; the last 2 images are dropped
  views = random_features(8, 2, n, d)
  labels = np.arange(n) % 3
  out = crr.dataset_rate_reduction(
    jnp.asarray(views),
    chunk_size=chunk,
    membership=kind,
    labels=jnp.asarray(labels),
    num_classes=3,
    batch_size=2,
  )
  per_chunk = []
  for c in range(n // (chunk // 2)):
    images = range(c * 3, c * 3 + 3)
    rows = np.stack([views[v, i] for v in range(2) for i in images])
    chunk_labels = np.array([labels[i] for _ in range(2) for i in images])
    p_ref = np_membership(kind, rows, chunk_labels, 3)
    per_chunk.append(np_rate_reduction(rows, p_ref))
  np.testing.assert_allclose(as_array(out), np.mean(per_chunk, axis=0), rtol=2e-5)


def test_dataset_rate_reduction_on_rows_drops_ragged_chunk():
  z = random_features(9, 20, 4)
  out = crr.dataset_rate_reduction(jnp.asarray(z), chunk_size=6, temperature=0.3)
  expected = np.mean(
    [np_rate_reduction(z[s : s + 6], np_soft(z[s : s + 6], 0.3)) for s in (0, 6, 12)], axis=0
  )
  np.testing.assert_allclose(as_array(out), expected, rtol=2e-5)


def test_docstring_examples_run():
  results = doctest.testmod(crr, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert results.attempted > 0
  assert results.failed == 0
