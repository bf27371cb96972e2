"""Barlow Twins: the cross-correlation of the two views' embeddings is driven to the identity
(Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
arXiv:2103.03230).

Defaults follow solo-learn's CIFAR recipe (`scripts/pretrain/cifar/barlow.yaml`,
`solo/losses/barlow.py`): projector Linear 2048 → BN → ReLU → Linear 2048 → BN → ReLU →
Linear 2048 with no bias in any Linear layer (as the official code), λ = 0.0051, the loss
scaled by `scale_loss = 0.1` (solo-learn's choice, which only rescales the learning rate; the
paper's formula is `scale_loss = 1`), LARS, and BYOL's asymmetric augmentations. Under `jit` on
global arrays the cross-correlation covers the global batch, as the official all-reduce does.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

DEFAULTS = {"proj_hidden_dim": 2048, "proj_output_dim": 2048, "lambd": 0.0051, "scale_loss": 0.1}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """The bias-free 3-layer projector of Barlow Twins."""
  hidden = hp["proj_hidden_dim"]
  return ProjectionHeads(projector=MLP((hidden, hidden), hp["proj_output_dim"], use_bias=False))


def barlow_twins_loss(
  z1: jax.Array, z2: jax.Array, *, lambd: float, scale_loss: float = 1.0, eps: float = 1e-5
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`scale_loss · (Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²)`, `C` the views' cross-correlation.

  Each dimension is standardised over the batch as BatchNorm without affine does it (biased
  variance, `eps` inside the square root), and `C = z̃1ᵀ z̃2 / n` is `[d, d]`.

  Args:
    z1: `[n, d]` embeddings of the first view; row i of both inputs comes from image i.
    z2: `[n, d]` embeddings of the second view.
    lambd: weight λ of the redundancy-reduction (off-diagonal) term.
    scale_loss: overall factor.
    eps: BatchNorm's epsilon.

  Returns:
    `(loss, metrics)` with the unscaled `on_diag` and `off_diag` terms.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
      f"barlow_twins_loss expects two [n, d] arrays of one shape, got {z1.shape}, {z2.shape}"
    )

  def standardise(z):
    z = z.astype(jnp.float32)
    return (z - z.mean(axis=0)) / jnp.sqrt(z.var(axis=0) + eps)

  c = standardise(z1).T @ standardise(z2) / z1.shape[0]
  diag = jnp.diagonal(c)
  on_diag = jnp.sum((1 - diag) ** 2)
  off_diag = jnp.sum(c**2) - jnp.sum(diag**2)
  loss = scale_loss * (on_diag + lambd * off_diag)
  return loss, {"on_diag": on_diag, "off_diag": off_diag}


def objective(online, target, state, hp):
  """The Barlow Twins loss between the two views' projections; no target, no state."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  loss, metrics = barlow_twins_loss(z1, z2, lambd=hp["lambd"], scale_loss=hp["scale_loss"])
  return loss, {**metrics, **base.collapse_metrics(jnp.concatenate([z1, z2]))}, state


METHODS = (
  base.Method(
    name="barlow_twins",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="lars",
    recipe="byol",
  ),
)
