"""BYOL: an online predictor regresses an EMA target's projection of the other view (Grill et al.
2020, "Bootstrap Your Own Latent", arXiv:2006.07733).

The loss is the SUM of the two symmetric terms, as in the paper (`L + L̃`) and solo-learn
(`solo/methods/byol.py`), not their mean. Heads and the momentum schedule follow solo-learn's
CIFAR recipe (`scripts/pretrain/cifar/byol.yaml`): projector and predictor
Linear 4096 → BN → ReLU → Linear 256, target momentum 0.99 → 1.0 on a cosine schedule, LARS.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

DEFAULTS = {"proj_hidden_dim": 4096, "proj_output_dim": 256, "pred_hidden_dim": 4096}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """BYOL's projector and predictor, each Linear → BN → ReLU → Linear."""
  d = hp["proj_output_dim"]
  return ProjectionHeads(
    projector=MLP((hp["proj_hidden_dim"],), d),
    predictor=MLP((hp["pred_hidden_dim"],), d),
  )


def byol_loss(p: jax.Array, z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One BYOL term: `mean_i ‖p̂_i − sg(ẑ_i)‖² = mean_i (2 − 2 cos(p_i, z_i))`.

  Args:
    p: `[n, d]` online predictions of one view.
    z: `[n, d]` target projections of the other view (no gradient reaches them).

  Returns:
    `(loss, metrics)`: the scalar loss in `[0, 4]` and `cos_sim`, the mean cosine similarity.
  """
  if p.ndim != 2 or p.shape != z.shape:
    raise ValueError(f"byol_loss expects p, z of one shape [n, d], got {p.shape}, {z.shape}")
  p = base.l2_normalize(p.astype(jnp.float32))
  z = jax.lax.stop_gradient(base.l2_normalize(z.astype(jnp.float32)))
  cos = jnp.mean(jnp.sum(p * z, axis=-1))
  return 2 - 2 * cos, {"cos_sim": cos}


def objective(online, target, state, hp):
  """`ℓ(p₁, z'₂) + ℓ(p₂, z'₁)`: each online prediction against the target's other view."""
  del hp
  if target is None:
    raise ValueError("BYOL's objective needs the target network's outputs, got target=None")
  p1, p2 = base.split_views(online["prediction"], "online['prediction']")
  t1, t2 = base.split_views(target["projection"], "target['projection']")
  loss1, m1 = byol_loss(p1, t2)
  loss2, m2 = byol_loss(p2, t1)
  metrics = jax.tree.map(lambda a, b: (a + b) / 2, m1, m2)
  z = online["projection"]
  metrics.update(base.collapse_metrics(z.reshape(-1, z.shape[-1])))
  return loss1 + loss2, metrics, state


METHODS = (
  base.Method(
    name="byol",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="lars",
    recipe="byol",
    target_momentum=(0.99, 1.0),
  ),
)
