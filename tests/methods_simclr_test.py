"""Tests for umm_jax.methods.simclr against a NumPy float64 NT-Xent and its closed forms.

The reference follows solo-learn's formulation (`solo/losses/simclr.py`): exponentiated
similarities with a positive mask and a negative mask built from image indices, rather than
the diagonal shift the implementation uses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import simclr

_nt_xent = jax.jit(simclr.nt_xent, static_argnames="temperature")


def np_nt_xent(z1, z2, temperature):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  index = np.concatenate([np.arange(len(z1)), np.arange(len(z2))])
  sim = np.exp(z @ z.T / temperature)
  pos_mask = (index[:, None] == index[None, :]) & ~np.eye(len(z), dtype=bool)
  neg_mask = index[:, None] != index[None, :]
  pos = (sim * pos_mask).sum(1)
  neg = (sim * neg_mask).sum(1)
  return -np.mean(np.log(pos / (pos + neg)))


@pytest.mark.parametrize("temperature", [0.2, 0.5])
def test_nt_xent_matches_numpy(temperature):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 8, 16)).astype(np.float32)
  loss, metrics = _nt_xent(z1, z2, temperature=temperature)
  np.testing.assert_allclose(loss, np_nt_xent(z1, z2, temperature), rtol=1e-5)
  assert 0.0 <= metrics["contrastive_acc"] <= 1.0


def test_nt_xent_invariant_to_scale_and_joint_permutation():
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(2, 8, 16)).astype(np.float32)
  perm = rng.permutation(8)
  base_loss, _ = _nt_xent(z1, z2, temperature=0.2)
  scaled, _ = _nt_xent(3.0 * z1, 0.5 * z2, temperature=0.2)
  permuted, _ = _nt_xent(z1[perm], z2[perm], temperature=0.2)
  np.testing.assert_allclose(scaled, base_loss, rtol=1e-5)
  np.testing.assert_allclose(permuted, base_loss, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 0.05])
def test_identical_orthogonal_views_reach_closed_form(temperature):
  # Identical views, samples mutually orthogonal: every row sees its positive at cosine 1 and
  # 2n − 2 negatives at cosine 0, so ℓ = log(1 + (2n − 2) e^{−1/τ}), which → 0 as τ → 0.
  n = 6
  z = np.eye(16, dtype=np.float32)[:n] * 2.0
  loss, metrics = _nt_xent(z, z, temperature=temperature)
  expected = np.log1p((2 * n - 2) * np.exp(-1.0 / temperature))
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
  assert metrics["contrastive_acc"] == 1.0
  if temperature < 0.1:
    assert loss < 1e-7


def test_nt_xent_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\(8, 16\).*\(8, 15\)"):
    simclr.nt_xent(jnp.zeros((8, 16)), jnp.zeros((8, 15)), temperature=0.2)


def test_heads_shapes_and_objective():
  hp = {**simclr.DEFAULTS, "proj_hidden_dim": 32, "proj_output_dim": 8}
  module = simclr.METHODS[0].heads(hp)
  features = {"embedding": jnp.asarray(np.random.default_rng(2).normal(size=(12, 24)), jnp.float32)}
  variables = module.init(jax.random.key(0), features, train=False)
  out, _ = module.apply(variables, features, train=True, mutable=["batch_stats"])
  assert set(out) == {"projection"} and out["projection"].shape == (12, 8)

  online = {"projection": out["projection"].reshape(2, 6, 8)}
  step = jax.jit(lambda o, s: simclr.objective(o, None, s, hp))
  loss, metrics, state = step(online, {})
  z = np.asarray(online["projection"])
  np.testing.assert_allclose(loss, np_nt_xent(z[0], z[1], hp["temperature"]), rtol=1e-5)
  assert np.isfinite(loss) and state == {}
  assert {"z_std", "z_offdiag_corr", "contrastive_acc"} <= set(metrics)


def test_objective_rejects_missing_view_axis():
  with pytest.raises(ValueError, match="view axis"):
    simclr.objective({"projection": jnp.zeros((3, 4, 8))}, None, {}, simclr.DEFAULTS)
