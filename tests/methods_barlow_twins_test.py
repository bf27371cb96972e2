"""Tests for umm_jax.methods.barlow_twins against a NumPy float64 port of the official loss
(`facebookresearch/barlowtwins` `main.py`: `BatchNorm1d(affine=False)` in training mode on each
view, `c = bn(z1)ᵀ bn(z2) / n`, `Σ (1 − c_ii)² + λ Σ_{i≠j} c_ij²`) and its zero-loss optimum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from umm_jax.methods import barlow_twins

BARLOW = barlow_twins.METHODS[0]
_loss = jax.jit(barlow_twins.barlow_twins_loss, static_argnames=("lambd", "scale_loss"))


def np_barlow_twins(z1, z2, *, lambd, scale_loss=1.0, eps=1e-5):
  def bn(z):  # BatchNorm1d(affine=False), training mode: biased variance, eps inside the root.
    z = np.asarray(z, np.float64)
    return (z - z.mean(0)) / np.sqrt(z.var(0) + eps)

  c = bn(z1).T @ bn(z2) / len(z1)
  on_diag = np.sum((np.diagonal(c) - 1) ** 2)
  off_diag = np.sum(c[~np.eye(len(c), dtype=bool)] ** 2)
  return scale_loss * (on_diag + lambd * off_diag)


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("lambd, scale_loss", [(0.0051, 1.0), (0.0051, 0.1), (0.5, 2.0)])
def test_barlow_twins_loss_matches_official_code(lambd, scale_loss):
  z1, z2 = random((16, 8), 0), random((16, 8), 1)
  z2 = z2 + z1  # correlated views, so both terms matter
  loss, metrics = _loss(z1, z2, lambd=lambd, scale_loss=scale_loss)
  np.testing.assert_allclose(
    loss, np_barlow_twins(z1, z2, lambd=lambd, scale_loss=scale_loss), rtol=1e-5
  )
  np.testing.assert_allclose(
    scale_loss * (metrics["on_diag"] + lambd * metrics["off_diag"]), loss, rtol=1e-6
  )


def test_loss_is_zero_for_invariant_decorrelated_unit_variance_embeddings():
  # Orthonormal, zero-mean columns scaled by sqrt(n): every dimension has (biased) variance 1,
  # the dimensions are uncorrelated, and both views agree, so C = I and the loss vanishes (up to
  # BatchNorm's eps: C_ii = 1 / (1 + eps)).
  n, d = 32, 8
  centred = random((n, d), 2)
  centred -= centred.mean(0)
  q, _ = np.linalg.qr(centred.astype(np.float64))
  z = (np.sqrt(n) * q).astype(np.float32)
  np.testing.assert_allclose(z.var(0), 1.0, rtol=1e-5)
  loss, metrics = _loss(z, z, lambd=0.0051)
  assert float(loss) < 1e-8 and float(metrics["off_diag"]) < 1e-8
  # The standardisation makes it invariant to a per-dimension affine map of either view.
  scale, shift = np.linspace(0.5, 3.0, d, dtype=np.float32), np.arange(d, dtype=np.float32)
  loss_affine, _ = _loss(z, z * scale + shift, lambd=0.0051)
  assert float(loss_affine) < 1e-8
  # A correlated copy breaks the optimum: off-diagonal terms appear.
  mixed = z.copy()
  mixed[:, 1] = (z[:, 0] + z[:, 1]) / np.sqrt(2)
  assert float(_loss(mixed, mixed, lambd=0.0051)[1]["off_diag"]) > 0.4


def test_barlow_twins_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\(8, 16\).*\(8, 15\)"):
    barlow_twins.barlow_twins_loss(jnp.zeros((8, 16)), jnp.zeros((8, 15)), lambd=0.0051)
  with pytest.raises(ValueError, match=r"\(8,\)"):
    barlow_twins.barlow_twins_loss(jnp.zeros((8,)), jnp.zeros((8,)), lambd=0.0051)


def test_heads_have_no_bias_and_objective_matches():
  hp = {**BARLOW.defaults, "proj_hidden_dim": 16, "proj_output_dim": 8}
  module = BARLOW.heads(hp)
  features = {"embedding": jnp.asarray(random((12, 10), 3))}
  variables = module.init(jax.random.key(0), features, train=False)
  dense = [k for k in flatten_dict(variables["params"]) if any("Dense" in part for part in k)]
  assert len(dense) == 3 and all(k[-1] == "kernel" for k in dense)
  out, _ = module.apply(variables, features, train=True, mutable=["batch_stats"])
  online = {"projection": out["projection"].reshape(2, 6, 8)}
  loss, metrics, state = jax.jit(lambda o: BARLOW.objective(o, None, {}, hp))(online)
  z = np.asarray(online["projection"])
  expected = np_barlow_twins(z[0], z[1], lambd=0.0051, scale_loss=0.1)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert state == {} and {"z_std", "z_offdiag_corr", "on_diag", "off_diag"} <= set(metrics)
