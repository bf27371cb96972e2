"""SimCLR: NT-Xent over the global batch (Chen et al. 2020, "A Simple Framework for Contrastive
Learning of Visual Representations", arXiv:2002.05709).

Defaults follow solo-learn's CIFAR recipe (`scripts/pretrain/cifar/simclr.yaml`): projector
Linear 2048 → BN → ReLU → Linear 256, temperature 0.2 (the SimCLR paper uses 0.5 at small
batches and 0.1 at large ones), LARS. Under `jit` on global arrays the 2n × 2n similarity
matrix covers the global batch, as solo-learn's all-gather does.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

DEFAULTS = {"proj_hidden_dim": 2048, "proj_output_dim": 256, "temperature": 0.2}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """SimCLR's projector: Linear → BN → ReLU → Linear, no predictor."""
  return ProjectionHeads(projector=MLP((hp["proj_hidden_dim"],), hp["proj_output_dim"]))


def nt_xent(
  z1: jax.Array, z2: jax.Array, *, temperature: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

  The 2n L2-normalised rows of `z1` and `z2` form a 2n × 2n cosine-similarity matrix `s`. Each
  row's positive `p(i)` is the other view of the same image; its negatives are the other 2n − 2
  rows (the row itself is excluded):
    `ℓ_i = −log( exp(s_{i,p(i)}/τ) / Σ_{k≠i} exp(s_{ik}/τ) )`,
  and the loss is the mean of `ℓ_i` over all 2n rows (both directions).

  Args:
    z1: `[n, d]` embeddings of the first view; row i of both inputs comes from image i.
    z2: `[n, d]` embeddings of the second view.
    temperature: τ > 0.

  Returns:
    `(loss, metrics)`: the scalar loss and `contrastive_acc`, the fraction of rows whose
    positive is their most similar row.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(f"nt_xent expects two [n, d] arrays of one shape, got {z1.shape}, {z2.shape}")
  n = z1.shape[0]
  z = base.l2_normalize(jnp.concatenate([z1, z2]).astype(jnp.float32))
  logits = z @ z.T / temperature
  # A row's similarity with itself is neither a positive nor a negative.
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  positive = (jnp.arange(2 * n) + n) % (2 * n)
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_prob, positive[:, None], axis=1))
  acc = jnp.mean(jnp.argmax(logits, axis=-1) == positive)
  return loss, {"contrastive_acc": acc}


def objective(online, target, state, hp):
  """NT-Xent between the two views' projections; SimCLR keeps no state and no target."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  loss, metrics = nt_xent(z1, z2, temperature=hp["temperature"])
  return loss, {**metrics, **base.collapse_metrics(jnp.concatenate([z1, z2]))}, state


METHODS = (
  base.Method(
    name="simclr",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="lars",
    recipe="simclr",
  ),
)
