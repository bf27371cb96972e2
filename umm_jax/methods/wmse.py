"""W-MSE: the MSE of whitened embeddings (Ermolov et al. 2021, "Whitening for Self-Supervised
Representation Learning", arXiv:2007.06346).

Follows the official code (`htdt/self-supervised`, `methods/w_mse.py`, `methods/whitening.py`)
with its CIFAR settings: projector Linear 1024 → BN → ReLU → Linear 64, Adam, SimCLR-style
augmentations. The batch of each view is cut into sub-batches of `w_size` embeddings; each
sub-batch of each view is whitened on its own (centred, then multiplied by the inverse Cholesky
factor of its covariance, shrunk towards the identity by `w_eps`), and the loss is the mean of
`2 − 2 cos` between paired whitened rows of the two views.

One difference: the official code draws a random permutation to form the sub-batches, and
repeats the draw `w_iter` times. Batches here are already shuffled, so sub-batches are
contiguous slices (`w_iter = 1`), and the objective needs no random key. A batch smaller than
`w_size` is whitened whole (the official code requires `w_size` to divide the batch).

Sub-batches no larger than the embedding (`w ≤ d`) have a singular covariance: the official
Cholesky fails there, and so does this code (a `ValueError`) unless the shrinkage `w_eps > 0`
makes the covariance positive definite, as it does in the official `Whitening2d`. The default
`w_eps = 0` is the official one (`cfg.py`, solo-learn's `whitening_eps`).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

DEFAULTS = {"proj_hidden_dim": 1024, "proj_output_dim": 64, "w_size": 128, "w_eps": 0.0}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """W-MSE's projector: Linear → BN → ReLU → Linear."""
  return ProjectionHeads(projector=MLP((hp["proj_hidden_dim"],), hp["proj_output_dim"]))


def whiten(x: jax.Array, *, eps: float = 0.0) -> jax.Array:
  """Whitened `x` `[w, d]`: `(x − mean) L⁻ᵀ` where `L Lᵀ = (1 − eps) Σ + eps I`.

  `Σ` is the `(w − 1)`-normalised covariance, so the output's covariance is the identity when
  `eps = 0`. Needs `w > d` (a non-singular covariance) unless `eps > 0`; with `w ≤ d` and
  `eps > 0` the output's covariance is the identity only on the span of the centred rows (rank
  at most `w − 1`), where its eigenvalues are `λ / ((1 − eps) λ + eps)`, and zero elsewhere.
  """
  if x.ndim != 2:
    raise ValueError(f"whiten expects [w, d] embeddings, got shape {x.shape}")
  x = x.astype(jnp.float32)
  w, d = x.shape
  xc = x - x.mean(axis=0)
  cov = xc.T @ xc / (w - 1)
  chol = jnp.linalg.cholesky((1 - eps) * cov + eps * jnp.eye(d, dtype=x.dtype))
  # (L⁻¹ xcᵀ)ᵀ = xc L⁻ᵀ.
  return solve_triangular(chol, xc.T, lower=True).T


def _sub_batches(x: jax.Array, w_size: int, eps: float) -> jax.Array:
  """`[n, d]` → `[n / w, w, d]` with `w = min(w_size, n)`; `w` must divide `n`."""
  n, d = x.shape
  w = min(w_size, n)
  if n % w:
    raise ValueError(f"W-MSE's w_size={w_size} must divide the batch size {n}")
  # A traced eps cannot be checked; only a concrete zero is known to fail.
  if w <= d and not isinstance(eps, jax.core.Tracer) and float(eps) <= 0:
    raise ValueError(
      f"W-MSE whitens sub-batches of {w} embeddings of dimension {d}: their covariance is "
      f"singular and its Cholesky factor does not exist; use w_size > {d} (and a batch at least "
      f"that large), a smaller projection, or a shrinkage w_eps > 0"
    )
  return x.reshape(n // w, w, d)


def wmse_loss(
  z1: jax.Array, z2: jax.Array, *, w_size: int, eps: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean of `2 − 2 cos(ŵ1_i, ŵ2_i)` over the batch, `ŵ` the per-sub-batch whitened views.

  Args:
    z1: `[n, d]` embeddings of the first view; row i of both inputs comes from image i.
    z2: `[n, d]` embeddings of the second view.
    w_size: rows per whitening sub-batch (must divide `n`; the whole batch when larger).
    eps: shrinkage of each covariance towards the identity.

  Returns:
    `(loss, metrics)` with `cos_sim`, the mean cosine similarity of the whitened pairs.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
      f"wmse_loss expects two [n, d] arrays of one shape, got {z1.shape}, {z2.shape}"
    )
  white = [
    jax.vmap(lambda x: whiten(x, eps=eps))(_sub_batches(z, w_size, eps)).reshape(z.shape)
    for z in (z1, z2)
  ]
  cos = jnp.mean(jnp.sum(base.l2_normalize(white[0]) * base.l2_normalize(white[1]), axis=-1))
  return 2 - 2 * cos, {"cos_sim": cos}


def objective(online, target, state, hp):
  """W-MSE between the two views' projections; no target, no state."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  loss, metrics = wmse_loss(z1, z2, w_size=hp["w_size"], eps=hp["w_eps"])
  return loss, {**metrics, **base.collapse_metrics(jnp.concatenate([z1, z2]))}, state


METHODS = (
  base.Method(
    name="wmse",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="adam",
    recipe="simclr",
  ),
)
