"""MEC: Maximum Entropy Coding (Liu, Wang, Li and Wang 2022, "Self-Supervised Learning via Maximum
Entropy Coding", NeurIPS 2022, arXiv:2210.11464).

MEC maximises the coding length of the batch's representations under a distortion ε²:
`L = μ · log det(I_m + λ Z₁ Z₂ᵀ)` with `m` rows, `d` dimensions, `μ = (m + d) / 2`,
`λ = d / (m ε²)`, computed with the Taylor series of the log-determinant,
`log det(I + C) = tr(Σ_{k≥1} (−1)^{k+1} C^k / k)`, truncated at `order` (4); the series
converges for `‖C‖₂ < 1`. The architecture is BYOL's: an online network with a predictor and an
EMA teacher (momentum 0.996 → 1 on a cosine), the pairs being (teacher of view 1, online
prediction of view 2) and the reverse.

Scaling, as the official code does it (xinliu20/MEC `main_pretrain.py`): the training loss is
`−½ (T(p₁, z₂) + T(p₂, z₁)) / (m λ)` with `T` the truncated series, i.e. the paper's `−μ·T`
divided by the constant `μ m λ`, so that its leading term is `−mean cos(p, z)` and the official
learning rates apply; the paper's per-sample coding length `μ T / m` is logged as `coding_length`.
λ warms up as the official `lamda_scheduler`: `1/λ` goes linearly from `8/λ` to `1/λ` over the
steps `0 … warmup_steps − 1` (`np.linspace`; ten epochs there, ten CIFAR epochs at batch 256 by
default here) to keep the series convergent early on; the method state counts the steps.

Heads follow the official ResNet-50 model (SimSiam's): projector Linear 2048 → BN → ReLU →
Linear 2048 → BN → ReLU → Linear 2048 → BN without affine, no biases; predictor Linear 512 → BN →
ReLU → Linear 2048. The official recipe is SGD (lr 0.5 × batch/256, weight decay 1e-5) with
MoCo v3's asymmetric views (BYOL's recipe here).
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
  "pred_hidden_dim": 512,
  "eps2": 64.0,
  "order": 4,
  "warmup_steps": 1950,
}
# The official warm-up starts 1/λ at this multiple of its final value.
WARMUP_START = 8.0


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """MEC's three-layer projector (no biases, output BN without affine) and two-layer predictor."""
  h, d = hp["proj_hidden_dim"], hp["proj_output_dim"]
  return ProjectionHeads(
    projector=MLP((h, h), d, use_bias=False, last_bn=True),
    predictor=MLP((hp["pred_hidden_dim"],), d),
  )


def coding_constants(m: int, d: int, *, eps2: float) -> tuple[float, float]:
  """`(μ, λ) = ((m + d) / 2, d / (m ε²))` for `m` samples of dimension `d`."""
  if m < 1 or d < 1 or not eps2 > 0:
    raise ValueError(f"coding_constants needs m, d >= 1 and eps2 > 0, got {m}, {d}, {eps2}")
  return (m + d) / 2, d / (m * eps2)


def taylor_log_det(c: jax.Array, *, order: int) -> jax.Array:
  """`tr(Σ_{k=1}^{order} (−1)^{k+1} C^k / k)`, the truncated series of `log det(I + C)`.

  Args:
    c: `[m, m]` matrix, `‖c‖₂ < 1` for the series to converge.
    order: number of terms, >= 1 (static).
  """
  if c.ndim != 2 or c.shape[0] != c.shape[1] or order < 1:
    raise ValueError(
      f"taylor_log_det expects a square matrix and order >= 1, got {c.shape}, {order}"
    )
  power, total = c, jnp.trace(c)
  for k in range(2, order + 1):
    power = power @ c
    total = total + (-1) ** (k + 1) * jnp.trace(power) / k
  return total


def mec_loss(
  p: jax.Array, z: jax.Array, *, lamda: float | jax.Array, order: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One MEC term as the official code scales it: `−T / (m λ)`, `T = taylor_log_det(λ p̂ ẑᵀ)`.

  `p̂`, `ẑ` are the L2-normalised rows; no gradient reaches `z` (the teacher's output).

  Args:
    p: `[m, d]` online predictions of one view.
    z: `[m, d]` teacher projections of the other view.
    lamda: λ > 0 (the warmed-up value during warm-up).
    order: terms of the series.

  Returns:
    `(loss, metrics)`: the scalar loss and `series`, the value `T`.
  """
  if p.ndim != 2 or p.shape != z.shape:
    raise ValueError(f"mec_loss expects p, z of one shape [m, d], got {p.shape}, {z.shape}")
  p = base.l2_normalize(p.astype(jnp.float32))
  z = jax.lax.stop_gradient(base.l2_normalize(z.astype(jnp.float32)))
  series = taylor_log_det(lamda * (p @ z.T), order=order)
  return -series / (p.shape[0] * lamda), {"series": series}


def warmup_lamda(lamda: float, step: jax.Array, *, warmup_steps: int) -> jax.Array:
  """λ during the official warm-up: `1/λ_t` linear from `8/λ` at step 0 to `1/λ` at step `W − 1`.

  As the official `np.linspace(8/λ, 1/λ, W)` for steps `t < W`, then `1/λ`: `1/λ_t =
  (8 − 7 t/(W − 1))/λ`. `W = warmup_steps`; `W <= 1` is no warm-up.
  """
  progress = jnp.minimum(step / (warmup_steps - 1), 1.0) if warmup_steps > 1 else 1.0
  return lamda / (WARMUP_START + (1.0 - WARMUP_START) * progress)


def init_state(hp: Mapping[str, Any], key: jax.Array) -> dict[str, jax.Array]:
  """The step counter of λ's warm-up."""
  del hp, key
  return {"step": jnp.zeros((), jnp.int32)}


def objective(online, target, state, hp):
  """`½ [ℓ(p₁, z'₂) + ℓ(p₂, z'₁)]` with `ℓ = mec_loss` at the warmed-up λ of this step."""
  if target is None:
    raise ValueError("MEC's objective needs the teacher's outputs, got target=None")
  p1, p2 = base.split_views(online["prediction"], "online['prediction']")
  t1, t2 = base.split_views(target["projection"], "target['projection']")
  mu, lamda = coding_constants(*p1.shape, eps2=hp["eps2"])
  lamda = warmup_lamda(lamda, state["step"], warmup_steps=hp["warmup_steps"])
  loss1, m1 = mec_loss(p1, t2, lamda=lamda, order=hp["order"])
  loss2, m2 = mec_loss(p2, t1, lamda=lamda, order=hp["order"])
  series = (m1["series"] + m2["series"]) / 2
  metrics = {"coding_length": mu * series / p1.shape[0], "lamda": lamda}
  z = online["projection"]
  metrics.update(base.collapse_metrics(z.reshape(-1, z.shape[-1])))
  return (loss1 + loss2) / 2, metrics, {"step": state["step"] + 1}


METHODS = (
  base.Method(
    name="mec",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="sgd",
    recipe="byol",
    target_momentum=(0.996, 1.0),
    init_state=init_state,
  ),
)
