"""SSL-HSIC: self-supervised learning with the Hilbert-Schmidt independence criterion (Li,
Pogodin, Sutherland and Gretton 2021, "Self-Supervised Learning with Kernel Dependence
Maximization", NeurIPS 2021, arXiv:2106.08320).

`L = −HSIC(Z, Y) + γ · sqrt(HSIC(Z, Z))` over the `B = N·M` embeddings `z_i^p` of `N` images in
`M` views (here M = 2), with `Y` the image identity under a linear kernel on one-hot labels and `k`
a kernel on the embeddings. With that label kernel the identity's centred Gram matrix has
`Δl = l⁺ − l⁻ = 1`, and the estimators are those of the official code (deepmind/ssl_hsic
`hsic_loss.py`, which evaluates them with random Fourier features; here they are exact):

  `HSIC(Z, Y) = Σ_i Σ_{p,l} k(z_i^p, z_i^l) / (N M (M − 1)) − Σ_{a,b} k(z_a, z_b) / B²`
  (the paper's unbiased estimator up to a constant; the `p = l` terms are the constant
  `1 / (M − 1)` for the kernels below),
  `HSIC(Z, Z) = tr(K H K H) / B²` with `H = I − 11ᵀ/B` (the biased estimator).

Kernels (`kernel`): 'imq', the inverse multiquadric `k(x, y) = c / sqrt(c² + ‖x − y‖²)` of the
paper, or 'gaussian', `exp(−‖x − y‖² / (2c²))`, with `c = kernel_scale`. The official code adapts
`c` during training (from the gradient norm of the kernel); here it is a fixed hyper-parameter.
γ = 3 as in the paper. The paper trains with or without BYOL's target network and predictor;
this is the variant without (both views through the online projector, 128-d outputs). The
projections are L2-normalised before the kernel (this module's choice, which bounds the distances
the kernel scale is relative to).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

KERNELS = ("imq", "gaussian")
DEFAULTS = {
  "proj_hidden_dim": 4096,
  "proj_output_dim": 128,
  "gamma": 3.0,
  "kernel": "imq",
  "kernel_scale": 1.0,
}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """The projector: Linear → BN → ReLU → Linear (BYOL's, as the paper's)."""
  return ProjectionHeads(projector=MLP((hp["proj_hidden_dim"],), hp["proj_output_dim"]))


def kernel_matrix(z: jax.Array, *, kernel: str, scale: float) -> jax.Array:
  """`K_ab = k(z_a, z_b)` `[B, B]` of the rows of `z` `[B, d]` (`kernel` in `KERNELS`)."""
  if kernel not in KERNELS:
    raise ValueError(f"Unknown SSL-HSIC kernel {kernel!r}; valid kernels: {KERNELS}")
  sq = jnp.sum(z * z, axis=-1)
  dist2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
  if kernel == "imq":
    return scale / jnp.sqrt(scale**2 + dist2)
  return jnp.exp(-dist2 / (2 * scale**2))


def hsic_terms(views: jax.Array, *, kernel: str, scale: float) -> tuple[jax.Array, jax.Array]:
  """`(HSIC(Z, Y), HSIC(Z, Z))` of the module docstring for `views` `[M, N, d]` (M >= 2)."""
  if views.ndim != 3 or views.shape[0] < 2:
    raise ValueError(f"hsic_terms expects views [M >= 2, N, d], got shape {views.shape}")
  m, n, _ = views.shape
  b = m * n
  k = kernel_matrix(views.reshape(b, -1).astype(jnp.float32), kernel=kernel, scale=scale)
  # Rows are ordered view-major: a = p·N + i, so image i's views share i modulo N.
  per_image = k.reshape(m, n, m, n)
  same_image = jnp.einsum("pili->", per_image)
  hsic_zy = same_image / (n * m * (m - 1)) - k.sum() / b**2
  centred = k - k.mean(axis=0, keepdims=True) - k.mean(axis=1, keepdims=True) + k.mean()
  hsic_zz = jnp.sum(centred * centred) / b**2  # tr(HKHK) = ‖HKH‖_F² for symmetric K
  return hsic_zy, hsic_zz


def ssl_hsic_loss(
  views: jax.Array, *, gamma: float, kernel: str, scale: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`−HSIC(Z, Y) + γ sqrt(HSIC(Z, Z))` of `views` `[M, N, d]`; metrics `hsic_zy`, `hsic_zz`."""
  hsic_zy, hsic_zz = hsic_terms(views, kernel=kernel, scale=scale)
  loss = -hsic_zy + gamma * jnp.sqrt(hsic_zz)
  return loss, {"hsic_zy": hsic_zy, "hsic_zz": hsic_zz}


def objective(online, target, state, hp):
  """SSL-HSIC on the two views' L2-normalised projections `[2, n, d]`."""
  del target
  base.split_views(online["projection"], "online['projection']")
  z = base.l2_normalize(online["projection"].astype(jnp.float32))
  loss, metrics = ssl_hsic_loss(z, gamma=hp["gamma"], kernel=hp["kernel"], scale=hp["kernel_scale"])
  return loss, {**metrics, **base.collapse_metrics(z.reshape(-1, z.shape[-1]))}, state


METHODS = (
  base.Method(
    name="ssl_hsic",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="lars",
    recipe="byol",
  ),
)
