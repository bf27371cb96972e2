"""On-device, jitted view augmentations for self-supervised learning, and per-method recipes.

The training step calls `two_views(key, images, recipe=..., size=...)` inside `jit`: each example
gets its own key (`jax.random.split`), and every random choice is an array, so one compiled step
serves every draw. A view is, in order (as in torchvision / solo-learn pipelines):

1. random resized crop (`RandomResizedCrop`): area fraction uniform in `crop_scale`, aspect ratio
   log-uniform in `crop_ratio`, 10 attempts, else a centre crop; the box is continuous (not
   rounded to whole pixels) and resampled with an antialiased bilinear filter (torchvision's
   default) straight from the source image;
2. horizontal flip;
3. colour jitter (`ColorJitter`) with probability `jitter_p`: brightness, contrast, saturation
   and hue in a random order, factors uniform in `[max(0, 1 - s), 1 + s]`, hue shift in `[-h, h]`;
4. grayscale with probability `grayscale_p`;
5. Gaussian blur with probability `blur_p`: sigma uniform in `blur_sigma`, an odd kernel of
   about 10% of the output size, reflect padding;
6. solarisation with probability `solarize_p`: values `>= 0.5` become `1 - value`.
Flipping commutes with steps 3-6 (pointwise or symmetric), so its place does not matter.

Image sizes: for outputs of at most 32 px (CIFAR, Fashion-MNIST) a recipe's crop scale becomes
`(0.2, 1.0)` and blur is dropped, as in solo-learn's and SimCLR's CIFAR recipes; larger outputs
keep the ImageNet settings (crop scale `(0.08, 1.0)`, SwAV `(0.14, 1.0)`).
Grayscale inputs (1 channel, Fashion-MNIST): saturation, hue and random grayscale need three
channels and are dropped; brightness and contrast stay.

References: Chen et al. 2020 (SimCLR), Grill et al. 2020 (BYOL), Chen et al. 2020 (MoCo v2),
Caron et al. 2020 (SwAV), Chen & He 2021 (SimSiam), solo-learn's augmentation configs.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

SMALL_IMAGE_MAX = 32
_SMALL_CROP_SCALE = (0.2, 1.0)
_CROP_ATTEMPTS = 10
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class ViewParams:
  """Parameters of one view's augmentation (hashable: static under `jit`).

  Attributes:
    crop_scale: range of the crop's area as a fraction of the source image.
    crop_ratio: range of the crop's aspect ratio (width / height, in pixels), sampled log-uniformly.
    flip_p: probability of a horizontal flip.
    brightness, contrast, saturation: jitter strengths `s`; factors uniform in
      `[max(0, 1 - s), 1 + s]`; 0 turns the operation off.
    hue: hue jitter strength `h <= 0.5`; shift uniform in `[-h, h]` (fraction of the colour wheel).
    jitter_p: probability of applying the colour jitter.
    grayscale_p: probability of converting to grayscale.
    blur_p: probability of a Gaussian blur.
    blur_sigma: range of the blur's standard deviation, in output pixels.
    solarize_p: probability of solarising.
  """

  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_p: float = 0.5
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0
  jitter_p: float = 0.0
  grayscale_p: float = 0.0
  blur_p: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  solarize_p: float = 0.0


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A method's two views, as set for large (> 32 px) images.

  Attributes:
    name: registry name.
    views: parameters of view 1 and view 2 (equal for symmetric recipes).
  """

  name: str
  views: tuple[ViewParams, ViewParams]

  def for_size(self, size: int) -> tuple[ViewParams, ViewParams]:
    """The views for `size`-pixel outputs: small images get crop scale (0.2, 1) and no blur."""
    if size > SMALL_IMAGE_MAX:
      return self.views
    small = functools.partial(dataclasses.replace, crop_scale=_SMALL_CROP_SCALE, blur_p=0.0)
    return small(self.views[0]), small(self.views[1])


_SIMCLR_VIEW = ViewParams(
  brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5
)
_BYOL_VIEW = ViewParams(
  brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, jitter_p=0.8, grayscale_p=0.2
)
_SWAV_VIEW = dataclasses.replace(
  _SIMCLR_VIEW, crop_scale=(0.14, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2
)
RECIPES: dict[str, Recipe] = {
  r.name: r
  for r in (
    Recipe("simclr", (_SIMCLR_VIEW, _SIMCLR_VIEW)),
    Recipe("mocov2", (_SIMCLR_VIEW, _SIMCLR_VIEW)),
    Recipe("simsiam", (_SIMCLR_VIEW, _SIMCLR_VIEW)),
    Recipe("swav", (_SWAV_VIEW, _SWAV_VIEW)),
    # BYOL's asymmetric views; Barlow Twins, VICReg and RELIC v2 use them too.
    Recipe(
      "byol",
      (
        dataclasses.replace(_BYOL_VIEW, blur_p=1.0, solarize_p=0.0),
        dataclasses.replace(_BYOL_VIEW, blur_p=0.1, solarize_p=0.2),
      ),
    ),
    Recipe("minimal", (ViewParams(), ViewParams())),
    # ReSSL (Zheng et al. 2021): SimCLR's strong view for the student, a weak view (crop and
    # flip only) for the teacher.
    Recipe("ressl", (_SIMCLR_VIEW, ViewParams())),
  )
}


def get_recipe(name: str) -> Recipe:
  """The recipe called `name`; a `ValueError` lists the valid names otherwise."""
  if name not in RECIPES:
    raise ValueError(f"Unknown augmentation recipe {name!r}; valid recipes: {sorted(RECIPES)}")
  return RECIPES[name]


def blur_kernel_size(size: int) -> int:
  """Blur kernel for `size`-pixel images: `int(0.1 * size)` rounded up to odd (224 px → 23)."""
  k = int(0.1 * size)
  return k + 1 - k % 2


# ----------------------------------------------------------------------------- single operations
# Each takes one float image `[H, W, C]` in [0, 1] and returns the same shape, clamped to [0, 1]
# where the operation can leave the range (as torchvision's float ops do).


def to_grayscale(img: jax.Array) -> jax.Array:
  """Luma `0.299 R + 0.587 G + 0.114 B` repeated over the channels; 1-channel images unchanged."""
  if img.shape[-1] == 1:
    return img
  gray = img @ jnp.asarray(_GRAY_WEIGHTS, img.dtype)
  return jnp.broadcast_to(gray[..., None], img.shape)


def _blend(img: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(factor * img + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(img: jax.Array, factor: jax.Array) -> jax.Array:
  """`clip(factor · img)`: blend with black."""
  return _blend(img, jnp.zeros_like(img), factor)


def adjust_contrast(img: jax.Array, factor: jax.Array) -> jax.Array:
  """Blend with the mean of the grayscale image: `clip(factor · img + (1 - factor) · mean)`."""
  return _blend(img, jnp.mean(to_grayscale(img)), factor)


def adjust_saturation(img: jax.Array, factor: jax.Array) -> jax.Array:
  """Blend with the grayscale image: `clip(factor · img + (1 - factor) · gray)`."""
  return _blend(img, to_grayscale(img), factor)


def _rgb_to_hsv(img: jax.Array) -> jax.Array:
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc, minc = img.max(axis=-1), img.min(axis=-1)
  chroma = maxc - minc
  gray = chroma == 0
  # Gray pixels have no hue; the safe divisors keep their (discarded) branches finite.
  s = chroma / jnp.where(gray, 1.0, maxc)
  safe = jnp.where(gray, 1.0, chroma)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(gray, 0.0, h)
  return jnp.stack([jnp.mod(h / 6.0, 1.0), s, maxc], axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  # Closed form of the six-sector HSV → RGB table: channel n ∈ (R, G, B) = (5, 3, 1) gives
  # v - v s clip(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6.
  h, s, v = hsv[..., :1], hsv[..., 1:2], hsv[..., 2:]
  k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0], hsv.dtype) + 6.0 * h, 6.0)
  return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(img: jax.Array, shift: jax.Array) -> jax.Array:
  """Rotates the hue by `shift` (fraction of the colour wheel, in [-0.5, 0.5]) in HSV space."""
  if img.shape[-1] != 3:
    raise ValueError(f"adjust_hue needs an RGB [H, W, 3] image, got shape {img.shape}")
  hsv = _rgb_to_hsv(img)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
  return _hsv_to_rgb(hsv)


def solarize(img: jax.Array, threshold: float | jax.Array = 0.5) -> jax.Array:
  """Inverts the values at or above `threshold`: `where(img >= threshold, 1 - img, img)`."""
  return jnp.where(img >= threshold, 1.0 - img, img)


def gaussian_blur(img: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur with reflect padding (torchvision's `gaussian_blur`).

  The 1-D kernel is `exp(-x² / (2 sigma²))` at `x = -(k-1)/2 … (k-1)/2`, normalised to sum 1;
  `kernel_size` is odd and static, `sigma` may be traced.
  """
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"gaussian_blur needs an odd positive kernel_size, got {kernel_size}")
  radius = kernel_size // 2
  x = jnp.arange(kernel_size, dtype=jnp.float32) - radius
  weights = jnp.exp(-0.5 * jnp.square(x / sigma))
  weights = weights / weights.sum()
  height, width = img.shape[0], img.shape[1]
  padded = jnp.pad(img, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
  img = sum(weights[i] * padded[i : i + height] for i in range(kernel_size))
  padded = jnp.pad(img, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
  return sum(weights[i] * padded[:, i : i + width] for i in range(kernel_size))


def _resampling_weights(start: jax.Array, extent: jax.Array, n_in: int, n_out: int) -> jax.Array:
  """`[n_out, n_in]` weights of a triangle filter, widened by the shrink factor when shrinking."""
  centres = (start + extent * (jnp.arange(n_out) + 0.5) / n_out) * n_in
  support = jnp.maximum(1.0, extent * n_in / n_out)
  distance = jnp.abs(jnp.arange(n_in) + 0.5 - centres[:, None])
  weights = jnp.maximum(0.0, 1.0 - distance / support)
  # Centres lie inside the image, so every row has a pixel within half a pixel: the sum is >= 0.5.
  return weights / weights.sum(axis=1, keepdims=True)


def resized_crop(img: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """Resamples the crop `box` = `(y0, x0, h, w)` (fractions of the source) to `[size, size, C]`.

  `img` `[H, W, C]`; `box` `[4]`, inside the image. Output pixel `(r, c)` is centred on the
  source point `(y0 + h (r + 0.5) / size, x0 + w (c + 0.5) / size)`; source pixel `(i, j)` is
  centred on `((i + 0.5) / H, (j + 0.5) / W)`. Separable triangle filter of support
  `max(1, shrink factor)` pixels, normalised over the source pixels it covers: bilinear
  interpolation with the border pixels repeated when enlarging, antialiased bilinear (PIL,
  torchvision's `antialias=True`) when shrinking; the same as
  `jax.image.scale_and_translate(..., method="linear", antialias=True)`. Unlike torchvision,
  which crops whole pixels first, the filter may read source pixels just outside the box.
  """
  box = box.astype(jnp.float32)
  rows = _resampling_weights(box[0], box[2], img.shape[0], size)
  cols = _resampling_weights(box[1], box[3], img.shape[1], size)
  return jnp.einsum("rh,hwc,sw->rsc", rows, img, cols, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- random views
# A view's random numbers come from one `jax.random.uniform` draw (batched over examples and views
# in `two_views`): each separate draw inlines a Threefry hash, and dozens multiply compile time.

_CROP_DRAWS = 2 * _CROP_ATTEMPTS + 2
_JITTER_OPS = 4
# Offsets into a view's uniforms: crop, flip, jitter (apply, factors, order), gray, blur, solarise.
_FLIP = _CROP_DRAWS
_JITTER = _FLIP + 1
_GRAY = _JITTER + 1 + 2 * _JITTER_OPS
_BLUR = _GRAY + 1
_SOLARIZE = _BLUR + 2
_NUM_DRAWS = _SOLARIZE + 1


def sample_crop_box(
  u: jax.Array,
  *,
  height: int,
  width: int,
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> jax.Array:
  """A `RandomResizedCrop` box `(y0, x0, h, w)` in fractions of a `height × width` source.

  `u` holds `2 · 10 + 2` uniforms in [0, 1). Up to 10 attempts draw an area fraction
  `a ~ U(scale)` and an aspect ratio (width / height in pixels) `r` with `log r ~ U(log ratio)`,
  so `w = sqrt(a r H / W)`, `h = sqrt(a W / (r H))`; the first attempt that fits (`h, w <= 1`)
  is placed uniformly inside the image. If none fits: the largest centred crop whose aspect
  ratio is clipped into `ratio` (torchvision's fallback).
  """
  if u.shape != (_CROP_DRAWS,):
    raise ValueError(f"sample_crop_box needs [{_CROP_DRAWS}] uniforms, got shape {u.shape}")
  area = scale[0] + (scale[1] - scale[0]) * u[:_CROP_ATTEMPTS]
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[_CROP_ATTEMPTS : 2 * _CROP_ATTEMPTS])
  w = jnp.sqrt(area * aspect * height / width)
  h = jnp.sqrt(area / aspect * width / height)
  fits = (h <= 1.0) & (w <= 1.0)
  first = jnp.argmax(fits)
  source_ratio = width / height
  fallback_h, fallback_w = 1.0, 1.0
  if source_ratio < ratio[0]:
    fallback_h = source_ratio / ratio[0]
  elif source_ratio > ratio[1]:
    fallback_w = ratio[1] / source_ratio
  found = fits.any()
  h = jnp.where(found, h[first], fallback_h)
  w = jnp.where(found, w[first], fallback_w)
  position = jnp.where(found, u[2 * _CROP_ATTEMPTS :], 0.5)
  return jnp.stack([position[0] * (1.0 - h), position[1] * (1.0 - w), h, w]).astype(jnp.float32)


def _for_channels(params: ViewParams, channels: int) -> ViewParams:
  if channels == 3:
    return params
  # Saturation, hue and grayscale are meaningless (or identities) on one channel.
  return dataclasses.replace(params, saturation=0.0, hue=0.0, grayscale_p=0.0)


def _color_jitter(u: jax.Array, img: jax.Array, params: ViewParams) -> jax.Array:
  """torchvision's `ColorJitter` from `2 · 4` uniforms: factors, then the random order."""
  strengths = (params.brightness, params.contrast, params.saturation)
  blends = (adjust_brightness, adjust_contrast, adjust_saturation)
  ops = []
  for i, (op, s) in enumerate(zip(blends, strengths, strict=True)):
    if s > 0:
      lo = max(0.0, 1.0 - s)
      ops.append(functools.partial(op, factor=lo + (1.0 + s - lo) * u[i]))
  if params.hue > 0:
    ops.append(functools.partial(adjust_hue, shift=params.hue * (2.0 * u[3] - 1.0)))
  if not ops:
    return img
  order = jnp.argsort(u[_JITTER_OPS : _JITTER_OPS + len(ops)])
  # A loop rather than an unrolled chain keeps one copy of each operation in the compiled graph.
  return jax.lax.fori_loop(0, len(ops), lambda i, x: jax.lax.switch(order[i], ops, x), img)


def _with_probability(u: jax.Array, p: float, fn, img: jax.Array) -> jax.Array:
  if p <= 0:
    return img
  if p >= 1:
    return fn(img)
  return jnp.where(u < p, fn(img), img)


def augment_view(
  key: jax.Array, image: jax.Array, view_params: ViewParams, *, size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One augmented view of one image.

  Args:
    key: PRNG key of this example and view.
    image: `[H, W, C]` uint8, or float in [0, 1]; `C` is 1 or 3 (1: colour operations that need
      three channels are dropped).
    view_params: the view's parameters (static).
    size: output side in pixels (static); sets the blur kernel (`blur_kernel_size`).

  Returns:
    `(view [size, size, C] float32 in [0, 1], box [4] (y0, x0, h, w), flip bool [])`: the crop
    box is taken before the flip; a flipped view is the crop mirrored left-right.
  """
  return _view_from_uniforms(_uniforms(key), image, view_params, size=size)


_uniforms = functools.partial(jax.random.uniform, shape=(_NUM_DRAWS,), dtype=jnp.float32)


def _view_from_uniforms(
  u: jax.Array, image: jax.Array, view_params: ViewParams, *, size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"augment_view expects an [H, W, C] image, C in (1, 3), got {image.shape}")
  params = _for_channels(view_params, image.shape[-1])
  img = _to_float(image)
  height, width = img.shape[:2]
  crop = dict(height=height, width=width, scale=params.crop_scale, ratio=params.crop_ratio)
  box = sample_crop_box(u[:_CROP_DRAWS], **crop)
  img = jnp.clip(resized_crop(img, box, size), 0.0, 1.0)
  flip = u[_FLIP] < params.flip_p
  img = jnp.where(flip, img[:, ::-1], img)
  jitter = functools.partial(_color_jitter, u[_JITTER + 1 : _GRAY], params=params)
  img = _with_probability(u[_JITTER], params.jitter_p, jitter, img)
  img = _with_probability(u[_GRAY], params.grayscale_p, to_grayscale, img)
  lo, hi = params.blur_sigma
  sigma = lo + (hi - lo) * u[_BLUR + 1]
  blur = functools.partial(gaussian_blur, sigma=sigma, kernel_size=blur_kernel_size(size))
  img = _with_probability(u[_BLUR], params.blur_p, blur, img)
  img = _with_probability(u[_SOLARIZE], params.solarize_p, solarize, img)
  return jnp.clip(img, 0.0, 1.0), box, flip


def _to_float(images: jax.Array) -> jax.Array:
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images.astype(jnp.float32)
  raise ValueError(f"Images must be uint8 or float in [0, 1], got dtype {images.dtype}")


def two_views(key: jax.Array, images: jax.Array, *, recipe: str, size: int) -> dict[str, jax.Array]:
  """Two augmented views of every image, with each crop's geometry.

  Args:
    key: PRNG key; view `v` of example `i` uses `split(key, (2, n))[v, i]`.
    images: `[n, H, W, C]` uint8 (or float in [0, 1]), `C` in (1, 3).
    recipe: name in `RECIPES` (static).
    size: output side in pixels (static).

  Returns:
    `image` `[2, n, size, size, C]` float32 in [0, 1]; `box` `[2, n, 4]` float32 `(y0, x0, h, w)`
    of each crop as fractions of the source image, BEFORE the flip; `flip` `[2, n]` bool.
    Pixel `(r, c)` of a view shows the source point
    `(y0 + h (r + 0.5) / size, x0 + w (c' + 0.5) / size)` with `c' = size - 1 - c` when flipped
    and `c' = c` otherwise (source pixel `(i, j)` is centred on `((i + 0.5) / H, (j + 0.5) / W)`).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"two_views expects [n, H, W, C] images with C in (1, 3), got {images.shape}")
  return _views_of_batch(key, images, views=get_recipe(recipe).for_size(size), size=size)


# Keyed on the resolved views rather than the recipe's name, so that recipes sharing their views
# (simclr, mocov2, simsiam) share one compiled function when called outside a jitted step.
@functools.partial(jax.jit, static_argnames=("views", "size"))
def _views_of_batch(
  key: jax.Array, images: jax.Array, *, views: tuple[ViewParams, ViewParams], size: int
) -> dict[str, jax.Array]:
  keys = jax.random.split(key, (2, images.shape[0]))
  uniforms = jax.vmap(jax.vmap(_uniforms))(keys)
  outputs = []
  for u, params in zip(uniforms, views, strict=True):
    one = functools.partial(_view_from_uniforms, view_params=params, size=size)
    outputs.append(jax.vmap(one)(u, images))
  image, box, flip = (jnp.stack(parts) for parts in zip(*outputs, strict=True))
  return {"image": image, "box": box, "flip": flip}
