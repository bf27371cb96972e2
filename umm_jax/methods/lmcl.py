"""LMCL: large-margin contrastive learning with a distance polarization regularizer (Chen, Niu,
Gong, Li, Yang and Sugiyama 2021, "Large-Margin Contrastive Learning with Distance Polarization
Regularizer", ICML 2021, PMLR 139:1673-1683).

The paper's idea: normalised pairwise distances should sit at two poles — small for pairs of the
same latent cluster, large for pairs of different clusters — with an empty margin `(δ₊, δ₋)`
between them, and only inter-cluster pairs should be pushed apart. Its authors published no code,
and the exact weighting of its objective (Eq. 9, solved with Adam in its Algorithm 1) could not be
retrieved here, so this module implements the following formulation of that idea, on SimCLR's
framework as the paper's experiments are:

- the `2n` L2-normalised projections `ẑ_a` of both views, cosine similarities `s_ab`, and
  normalised distances `d_ab = ‖ẑ_a − ẑ_b‖² / 4 = (1 − s_ab) / 2 ∈ [0, 1]`;
- the contrastive term: NT-Xent in which the negatives of row `a` are the rows `b ∉ {a, p(a)}`
  with `d_ab > δ₊`, i.e. pairs already at the intra-cluster pole are not pushed apart (the mask
  carries no gradient); `p(a)` is the other view of the same image:
  `ℓ_a = −log(e^{s_{a,p(a)}/τ} / (e^{s_{a,p(a)}/τ} + Σ_{b negative} e^{s_ab/τ}))`;
- the distance polarization regulariser, zero at both poles and positive inside the margin:
  `R = mean_{a≠b} min([d_ab − δ₊]₊, [δ₋ − d_ab]₊)`;
- `L = mean_a ℓ_a + λ · R`.

Defaults (this module's, not the paper's): τ = 0.2 and SimCLR's heads (solo-learn's CIFAR
recipe), δ₊ = 0.2 (cosine ≥ 0.6), δ₋ = 0.5 (orthogonal or beyond: in high dimension most
unrelated unit vectors can at best be orthogonal), λ = 1.
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
  "proj_output_dim": 256,
  "temperature": 0.2,
  "delta_near": 0.2,
  "delta_far": 0.5,
  "reg_weight": 1.0,
}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """SimCLR's projector: Linear → BN → ReLU → Linear."""
  return ProjectionHeads(projector=MLP((hp["proj_hidden_dim"],), hp["proj_output_dim"]))


def polarization(d: jax.Array, *, delta_near: float, delta_far: float) -> jax.Array:
  """`min([d − δ₊]₊, [δ₋ − d]₊)` elementwise: 0 outside the margin `(δ₊, δ₋)`, a tent inside."""
  if not 0 <= delta_near < delta_far <= 1:
    raise ValueError(f"need 0 <= delta_near < delta_far <= 1, got {delta_near}, {delta_far}")
  return jnp.minimum(jax.nn.relu(d - delta_near), jax.nn.relu(delta_far - d))


def lmcl_loss(
  z1: jax.Array,
  z2: jax.Array,
  *,
  temperature: float,
  delta_near: float,
  delta_far: float,
  reg_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`mean_a ℓ_a + λ R` of the module docstring.

  Args:
    z1, z2: `[n, d]` projections of the two views; row i of both from image i.
    temperature: τ > 0.
    delta_near, delta_far: the margin `(δ₊, δ₋)` of normalised distances, `0 <= δ₊ < δ₋ <= 1`.
    reg_weight: λ >= 0.

  Returns:
    `(loss, metrics)`: metrics `contrastive` (the mean ℓ), `polarization` (R), `margin_fraction`
    (pairs inside the margin) and `negative_fraction` (candidate negatives kept).
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
      f"lmcl_loss expects two [n, d] arrays of one shape, got {z1.shape}, {z2.shape}"
    )
  n = z1.shape[0]
  z = base.l2_normalize(jnp.concatenate([z1, z2]).astype(jnp.float32))
  sim = z @ z.T
  dist = (1.0 - sim) / 2
  eye = jnp.eye(2 * n, dtype=bool)
  positive = (jnp.arange(2 * n) + n) % (2 * n)
  is_positive = jnp.arange(2 * n)[None, :] == positive[:, None]
  negative = ~eye & ~is_positive & jax.lax.stop_gradient(dist > delta_near)
  logits = sim / temperature
  pos_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)
  denominator = jnp.where(negative | is_positive, logits, -jnp.inf)
  contrastive = jnp.mean(jax.nn.logsumexp(denominator, axis=1) - pos_logit[:, 0])
  tent = polarization(dist, delta_near=delta_near, delta_far=delta_far)
  off_diagonal = 2 * n * (2 * n - 1)
  reg = jnp.sum(jnp.where(eye, 0.0, tent)) / off_diagonal
  in_margin = ~eye & (dist > delta_near) & (dist < delta_far)
  metrics = {
    "contrastive": contrastive,
    "polarization": reg,
    "margin_fraction": in_margin.sum() / off_diagonal,
    "negative_fraction": negative.sum() / (2 * n * (2 * n - 2)),
  }
  return contrastive + reg_weight * reg, metrics


def objective(online, target, state, hp):
  """LMCL between the two views' projections; no state, no target."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  loss, metrics = lmcl_loss(
    z1,
    z2,
    temperature=hp["temperature"],
    delta_near=hp["delta_near"],
    delta_far=hp["delta_far"],
    reg_weight=hp["reg_weight"],
  )
  return loss, {**metrics, **base.collapse_metrics(jnp.concatenate([z1, z2]))}, state


METHODS = (
  base.Method(
    name="lmcl",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="lars",
    recipe="simclr",
  ),
)
