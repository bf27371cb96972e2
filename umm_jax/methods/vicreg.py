"""VICReg: variance, invariance and covariance terms on the two views' embeddings (Bardes et
al. 2022, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning",
arXiv:2105.04906).

Defaults follow solo-learn's CIFAR recipe (`scripts/pretrain/cifar/vicreg.yaml`): projector
Linear 2048 → BN → ReLU → Linear 2048 → BN → ReLU → Linear 2048, coefficients 25/25/1, LARS,
BYOL's asymmetric augmentations.

The variance term: the paper sums the hinge `mean_j relu(γ − std_j)` of the two views; the
official code (`facebookresearch/vicreg`, `main_vicreg.py`) and solo-learn average them, which
halves the term. `variance_halving=True` (default) is the code's version, `False` the paper's.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

DEFAULTS = {
  "proj_hidden_dim": 2048,
  "proj_output_dim": 2048,
  "sim_coeff": 25.0,
  "std_coeff": 25.0,
  "cov_coeff": 1.0,
  "variance_halving": True,
}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """VICReg's 3-layer projector."""
  hidden = hp["proj_hidden_dim"]
  return ProjectionHeads(projector=MLP((hidden, hidden), hp["proj_output_dim"]))


def _check(z: jax.Array, fn: str) -> jax.Array:
  if z.ndim != 2 or z.shape[0] < 2:
    raise ValueError(f"{fn} expects embeddings [n, d] with n >= 2, got shape {z.shape}")
  return z.astype(jnp.float32)


def variance_loss(z: jax.Array, *, gamma: float = 1.0, eps: float = 1e-4) -> jax.Array:
  """`mean_j relu(γ − sqrt(Var_j + eps))` over the dimensions of `z` `[n, d]`.

  `Var_j` is the unbiased variance of dimension j over the batch (PyTorch's `var()`).
  """
  z = _check(z, "variance_loss")
  return jnp.mean(jax.nn.relu(gamma - jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)))


def invariance_loss(z1: jax.Array, z2: jax.Array) -> jax.Array:
  """Mean squared error between paired rows of `z1` and `z2` `[n, d]`."""
  if z1.shape != z2.shape:
    raise ValueError(f"invariance_loss expects two arrays of one shape, got {z1.shape}, {z2.shape}")
  return jnp.mean((z1.astype(jnp.float32) - z2.astype(jnp.float32)) ** 2)


def covariance_loss(z: jax.Array) -> jax.Array:
  """`Σ_{i≠j} C_ij² / d` with `C` the `(n − 1)`-normalised covariance of `z` `[n, d]`."""
  z = _check(z, "covariance_loss")
  n, d = z.shape
  zc = z - z.mean(axis=0)
  cov = zc.T @ zc / (n - 1)
  return (jnp.sum(cov**2) - jnp.sum(jnp.diagonal(cov) ** 2)) / d


def vicreg_loss(
  z1: jax.Array,
  z2: jax.Array,
  *,
  sim_coeff: float = 25.0,
  std_coeff: float = 25.0,
  cov_coeff: float = 1.0,
  variance_halving: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`sim_coeff · MSE(z1, z2) + std_coeff · V + cov_coeff · (C(z1) + C(z2))`.

  `V = v(z1) + v(z2)` (the paper) or its half (the official code, `variance_halving=True`),
  `v` = `variance_loss`, `C` = `covariance_loss`.

  Args:
    z1: `[n, d]` embeddings of the first view; row i of both inputs comes from image i.
    z2: `[n, d]` embeddings of the second view.
    sim_coeff, std_coeff, cov_coeff: the three weights (λ, μ, ν in the paper).
    variance_halving: average rather than sum the two views' variance terms.

  Returns:
    `(loss, metrics)` with the unweighted `invariance`, `variance` and `covariance` terms.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
      f"vicreg_loss expects two [n, d] arrays of one shape, got {z1.shape}, {z2.shape}"
    )
  inv = invariance_loss(z1, z2)
  var = variance_loss(z1) + variance_loss(z2)
  if variance_halving:
    var = var / 2
  cov = covariance_loss(z1) + covariance_loss(z2)
  loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
  return loss, {"invariance": inv, "variance": var, "covariance": cov}


def loss_from_hp(z1: jax.Array, z2: jax.Array, hp: Mapping[str, Any]):
  """`vicreg_loss` with the coefficients read from the method's hyper-parameters."""
  keys = ("sim_coeff", "std_coeff", "cov_coeff", "variance_halving")
  return vicreg_loss(z1, z2, **{k: hp[k] for k in keys})


def objective(online, target, state, hp):
  """VICReg between the two views' projections; no target, no state."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  loss, metrics = loss_from_hp(z1, z2, hp)
  return loss, {**metrics, **base.collapse_metrics(jnp.concatenate([z1, z2]))}, state


METHODS = (
  base.Method(
    name="vicreg",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="lars",
    recipe="byol",
  ),
)
