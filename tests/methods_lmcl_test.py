"""Tests for umm_jax.methods.lmcl against a NumPy float64 reference of the formulation in its
module docstring.

The reference loops over rows: each row's negatives are chosen by an explicit distance test,
its loss written with exponentials, and the regulariser summed pair by pair with the two hinges.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import lmcl, simclr

LMCL = lmcl.METHODS[0]
HP = dict(temperature=0.2, delta_near=0.2, delta_far=0.5, reg_weight=1.0)


def np_lmcl(z1, z2, temperature, delta_near, delta_far, reg_weight):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  m, n = len(z), len(z1)
  losses, reg = [], 0.0
  for a in range(m):
    p = (a + n) % m
    num = np.exp(z[a] @ z[p] / temperature)
    den = num
    for b in range(m):
      if b == a:
        continue
      d = (1 - z[a] @ z[b]) / 2
      reg += min(max(d - delta_near, 0.0), max(delta_far - d, 0.0))
      if b != p and d > delta_near:
        den += np.exp(z[a] @ z[b] / temperature)
    losses.append(-np.log(num / den))
  return np.mean(losses) + reg_weight * reg / (m * (m - 1))


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def clustered(seed):
  # Two clusters of images, so some pairs fall near each pole and some inside the margin.
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(2, 8))
  z = centres[np.arange(6) % 2] + 0.6 * rng.normal(size=(2, 6, 8))
  return z.astype(np.float32)


@pytest.mark.parametrize(
  "hp", [HP, {**HP, "delta_near": 0.05, "delta_far": 0.3, "reg_weight": 3.0}]
)
def test_loss_matches_numpy(hp):
  z1, z2 = clustered(0)
  loss, metrics = jax.jit(lambda a, b: lmcl.lmcl_loss(a, b, **hp))(z1, z2)
  np.testing.assert_allclose(loss, np_lmcl(z1, z2, **hp), rtol=1e-5)
  assert 0 < metrics["negative_fraction"] < 1 and 0 <= metrics["margin_fraction"] <= 1
  np.testing.assert_allclose(
    metrics["contrastive"] + hp["reg_weight"] * metrics["polarization"], loss, rtol=1e-5
  )


def test_without_margin_and_regulariser_it_is_nt_xent():
  z1, z2 = random((2, 6, 8), 1)
  loss, metrics = lmcl.lmcl_loss(
    z1, z2, temperature=0.2, delta_near=0.0, delta_far=0.5, reg_weight=0.0
  )
  np.testing.assert_allclose(loss, simclr.nt_xent(z1, z2, temperature=0.2)[0], rtol=1e-5)
  assert metrics["negative_fraction"] == 1.0


def test_polarization_is_zero_at_the_poles_and_a_tent_between():
  d = jnp.asarray([0.0, 0.2, 0.3, 0.35, 0.45, 0.5, 0.9])
  tent = lmcl.polarization(d, delta_near=0.2, delta_far=0.5)
  np.testing.assert_allclose(tent, [0, 0, 0.1, 0.15, 0.05, 0, 0], atol=1e-6)
  with pytest.raises(ValueError, match="delta_near < delta_far"):
    lmcl.polarization(d, delta_near=0.5, delta_far=0.2)


def test_invariant_to_scale_and_joint_permutation():
  z1, z2 = clustered(2)
  perm = np.random.default_rng(3).permutation(6)
  base_loss, _ = lmcl.lmcl_loss(z1, z2, **HP)
  np.testing.assert_allclose(lmcl.lmcl_loss(2 * z1, 0.3 * z2, **HP)[0], base_loss, rtol=1e-5)
  np.testing.assert_allclose(lmcl.lmcl_loss(z1[perm], z2[perm], **HP)[0], base_loss, rtol=1e-5)


def test_gradient_matches_finite_differences():
  z1, z2 = clustered(4)
  g = jax.grad(lambda a: lmcl.lmcl_loss(a, z2, **HP)[0])(z1)
  direction = random((6, 8), 5)
  h = 1e-4  # small enough that no pair crosses a hinge or the negatives' threshold
  numeric = (np_lmcl(z1 + h * direction, z2, **HP) - np_lmcl(z1 - h * direction, z2, **HP)) / (
    2 * h
  )
  np.testing.assert_allclose(np.sum(np.asarray(g) * direction), numeric, rtol=1e-3)


def test_objective_matches_numpy():
  hp = {**lmcl.DEFAULTS, "proj_output_dim": 8}
  online = {"projection": clustered(6)}
  loss, metrics, state = jax.jit(lambda o: LMCL.objective(o, None, {}, hp))(online)
  kw = {k: hp[k] for k in HP}
  np.testing.assert_allclose(loss, np_lmcl(*online["projection"], **kw), rtol=1e-5)
  assert state == {} and {"polarization", "z_std"} <= set(metrics)


def test_heads_shapes():
  hp = {**lmcl.DEFAULTS, "proj_hidden_dim": 16, "proj_output_dim": 8}
  module = LMCL.heads(hp)
  features = {"embedding": jnp.asarray(random((6, 10), 7))}
  out = module.apply(module.init(jax.random.key(0), features, train=False), features, train=False)
  assert out["projection"].shape == (6, 8) and LMCL.recipe == "simclr"
