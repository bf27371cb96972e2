"""Heads on top of the backbone embedding: projector/predictor MLPs, SwAV prototypes, classifier.

Every head maps `[n, d_in]` features to `[n, d_out]`; BatchNorm layers take `train`.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """Linear → (BatchNorm) → ReLU per hidden width, then a final Linear.

  Attributes:
    hidden_dims: widths of the hidden layers (empty: a single Linear layer).
    out_dim: output width.
    use_bn: BatchNorm after every hidden Linear.
    use_bias: bias in the Linear layers (Barlow Twins' projector has none).
    last_bn: BatchNorm without learned affine on the output (SimSiam's projector, MoCo v3).
    dtype: compute dtype; parameters stay float32.
  """

  hidden_dims: Sequence[int]
  out_dim: int
  use_bn: bool = True
  use_bias: bool = True
  last_bn: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = lambda **kw: nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, **kw
    )
    for width in self.hidden_dims:
      x = nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype)(x)
      if self.use_bn:
        x = norm()(x)
      x = nn.relu(x)
    x = nn.Dense(self.out_dim, use_bias=self.use_bias, dtype=self.dtype)(x)
    if self.last_bn:
      x = norm(use_scale=False, use_bias=False)(x)
    return x


class ProjectionHeads(nn.Module):
  """A projector on the backbone embedding and, optionally, a predictor on the projection.

  `__call__(features, train=...)` reads `features['embedding']` `[N, D]` and returns
  `{'projection': [N, d]}`, plus `'prediction'` `[N, d']` when a predictor is set.

  Attributes:
    projector: module `[N, D] -> [N, d]` taking `train=`.
    predictor: module `[N, d] -> [N, d']` taking `train=`, or `None`.
  """

  projector: nn.Module
  predictor: nn.Module | None = None

  def __call__(self, features: Mapping[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
    z = self.projector(features["embedding"], train=train)
    if self.predictor is None:
      return {"projection": z}
    return {"projection": z, "prediction": self.predictor(z, train=train)}


class Prototypes(nn.Module):
  """SwAV prototypes: scores of L2-normalised features against L2-normalised prototype vectors.

  Normalising the prototype matrix inside the forward pass replaces SwAV's in-place
  re-normalisation after each step; the scores are cosine similarities in `[-1, 1]`.
  Input `[n, d]`, output `[n, num_prototypes]`.
  """

  num_prototypes: int

  @nn.compact
  def __call__(self, z):
    w = self.param(
      "prototypes", nn.initializers.lecun_normal(), (z.shape[-1], self.num_prototypes), jnp.float32
    )
    w = w / jnp.linalg.norm(w, axis=0, keepdims=True).clip(1e-12)
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)
    return z.astype(jnp.float32) @ w


class LinearClassifier(nn.Module):
  """A linear layer from frozen features `[n, d]` to class logits `[n, num_classes]`."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)
