"""CorInfoMax: correlative information maximisation (Ozsoy, Hamidi and Erdogan 2022,
"Self-Supervised Learning with an Information Maximization Criterion", NeurIPS 2022,
arXiv:2209.07999).

The loss of a batch of projections `z₁`, `z₂` `[N, D]` (L2-normalised rows, the official CIFAR
runs' `--normalize_on`) is

  `L = −(log det(R₁ + εI) + log det(R₂ + εI)) / D + α · mean((z₁ − z₂)²)`,

the second term being PyTorch's `mse_loss`, the mean over the `N·D` entries. `R_v` is view v's
covariance estimated with moving averages, as the official code (serdarozsoy/corinfomax-ssl
`loss.py`) does: `μ_v ← λ_μ μ_v + (1 − λ_μ) mean(z_v)`, then
`R_v ← λ_R R_v + (1 − λ_R) (z_v − μ_v)ᵀ(z_v − μ_v) / N`, with forgetting factors `λ_μ = λ_R = 0.01`
and `R_v` starting at `R_ini · I`. The previous `μ_v`, `R_v` are the method's state and carry no
gradient; the batch's part does. Log-determinants are float32 Cholesky factorisations of the two
matrices in one batched call (the official code uses float64).

Defaults are the official CIFAR-10 command: projector 2048-2048-64 (Linear → BN → ReLU twice,
then Linear), α = 250, ε = 1e-8, SGD with lr 0.5 and weight decay 1e-4; its views are VICReg's,
i.e. BYOL's asymmetric recipe (`transform_utils.py`).
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
  "proj_output_dim": 64,
  "alpha": 250.0,
  "forget_mean": 0.01,
  "forget_cov": 0.01,
  "cov_init": 1.0,
  "eps": 1e-8,
  "normalize": True,
}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """CorInfoMax's projector: (Linear → BN → ReLU) × 2 → Linear."""
  h = hp["proj_hidden_dim"]
  return ProjectionHeads(projector=MLP((h, h), hp["proj_output_dim"]))


def update_moments(
  z: jax.Array, mean: jax.Array, cov: jax.Array, *, forget_mean: float, forget_cov: float
) -> tuple[jax.Array, jax.Array]:
  """The moving averages of one view: `μ' = λ_μ μ + (1 − λ_μ) z̄`, `R' = λ_R R + (1 − λ_R) Ẑᵀ Ẑ / N`.

  `Ẑ = z − μ'` (centred by the updated mean). No gradient reaches `mean` and `cov`.

  Args:
    z: `[N, D]` projections.
    mean: `[D]` previous mean.
    cov: `[D, D]` previous covariance.
    forget_mean, forget_cov: λ_μ, λ_R in [0, 1].

  Returns:
    `(μ', R')`.
  """
  n, d = z.shape
  if mean.shape != (d,) or cov.shape != (d, d):
    raise ValueError(
      f"update_moments: z {z.shape} needs mean [{d}] and cov [{d}, {d}], got "
      f"{mean.shape}, {cov.shape}"
    )
  mean, cov = jax.lax.stop_gradient((mean, cov))
  new_mean = forget_mean * mean + (1 - forget_mean) * z.mean(axis=0)
  centred = z - new_mean
  return new_mean, forget_cov * cov + (1 - forget_cov) * (centred.T @ centred) / n


def corinfomax_loss(
  z1: jax.Array,
  z2: jax.Array,
  means: jax.Array,
  covs: jax.Array,
  *,
  alpha: float,
  forget_mean: float,
  forget_cov: float,
  eps: float,
) -> tuple[jax.Array, dict[str, jax.Array], tuple[jax.Array, jax.Array]]:
  """The CorInfoMax loss of the module docstring and the updated moving averages.

  Args:
    z1, z2: `[N, D]` projections of the two views (row i of both from image i).
    means: `[2, D]` the views' previous means.
    covs: `[2, D, D]` the views' previous covariances.
    alpha: weight α of the invariance term.
    forget_mean, forget_cov: forgetting factors λ_μ, λ_R.
    eps: ε added to the covariances' diagonal.

  Returns:
    `(loss, metrics, (means', covs'))`; metrics `cov_loss` (the log-determinant term) and
    `invariance` (the mean squared difference, before α).
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
      f"corinfomax_loss expects two [N, D] arrays of one shape, got {z1.shape}, {z2.shape}"
    )
  d = z1.shape[1]
  if means.shape != (2, d) or covs.shape != (2, d, d):
    raise ValueError(
      f"corinfomax_loss: D={d} needs means [2, {d}] and covs [2, {d}, {d}], got "
      f"{means.shape}, {covs.shape}"
    )
  z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
  kw = dict(forget_mean=forget_mean, forget_cov=forget_cov)
  moments = [update_moments(z, means[v], covs[v], **kw) for v, z in enumerate((z1, z2))]
  new_means = jnp.stack([m for m, _ in moments])
  new_covs = jnp.stack([c for _, c in moments])
  # One batched factorisation of both covariances (two in flight can deadlock XLA's CPU pool).
  chol = jnp.linalg.cholesky(new_covs + eps * jnp.eye(d, dtype=jnp.float32))
  log_dets = 2 * jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)).sum(axis=-1)
  cov_loss = -log_dets.sum() / d
  invariance = jnp.mean(jnp.square(z1 - z2))
  metrics = {"cov_loss": cov_loss, "invariance": invariance}
  return cov_loss + alpha * invariance, metrics, (new_means, new_covs)


def init_state(hp: Mapping[str, Any], key: jax.Array) -> dict[str, jax.Array]:
  """Means 0 and covariances `R_ini · I` of both views: `mean` `[2, D]`, `cov` `[2, D, D]`."""
  del key
  d = hp["proj_output_dim"]
  cov = hp["cov_init"] * jnp.eye(d, dtype=jnp.float32)
  return {"mean": jnp.zeros((2, d), jnp.float32), "cov": jnp.stack([cov, cov])}


def objective(online, target, state, hp):
  """CorInfoMax on the two views' projections (L2-normalised when `hp['normalize']`)."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  if hp["normalize"]:
    z1, z2 = base.l2_normalize(z1), base.l2_normalize(z2)
  loss, metrics, (means, covs) = corinfomax_loss(
    z1,
    z2,
    state["mean"],
    state["cov"],
    alpha=hp["alpha"],
    forget_mean=hp["forget_mean"],
    forget_cov=hp["forget_cov"],
    eps=hp["eps"],
  )
  new_state = jax.lax.stop_gradient({"mean": means, "cov": covs})
  return loss, {**metrics, **base.collapse_metrics(jnp.concatenate([z1, z2]))}, new_state


METHODS = (
  base.Method(
    name="corinfomax",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="sgd",
    recipe="byol",
    init_state=init_state,
  ),
)
