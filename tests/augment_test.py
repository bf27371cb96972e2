"""Tests for umm_jax.augment: each operation against NumPy/colorsys references, crop geometry and
statistics, recipes, determinism, and output shapes/ranges of every recipe."""

import colorsys
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax import augment

RNG = np.random.default_rng(0)
GRAY = np.array([0.299, 0.587, 0.114], np.float32)
MINIMAL = augment.RECIPES["minimal"].views[0]


# Jitted once per shape and reused by several tests: compiling dominates this file's runtime.
adjust_hue = jax.jit(augment.adjust_hue)
gaussian_blur = jax.jit(augment.gaussian_blur, static_argnames="kernel_size")
resized_crop = jax.jit(augment.resized_crop, static_argnames="size")


def _image(h=9, w=9, c=3, seed=0):
  return np.random.default_rng(seed).uniform(size=(h, w, c)).astype(np.float32)


def _uint8_images(n, h, w, c, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


# ----------------------------------------------------------------------------- identities


def test_identity_settings_are_identities():
  img = _image()
  identities = {
    "brightness 1": augment.adjust_brightness(img, 1.0),
    "contrast 1": augment.adjust_contrast(img, 1.0),
    "saturation 1": augment.adjust_saturation(img, 1.0),
    "hue 0": adjust_hue(img, 0.0),
    "blur sigma 1e-3": gaussian_blur(img, 1e-3, 5),
    "blur kernel 1": gaussian_blur(img, 1.5, 1),
    "solarize threshold 1.01": augment.solarize(img, 1.01),
    "full crop, same size": resized_crop(img, jnp.array([0.0, 0.0, 1.0, 1.0]), 9),
  }
  for name, out in identities.items():
    np.testing.assert_allclose(out, img, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- colour references


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.4])
def test_blends_match_torchvision_formulas(factor):
  img = _image()
  gray = img @ GRAY
  blend = lambda other: np.clip(factor * img + (1 - factor) * other, 0, 1)
  np.testing.assert_allclose(augment.adjust_brightness(img, factor), blend(0.0), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_contrast(img, factor), blend(gray.mean()), atol=1e-6)
  np.testing.assert_allclose(
    augment.adjust_saturation(img, factor), blend(gray[..., None]), atol=1e-6
  )
  one = img[..., :1]
  expected = np.clip(factor * one + (1 - factor) * one.mean(), 0, 1)
  np.testing.assert_allclose(augment.adjust_contrast(one, factor), expected, atol=1e-6)


def test_grayscale_uses_luma_weights():
  img = _image()
  out = np.asarray(augment.to_grayscale(img))
  np.testing.assert_allclose(out, np.repeat((img @ GRAY)[..., None], 3, -1), atol=1e-6)
  np.testing.assert_array_equal(augment.to_grayscale(img[..., :1]), img[..., :1])


@pytest.mark.parametrize("shift", [-0.45, -0.1, 0.1, 0.3])
def test_hue_matches_colorsys(shift):
  img = _image()
  # Edge cases: gray, black, white, the primaries and a secondary.
  img[0, :7] = [[0.5] * 3, [0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]
  expected = np.empty_like(img)
  for idx in np.ndindex(img.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*img[idx])
    expected[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  np.testing.assert_allclose(adjust_hue(img, shift), expected, atol=2e-6)


def test_solarize_inverts_at_and_above_threshold():
  img = np.array([[[0.0, 0.25, 0.49]], [[0.5, 0.9, 1.0]]], np.float32)
  default = np.array([[[0.0, 0.25, 0.49]], [[0.5, 0.1, 0.0]]], np.float32)
  np.testing.assert_allclose(augment.solarize(img), default, atol=1e-6)
  quarter = np.array([[[0.0, 0.75, 0.51]], [[0.5, 0.1, 0.0]]], np.float32)
  np.testing.assert_allclose(augment.solarize(img, 0.25), quarter, atol=1e-6)


# ----------------------------------------------------------------------------- blur and resampling


def _reflect(i, n):
  return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


@pytest.mark.parametrize(("sigma", "kernel_size"), [(0.7, 5), (1.8, 7)])
def test_gaussian_blur_matches_direct_2d_convolution(sigma, kernel_size):
  img = _image()
  n, r = img.shape[0], kernel_size // 2
  g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  kernel = np.outer(g, g) / np.outer(g, g).sum()
  expected = np.zeros_like(img)
  for y, x in np.ndindex(img.shape[:2]):
    for dy, dx in np.ndindex(kernel.shape):
      expected[y, x] += kernel[dy, dx] * img[_reflect(y + dy - r, n), _reflect(x + dx - r, n)]
  np.testing.assert_allclose(gaussian_blur(img, sigma, kernel_size), expected, atol=1e-5)


def _bilinear(img, box, size):
  """Textbook bilinear sampling at the crop's output-pixel centres, border pixels repeated."""
  h, w = img.shape[:2]
  ys = np.clip(box[0] * h + (np.arange(size) + 0.5) * box[2] * h / size - 0.5, 0, h - 1)
  xs = np.clip(box[1] * w + (np.arange(size) + 0.5) * box[3] * w / size - 0.5, 0, w - 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
  bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
  return top * (1 - fy) + bottom * fy


def _antialiased(img, box, size):
  """PIL-style antialiased bilinear: a triangle filter widened by the shrink factor."""
  out = img
  for axis, (start, extent) in enumerate([(box[0], box[2]), (box[1], box[3])]):
    n = img.shape[axis]
    centres = start * n + (np.arange(size) + 0.5) * extent * n / size
    support = max(1.0, extent * n / size)
    weights = np.maximum(0, 1 - np.abs(np.arange(n)[None] + 0.5 - centres[:, None]) / support)
    weights /= weights.sum(1, keepdims=True)
    out = np.moveaxis(np.tensordot(weights, np.moveaxis(out, axis, 0), axes=1), 0, axis)
  return out


def test_resized_crop_enlarging_is_bilinear():
  img = _image()
  box = np.array([0.1, 0.25, 0.5, 0.6], np.float32)
  out = resized_crop(img, jnp.asarray(box), 16)
  np.testing.assert_allclose(out, _bilinear(img, box, 16), atol=1e-5)


def test_resized_crop_shrinking_is_antialiased():
  img = _image()
  box = np.array([0.05, 0.1, 0.9, 0.8], np.float32)
  np.testing.assert_allclose(
    resized_crop(img, jnp.asarray(box), 3), _antialiased(img, box, 3), atol=1e-5
  )
  # Halving (8 px → 4 px): the triangle of half-width 2 weighs the four nearest pixels
  # 1/8, 3/8, 3/8, 1/8; at the image's first pixel the missing weight is renormalised away.
  x = img[0, :, 0]
  rows = np.broadcast_to(x, (9, 9))[..., None]
  out = np.asarray(resized_crop(rows, jnp.array([0.0, 0.0, 8 / 9, 8 / 9]), 4))[0, :, 0]
  first = (3 * x[0] + 3 * x[1] + x[2]) / 7
  rest = [(x[2 * i - 1] + 3 * x[2 * i] + 3 * x[2 * i + 1] + x[2 * i + 2]) / 8 for i in (1, 2, 3)]
  np.testing.assert_allclose(out, [first, *rest], atol=1e-6)


# ----------------------------------------------------------------------------- crops and flips


@functools.partial(jax.jit, static_argnames=("params", "size"))
def _views(keys, img, params, size):
  return jax.vmap(lambda k: augment.augment_view(k, img, params, size=size))(keys)


def test_flip_and_box_geometry_match_the_view():
  """A ramp image encodes source coordinates: each output pixel must show its documented point."""
  h, w, size = 16, 20, 32
  ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
  ramp = np.stack([ys, xs, np.full_like(ys, 0.5)], -1).astype(np.float32)
  views, boxes, flips = map(
    np.asarray, _views(jax.random.split(jax.random.key(1), 24), ramp, MINIMAL, size)
  )
  assert flips.any() and not flips.all()
  grid = (np.arange(size) + 0.5) / size
  for view, box, flip in zip(views, boxes, flips, strict=True):
    crop = np.asarray(resized_crop(ramp, jnp.asarray(box), size))
    np.testing.assert_allclose(view[:, ::-1] if flip else view, crop, atol=1e-6)
    cols = grid[::-1] if flip else grid
    want_y, want_x = box[0] + box[2] * grid, box[1] + box[3] * cols
    # Within half a source pixel of the border the sampler repeats the edge pixel.
    inside_y = (want_y > 0.5 / h) & (want_y < 1 - 0.5 / h)
    inside_x = (want_x > 0.5 / w) & (want_x < 1 - 0.5 / w)
    np.testing.assert_allclose(
      view[inside_y, :, 0],
      np.broadcast_to(want_y[inside_y, None], (inside_y.sum(), size)),
      atol=1e-5,
    )
    np.testing.assert_allclose(
      view[:, inside_x, 1],
      np.broadcast_to(want_x[None, inside_x], (size, inside_x.sum())),
      atol=1e-5,
    )


def _torchvision_crop_stats(rng, n, height, width, scale, ratio):
  """Area fractions and aspect ratios of `RandomResizedCrop.get_params`, without rounding."""
  areas, ratios = [], []
  while len(areas) < n:
    for _ in range(10):
      target = height * width * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
      w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
      if 0 < w <= width and 0 < h <= height:
        areas.append(w * h / (height * width))
        ratios.append(w / h)
        break
  return np.array(areas), np.array(ratios)


def test_crops_stay_inside_and_follow_the_recipe_ranges():
  n, height, width, size = 512, 16, 24, 16
  images = _uint8_images(n, height, width, 1)
  out = augment.two_views(jax.random.key(2), images, recipe="minimal", size=size)
  assert out["image"].shape == (2, n, size, size, 1)
  y0, x0, h, w = np.asarray(out["box"]).reshape(-1, 4).T
  assert (y0 >= 0).all() and (x0 >= 0).all()
  assert (y0 + h <= 1 + 1e-6).all() and (x0 + w <= 1 + 1e-6).all()
  (lo, hi), (rlo, rhi) = augment.RECIPES["minimal"].for_size(size)[0].crop_scale, MINIMAL.crop_ratio
  area, ratio = h * w, (w * width) / (h * height)
  fallback = (
    np.isclose(h, 1) & np.isclose(w, (4 / 3) / (width / height)) & np.isclose(x0, (1 - w) / 2)
  )
  sampled = ~fallback
  assert sampled.mean() > 0.95
  assert ((area[sampled] >= lo - 1e-6) & (area[sampled] <= hi + 1e-6)).all()
  assert ((ratio[sampled] >= rlo - 1e-5) & (ratio[sampled] <= rhi + 1e-5)).all()
  ref_area, ref_ratio = _torchvision_crop_stats(RNG, 20000, height, width, (lo, hi), (rlo, rhi))
  k = sampled.sum()
  assert abs(area[sampled].mean() - ref_area.mean()) < 4 * ref_area.std() / math.sqrt(k)
  log_r = np.log(ratio[sampled])
  assert abs(log_r.mean() - np.log(ref_ratio).mean()) < 4 * np.log(ref_ratio).std() / math.sqrt(k)
  # Positions are uniform over the free room: y0 / (1 - h) ~ U(0, 1).
  free = sampled & (h < 0.95)
  rel = y0[free] / (1 - h[free])
  assert abs(rel.mean() - 0.5) < 4 * math.sqrt(1 / 12 / free.sum())


@pytest.mark.parametrize(
  ("height", "width", "expected"),
  [(16, 24, (0.0, 1 / 18, 1.0, 8 / 9)), (24, 16, (1 / 18, 0.0, 8 / 9, 1.0)), (8, 8, (0, 0, 1, 1))],
)
def test_crop_falls_back_to_a_centre_crop(height, width, expected):
  # An area fraction of 1 with a non-unit aspect ratio never fits: every attempt fails.
  u = jax.random.uniform(jax.random.key(3), (22,))
  box = augment.sample_crop_box(
    u, height=height, width=width, scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3)
  )
  np.testing.assert_allclose(box, expected, atol=1e-6)


# ----------------------------------------------------------------------------- recipes and views


def test_recipes_follow_the_papers_and_image_sizes():
  byol = augment.get_recipe("byol")
  assert [v.blur_p for v in byol.views] == [1.0, 0.1]
  assert [v.solarize_p for v in byol.views] == [0.0, 0.2]
  simclr = augment.get_recipe("simclr").views[0]
  jitter = (simclr.brightness, simclr.contrast, simclr.saturation, simclr.hue, simclr.jitter_p)
  assert jitter == (0.4, 0.4, 0.4, 0.1, 0.8)
  for recipe in augment.RECIPES.values():
    for small, large in zip(recipe.for_size(32), recipe.for_size(64), strict=True):
      assert small.crop_scale == (0.2, 1.0) and small.blur_p == 0.0
      assert large in recipe.views and large.crop_scale[0] <= 0.14
  assert [augment.blur_kernel_size(s) for s in (64, 96, 224)] == [7, 9, 23]


def test_unknown_recipe_and_bad_inputs_raise():
  with pytest.raises(ValueError, match="minimal.*simclr"):
    augment.get_recipe("simclr_v9")
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="valid recipes"):
    augment.two_views(key, _uint8_images(2, 8, 8, 3), recipe="nope", size=8)
  with pytest.raises(ValueError, match=r"\(2, 8, 8, 2\)"):
    augment.two_views(key, _uint8_images(2, 8, 8, 2), recipe="minimal", size=8)
  with pytest.raises(ValueError, match="dtype"):
    augment.two_views(key, _uint8_images(2, 8, 8, 3).astype(np.int32), recipe="minimal", size=8)


def test_jitter_and_grayscale_draws_follow_their_ranges_and_probabilities():
  """On a constant colour (full-image crop, no flip), brightness scales V and hue rotates H."""
  params = augment.ViewParams(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    brightness=0.4,
    hue=0.1,
    jitter_p=0.5,
    grayscale_p=0.3,
  )
  n, colour = 600, np.array([0.5, 0.2, 0.1], np.float32)
  img = np.broadcast_to(colour, (4, 4, 3))
  views, boxes, flips = _views(jax.random.split(jax.random.key(6), n), img, params, 4)
  np.testing.assert_allclose(boxes, np.broadcast_to([0.0, 0.0, 1.0, 1.0], (n, 4)), atol=1e-6)
  assert not np.asarray(flips).any()
  pixels = np.asarray(views)[:, 1, 2]
  gray = np.ptp(pixels, axis=1) < 1e-6
  assert abs(gray.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
  h0, s0, v0 = colorsys.rgb_to_hsv(*colour)
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels[~gray]])
  np.testing.assert_allclose(hsv[:, 1], s0, atol=1e-5)
  shift = (hsv[:, 0] - h0 + 0.5) % 1.0 - 0.5
  factor = hsv[:, 2] / v0
  jittered = (np.abs(shift) > 1e-5) | (np.abs(factor - 1) > 1e-5)
  assert abs(jittered.mean() - 0.5) < 4 * math.sqrt(0.25 / len(hsv))
  assert (
    np.abs(shift).max() <= 0.1 + 1e-5 and 0.6 - 1e-5 <= factor.min() <= factor.max() <= 1.4 + 1e-5
  )
  # Uniform draws: the extremes of the ranges are reached, and the means are central.
  assert np.abs(shift[jittered]).max() > 0.09 and factor[jittered].min() < 0.65
  k = jittered.sum()
  assert abs(factor[jittered].mean() - 1.0) < 4 * 0.8 / math.sqrt(12 * k)
  assert abs(shift[jittered].mean()) < 4 * 0.2 / math.sqrt(12 * k)


CASES = [(3, 32, 32), (1, 28, 28)]


@pytest.mark.parametrize("recipe", sorted(augment.RECIPES))
@pytest.mark.parametrize(("channels", "source", "size"), CASES)
def test_two_views_shapes_dtypes_and_range(recipe, channels, source, size):
  images = _uint8_images(6, source, source, channels)
  out = augment.two_views(jax.random.key(4), images, recipe=recipe, size=size)
  assert out["image"].shape == (2, 6, size, size, channels)
  assert out["image"].dtype == jnp.float32
  assert out["box"].shape == (2, 6, 4) and out["box"].dtype == jnp.float32
  assert out["flip"].shape == (2, 6) and out["flip"].dtype == jnp.bool_
  image = np.asarray(out["image"])
  assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
  assert not np.allclose(image[0], image[1])


def test_large_images_are_blurred_with_the_size_based_kernel():
  images = _uint8_images(4, 72, 80, 3)
  out = augment.two_views(jax.random.key(5), images, recipe="byol", size=64)
  image = np.asarray(out["image"])
  assert image.shape == (2, 4, 64, 64, 3) and image.min() >= 0.0 and image.max() <= 1.0


def test_blur_and_solarisation_draws():
  """Rows constant along y make the 3-tap blur (32 px) a 1-D filter `[a, 1 - 2a, a]` to fit."""
  params = augment.ViewParams(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    blur_p=0.5,
    blur_sigma=(1.0, 2.0),
    solarize_p=0.5,
  )
  x = np.random.default_rng(1).uniform(0.52, 0.6, 32).astype(np.float32)
  img = np.broadcast_to(x[None, :, None], (32, 32, 1))
  views, _, _ = _views(jax.random.split(jax.random.key(8), 200), img, params, 32)
  rows = np.asarray(views)[:, 0, :, 0]
  solarised = rows.mean(axis=1) < 0.5
  rows = np.where(solarised[:, None], 1 - rows, rows)
  laplacian = x[:-2] + x[2:] - 2 * x[1:-1]
  a = (rows[:, 1:-1] - x[1:-1]) @ laplacian / (laplacian @ laplacian)
  np.testing.assert_allclose(rows[:, 1:-1], x[1:-1] + a[:, None] * laplacian, atol=1e-5)
  blurred = a > 1e-4
  np.testing.assert_allclose(rows[~blurred], np.broadcast_to(x, rows[~blurred].shape), atol=1e-6)
  # a = e / (1 + 2e) with e = exp(-1 / (2 sigma²)): sigma in [1, 2] gives a in [0.2741, 0.3190].
  assert 0.2741 - 1e-4 <= a[blurred].min() and a[blurred].max() <= 0.3190 + 1e-4
  # Each fires with probability 1/2, independently of the other.
  for fired, p in ((blurred, 0.5), (solarised, 0.5), (blurred & solarised, 0.25)):
    assert abs(fired.mean() - p) < 4 * math.sqrt(p * (1 - p) / len(fired))


def test_two_views_is_deterministic_and_accepts_float_images():
  images = _uint8_images(6, 32, 32, 3)
  run = lambda key, x: augment.two_views(key, x, recipe="simclr", size=32)
  first, again = run(jax.random.key(4), images), run(jax.random.key(4), images)
  other = run(jax.random.key(7), images)
  for name in ("image", "box", "flip"):
    np.testing.assert_array_equal(first[name], again[name])
  assert not np.allclose(first["image"], other["image"])
  assert not np.allclose(first["box"], other["box"])
  as_float = run(jax.random.key(4), images.astype(np.float32) / 255.0)
  np.testing.assert_allclose(as_float["image"], first["image"], atol=1e-6)


def test_two_views_under_x64_match_float32():
  # jax_enable_x64 must not change the views (float32 uniforms, float32 pixels): the UMM step can
  # then run in float64 for checking.
  images = np.random.default_rng(5).integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
  key = jax.random.key(2)
  expected = augment.two_views(key, jnp.asarray(images), recipe="simclr", size=8)
  with jax.enable_x64(True):
    views = augment.two_views(key, jnp.asarray(images), recipe="simclr", size=8)
    assert views["image"].dtype == jnp.float32
  np.testing.assert_allclose(views["image"], expected["image"], atol=1e-6)
  np.testing.assert_allclose(views["box"], expected["box"], atol=1e-6)
