"""SimSiam: a predictor and a stop-gradient, no negatives and no target network (Chen and He 2021,
"Exploring Simple Siamese Representation Learning", arXiv:2011.10566).

Heads as in the paper and solo-learn (`solo/methods/simsiam.py`): a 3-layer projector
(Linear → BN → ReLU, twice, then Linear → BN without affine) and a bottleneck predictor
(Linear → BN → ReLU → Linear). Dimensions follow solo-learn's CIFAR recipe
(`scripts/pretrain/cifar/simsiam.yaml`: 2048-2048-2048, predictor hidden 512, SGD). The
projector's Linear layers have no bias: each is followed by a BatchNorm that would cancel it.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

DEFAULTS = {"proj_hidden_dim": 2048, "proj_output_dim": 2048, "pred_hidden_dim": 512}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """SimSiam's 3-layer projector with an affine-free BN output and its bottleneck predictor."""
  hidden, d = hp["proj_hidden_dim"], hp["proj_output_dim"]
  return ProjectionHeads(
    projector=MLP((hidden, hidden), d, use_bias=False, last_bn=True),
    predictor=MLP((hp["pred_hidden_dim"],), d),
  )


def negative_cosine(p: jax.Array, z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`D(p, z) = −mean_i cos(p_i, sg(z_i))`, the negative cosine similarity with a stop-gradient.

  Args:
    p: `[n, d]` predictions (gradients flow).
    z: `[n, d]` targets (no gradient reaches them).

  Returns:
    `(loss, metrics)`: the scalar loss in `[−1, 1]` and `cos_sim`, the mean cosine similarity.
  """
  if p.ndim != 2 or p.shape != z.shape:
    raise ValueError(f"negative_cosine expects p, z of one shape [n, d], got {p.shape}, {z.shape}")
  p = base.l2_normalize(p.astype(jnp.float32))
  z = jax.lax.stop_gradient(base.l2_normalize(z.astype(jnp.float32)))
  cos = jnp.mean(jnp.sum(p * z, axis=-1))
  return -cos, {"cos_sim": cos}


def objective(online, target, state, hp):
  """`½ D(p₁, z₂) + ½ D(p₂, z₁)` on the online network's own projections (stop-gradient)."""
  del target, hp
  p1, p2 = base.split_views(online["prediction"], "online['prediction']")
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  loss1, m1 = negative_cosine(p1, z2)
  loss2, m2 = negative_cosine(p2, z1)
  metrics = jax.tree.map(lambda a, b: (a + b) / 2, m1, m2)
  metrics.update(base.collapse_metrics(jnp.concatenate([z1, z2])))
  return (loss1 + loss2) / 2, metrics, state


METHODS = (
  base.Method(
    name="simsiam",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="sgd",
    recipe="simsiam",
  ),
)
