"""BCL-I: boosted contrastive learning on SimCLR (Zhou, Yao, Wang, Han and Zhang 2022, "Contrastive
Learning with Boosted Memorization", ICML 2022, arXiv:2205.12693; BCL-I is BCL built on SimCLR,
BCL-D on SDCLR).

BCL tracks how well each training image is memorised and augments the poorly memorised ones
(long-tail samples, whose loss stays high) more strongly. As the official code does
(MediaBrain-SJTU/BCL `train.py`, `data/memoboosted_cifar100.py`, `data/randaug.py`):

- loss: SimCLR's NT-Xent; image `i`'s loss `ℓ_i` is the mean of its two rows' terms.
- memorisation score: the momentum loss `M_i ← β M_i + (1 − β) ℓ_i` (β = 0.95; `M_i = ℓ_i` the
  first time image i is seen), kept for every image of the training set (`num_samples`, read from
  the batch field `index`); at the end of every epoch (every `steps_per_epoch` steps) the weights
  become `w_i = ½ (M_i − M̄) / max_j |M_j − M̄| + ½ ∈ [0, 1]` over the images seen so far (the
  official divides by the standard deviation first, which the max-normalisation cancels); images
  never seen, and every image during the first epoch, have `w_i = 0`.
- boosted augmentation (`transform_views`, after the recipe's views): RandAugment with
  `rand_ops` (1) operations drawn uniformly from the official list of 15 — ShearX/Y, TranslateX/Y,
  Rotate, AutoContrast, Invert, Equalize, Solarize, Posterize, Contrast, Color, Brightness,
  Sharpness, Cutout — each applied with probability `w_i`, at magnitude
  `rand_strength · w_i · U(0, 1)` on RandAugment's 0-30 scale (`U` drawn once per image, shared by
  its two views, as in `memoboosted_CIFAR100.__getitem__`).

What differs from the official code: the operations run on device on float images in [0, 1]
(quantised to 256 levels where PIL's operation is defined on them: AutoContrast, Equalize,
Solarize, Posterize); the geometric ones sample the nearest pixel at PIL's pixel centres with
black fill; Cutout fills a `v·S`-pixel square (not PIL's inclusive rectangle). The official
pipeline crops with scale (0.1, 1), the 'simclr' recipe here with (0.2, 1). Under UMM the views are
the recipe's, without the boost (the scores keep being tracked). The index must reach the step:
`data.batches(..., with_index=True)` gives it, and the training loop has to put it in the batch
as `index` (the step raises a `ValueError` otherwise).

Defaults: the official CIFAR-100-LT script — SimCLR's projector as in SDCLR's code (512 → 128),
τ = 0.2, SGD; `num_samples` and `steps_per_epoch` are CIFAR's (50,000 images at batch 256), which
the long-tail configs replace with their subsets'.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax import augment
from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

DEFAULTS = {
  "proj_hidden_dim": 512,
  "proj_output_dim": 128,
  "temperature": 0.2,
  "momentum": 0.95,
  "rand_ops": 1,
  "rand_strength": 30.0,
  "num_samples": 50000,
  "steps_per_epoch": 195,
}
# RandAugment's magnitude scale, and the official operations' ranges (`randaug.augment_list`).
MAX_MAGNITUDE = 30.0
_CUTOUT_FILL = (125, 123, 114)
_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL's ImageFilter.SMOOTH, / 13


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """SimCLR's two-layer projector: Linear → BN → ReLU → Linear."""
  return ProjectionHeads(projector=MLP((hp["proj_hidden_dim"],), hp["proj_output_dim"]))


# ------------------------------------------------------------------------------ loss and scores


def per_sample_nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float) -> jax.Array:
  """NT-Xent per image `[n]`: the mean of its two rows' `−log softmax` of the positive.

  Rows are the `2n` L2-normalised projections; each row's candidates are the other `2n − 1`; the
  mean over images is SimCLR's loss (`simclr.nt_xent`).
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(f"per_sample_nt_xent expects two [n, d] arrays, got {z1.shape}, {z2.shape}")
  n = z1.shape[0]
  z = base.l2_normalize(jnp.concatenate([z1, z2]).astype(jnp.float32))
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, z @ z.T / temperature)
  positive = (jnp.arange(2 * n) + n) % (2 * n)
  rows = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), positive[:, None], axis=1)
  return rows[:, 0].reshape(2, n).mean(axis=0)


def update_momentum_losses(
  momentum: jax.Array, seen: jax.Array, index: jax.Array, losses: jax.Array, *, beta: float
) -> tuple[jax.Array, jax.Array]:
  """`M_i ← β M_i + (1 − β) ℓ_i` for the images `index` `[n]` (`M_i ← ℓ_i` if unseen).

  Args:
    momentum: `[N]` momentum losses of the training set.
    seen: `[N]` bool, whether image i has a momentum loss yet.
    index: `[n]` int rows of the batch's images (distinct, in `[0, N)`).
    losses: `[n]` their losses (no gradient is kept).
    beta: β in [0, 1].

  Returns:
    `(momentum', seen')`.
  """
  losses = jax.lax.stop_gradient(losses).astype(momentum.dtype)
  new = jnp.where(seen[index], beta * momentum[index] + (1 - beta) * losses, losses)
  return momentum.at[index].set(new), seen.at[index].set(True)


def memorization_weights(momentum: jax.Array, seen: jax.Array) -> jax.Array:
  """`w = ½ (M − M̄) / max |M − M̄| + ½` over the seen images `[N]`; 0 for unseen ones.

  M̄ is the mean over seen images; equal losses give `w = ½` everywhere.
  """
  count = jnp.maximum(seen.sum(), 1)
  mean = jnp.sum(jnp.where(seen, momentum, 0.0)) / count
  centred = jnp.where(seen, momentum - mean, 0.0)
  scale = jnp.max(jnp.abs(centred))
  w = jnp.where(scale > 0, centred / jnp.where(scale > 0, scale, 1.0), 0.0) / 2 + 0.5
  return jnp.where(seen, w, 0.0)


def init_state(hp: Mapping[str, Any], key: jax.Array) -> dict[str, jax.Array]:
  """Scores of the `num_samples` training images, all unseen, weights 0, and the step 0."""
  del key
  n = hp["num_samples"]
  return {
    "momentum": jnp.zeros((n,), jnp.float32),
    "seen": jnp.zeros((n,), bool),
    "weight": jnp.zeros((n,), jnp.float32),
    "step": jnp.zeros((), jnp.int32),
  }


def objective(online, target, state, hp):
  """SimCLR's loss; the batch's momentum losses, and at an epoch's end the weights, update."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  losses = per_sample_nt_xent(z1, z2, temperature=hp["temperature"])
  index = online["index"][0]
  momentum, seen = update_momentum_losses(
    state["momentum"], state["seen"], index, losses, beta=hp["momentum"]
  )
  step = state["step"] + 1
  end_of_epoch = step % hp["steps_per_epoch"] == 0
  weight = jnp.where(end_of_epoch, memorization_weights(momentum, seen), state["weight"])
  new_state = {"momentum": momentum, "seen": seen, "weight": weight, "step": step}
  metrics = {"batch_weight": state["weight"][index].mean()}
  metrics.update(base.collapse_metrics(jnp.concatenate([z1, z2])))
  return losses.mean(), metrics, new_state


# ------------------------------------------------------------------------ boosted augmentation
# Each operation maps a float image `[S, S, C]` in [0, 1], its value `v` (the official range at
# the drawn magnitude) and uniforms `u` [3] (sign, Cutout's centre) to an image.


def _levels(img: jax.Array) -> jax.Array:
  return jnp.round(img * 255.0)


def _affine(img: jax.Array, a, b, c, d, e, f) -> jax.Array:
  """PIL's `Image.transform(AFFINE, (a, b, c, d, e, f), NEAREST)`: output pixel `(x, y)` shows
  input `(a x' + b y' + c, d x' + e y' + f)` at the pixel centre `(x', y') = (x + ½, y + ½)`;
  outside the image is black."""
  height, width = img.shape[:2]
  y, x = jnp.meshgrid(jnp.arange(height) + 0.5, jnp.arange(width) + 0.5, indexing="ij")
  xs = jnp.floor(a * x + b * y + c).astype(jnp.int32)
  ys = jnp.floor(d * x + e * y + f).astype(jnp.int32)
  inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
  out = img[jnp.clip(ys, 0, height - 1), jnp.clip(xs, 0, width - 1)]
  return jnp.where(inside[..., None], out, 0.0)


def _signed(v, u):
  return jnp.where(u[0] > 0.5, -v, v)


def _shear_x(img, v, u):
  return _affine(img, 1.0, _signed(v, u), 0.0, 0.0, 1.0, 0.0)


def _shear_y(img, v, u):
  return _affine(img, 1.0, 0.0, 0.0, _signed(v, u), 1.0, 0.0)


def _translate_x(img, v, u):
  return _affine(img, 1.0, 0.0, _signed(v, u) * img.shape[1], 0.0, 1.0, 0.0)


def _translate_y(img, v, u):
  return _affine(img, 1.0, 0.0, 0.0, 0.0, 1.0, _signed(v, u) * img.shape[0])


def _rotate(img, v, u):
  """PIL's `rotate(angle)`: counter-clockwise by `angle` degrees about the centre."""
  angle = -jnp.deg2rad(_signed(v, u))
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = img.shape[1] / 2, img.shape[0] / 2
  return _affine(img, cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def _auto_contrast(img, v, u):
  """PIL's `autocontrast`: each channel's levels stretched to 0-255 (kept when constant)."""
  del v, u
  q = _levels(img)
  lo, hi = q.min(axis=(0, 1)), q.max(axis=(0, 1))
  stretched = jnp.floor((q - lo) * 255.0 / jnp.where(hi > lo, hi - lo, 1.0))
  return jnp.where(hi > lo, stretched, q) / 255.0


def _invert(img, v, u):
  del v, u
  return 1.0 - img


def _equalize_channel(q: jax.Array) -> jax.Array:
  """PIL's `equalize` of one channel of levels `[S, S]`: a histogram-flattening lookup table."""
  q = q.astype(jnp.int32)
  hist = jnp.zeros(256, jnp.int32).at[q.ravel()].add(1)
  last = hist[255 - jnp.argmax(hist[::-1] > 0)]
  step = (hist.sum() - last) // 255
  lut = jnp.minimum((step // 2 + jnp.cumsum(hist) - hist) // jnp.maximum(step, 1), 255)
  return jnp.where(step > 0, lut[q], q).astype(jnp.float32)


def _equalize(img, v, u):
  del v, u
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(_levels(img)) / 255.0


def _solarize(img, v, u):
  """PIL's `solarize(threshold=v)`: levels `>= v` inverted."""
  del u
  return jnp.where(_levels(img) >= v, 1.0 - img, img)


def _posterize(img, v, u):
  """PIL's `posterize(max(1, int(v)))`: each level keeps its `bits` most significant bits."""
  del u
  keep = 2.0 ** (8 - jnp.maximum(1, jnp.floor(v)))
  return jnp.floor(_levels(img) / keep) * keep / 255.0


def _contrast(img, v, u):
  del u
  return augment.adjust_contrast(img, v)


def _color(img, v, u):
  del u
  return augment.adjust_saturation(img, v)


def _brightness(img, v, u):
  del u
  return augment.adjust_brightness(img, v)


def _sharpness(img, v, u):
  """PIL's `ImageEnhance.Sharpness`: a blend with the SMOOTH-filtered image (borders kept)."""
  del u
  kernel = jnp.asarray(_SMOOTH) / 13.0
  height, width = img.shape[:2]
  smooth = sum(
    kernel[i, j] * img[i : height - 2 + i, j : width - 2 + j] for i in range(3) for j in range(3)
  )
  degenerate = img.at[1:-1, 1:-1].set(smooth)
  return jnp.clip(degenerate + v * (img - degenerate), 0.0, 1.0)


def _cutout(img, v, u):
  """A `v·S`-pixel grey square (PIL's (125, 123, 114)) at a uniform corner `max(0, centre − ½)`."""
  height, width = img.shape[:2]
  side = v * width
  x0 = jnp.floor(jnp.maximum(0.0, u[1] * width - side / 2))
  y0 = jnp.floor(jnp.maximum(0.0, u[2] * height - side / 2))
  y, x = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  inside = (x >= x0) & (x < x0 + side) & (y >= y0) & (y < y0 + side) & (side > 0)
  fill = jnp.asarray(_CUTOUT_FILL[: img.shape[-1]], img.dtype) / 255.0
  return jnp.where(inside[..., None], fill, img)


# (operation, low, high) as the official `augment_list`; the value is `low + level (high - low)`.
OPERATIONS = (
  (_shear_x, 0.0, 0.6),
  (_shear_y, 0.0, 0.6),
  (_translate_x, 0.0, 0.66),
  (_translate_y, 0.0, 0.66),
  (_rotate, 0.0, 60.0),
  (_auto_contrast, 0.0, 1.0),
  (_invert, 0.0, 1.0),
  (_equalize, 0.0, 1.0),
  (_solarize, 0.0, 110.0),
  (_posterize, 4.0, 8.0),
  (_contrast, 0.1, 1.9),
  (_color, 0.1, 1.9),
  (_brightness, 0.1, 1.9),
  (_sharpness, 0.1, 1.9),
  (_cutout, 0.0, 0.4),
)


def apply_operation(img: jax.Array, op: jax.Array, level: jax.Array, u: jax.Array) -> jax.Array:
  """Operation `op` of `OPERATIONS` on `img` at `level` in [0, 1] (magnitude / 30)."""
  branches = [
    lambda img, level, u, fn=fn, lo=lo, hi=hi: fn(img, lo + level * (hi - lo), u)
    for fn, lo, hi in OPERATIONS
  ]
  return jnp.clip(jax.lax.switch(op, branches, img, level, u), 0.0, 1.0)


def boost_views(
  key: jax.Array, images: jax.Array, weight: jax.Array, *, rand_ops: int, rand_strength: float
) -> jax.Array:
  """BCL's memorization-boosted RandAugment on both views `[2, n, S, S, C]` of images weighted
  `weight` `[n]` in [0, 1]: `rand_ops` operations, each kept with probability `w`, at magnitude
  `rand_strength · w · U` (U per image, shared by its views)."""
  if images.ndim != 5 or images.shape[0] != 2 or weight.shape != images.shape[1:2]:
    raise ValueError(
      f"boost_views expects views [2, n, S, S, C] and weights [n], got {images.shape}, "
      f"{weight.shape}"
    )
  n = images.shape[1]
  k_level, k_ops = jax.random.split(key)
  level = rand_strength / MAX_MAGNITUDE * weight * jax.random.uniform(k_level, (n,))
  draws = jax.random.uniform(k_ops, (2, n, rand_ops, 5))

  def one(img, w, level, u):
    for j in range(rand_ops):
      op = jnp.minimum(jnp.floor(u[j, 0] * len(OPERATIONS)).astype(jnp.int32), len(OPERATIONS) - 1)
      img = jnp.where(u[j, 1] < w, apply_operation(img, op, level, u[j, 2:]), img)
    return img

  per_view = jax.vmap(one, in_axes=(0, 0, 0, 0))
  return jax.vmap(per_view, in_axes=(0, None, None, 0))(images, weight, level, draws)


def transform_views(key, images, state, fields, hp):
  """`boost_views` with the weights of the batch's images (`fields['index']`)."""
  weight = state["weight"][fields["index"]]
  return boost_views(
    key, images, weight, rand_ops=hp["rand_ops"], rand_strength=hp["rand_strength"]
  )


METHODS = (
  base.Method(
    name="bcl_i",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="sgd",
    recipe="simclr",
    init_state=init_state,
    batch_keys=("index",),
    transform_views=transform_views,
  ),
)
