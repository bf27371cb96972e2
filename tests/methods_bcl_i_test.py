"""Tests for umm_jax.methods.bcl_i against NumPy and PIL references of the official BCL code.

References: BCL's `nt_xent(average=False)` written with exponentials and masks; the momentum loss
as the official per-sample Python loop; the weights as `calculate_momentum_weight` (with its
standard deviation); the RandAugment operations against PIL's (`ImageOps`, `ImageEnhance`,
`Image.transform`) on uint8 images, which is what the official `data/randaug.py` calls.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image, ImageEnhance, ImageOps

from umm_jax import data, train
from umm_jax.methods import bcl_i, simclr
from umm_jax.models import resnet

BCL = bcl_i.METHODS[0]
OPS = {fn.__name__.strip("_"): (i, lo, hi) for i, (fn, lo, hi) in enumerate(bcl_i.OPERATIONS)}
# One compilation per image size serves every operation: the operation is a traced index.
_apply_operation = jax.jit(bcl_i.apply_operation)


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def np_bcl_nt_xent(z1, z2, t):
  z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  n = len(z1)
  out = np.concatenate([z1, z2]).astype(np.float64)
  neg = np.exp(out @ out.T / t)
  mask = np.ones((n, 2 * n), bool)
  for i in range(n):
    mask[i, i] = mask[i, i + n] = False
  mask = np.concatenate([mask, mask])
  neg = neg[mask].reshape(2 * n, -1).sum(1)
  pos = np.exp(np.sum(np.float64(z1) * z2, -1) / t)
  pos = np.concatenate([pos, pos])
  return (-np.log(pos / (pos + neg))).reshape(2, n).mean(0)


def test_per_sample_loss_matches_the_official_and_averages_to_simclr():
  z1, z2 = random((2, 6, 8), 0)
  losses = jax.jit(bcl_i.per_sample_nt_xent, static_argnames="temperature")(z1, z2, temperature=0.2)
  np.testing.assert_allclose(losses, np_bcl_nt_xent(z1, z2, 0.2), rtol=1e-5)
  np.testing.assert_allclose(losses.mean(), simclr.nt_xent(z1, z2, temperature=0.2)[0], rtol=1e-5)


def test_momentum_losses_follow_the_official_loop():
  rng = np.random.default_rng(1)
  momentum, seen = np.zeros(10), np.zeros(10, bool)
  m, s = jnp.zeros(10), jnp.zeros(10, bool)
  for _ in range(3):
    index = rng.permutation(10)[:4]
    losses = rng.uniform(size=4)
    m, s = bcl_i.update_momentum_losses(m, s, jnp.asarray(index), jnp.asarray(losses), beta=0.95)
    for i, loss in zip(index, losses, strict=True):
      momentum[i] = 0.05 * loss + 0.95 * momentum[i] if seen[i] else loss
      seen[i] = True
    np.testing.assert_allclose(m, momentum, rtol=1e-6)
    np.testing.assert_array_equal(s, seen)


def test_weights_match_the_official_normalisation():
  momentum = np.random.default_rng(2).uniform(size=12)
  seen = np.ones(12, bool)
  w = (momentum - momentum.mean()) / momentum.std(ddof=1)  # torch.std is unbiased
  expected = (w / np.abs(w).max()) / 2 + 0.5
  np.testing.assert_allclose(bcl_i.memorization_weights(momentum, seen), expected, rtol=1e-5)
  # Unseen images get 0 and leave the statistics of the seen ones alone.
  seen[[3, 7]] = False
  got = bcl_i.memorization_weights(momentum, seen)
  kept = momentum[seen] - momentum[seen].mean()
  np.testing.assert_allclose(got[seen], kept / np.abs(kept).max() / 2 + 0.5, rtol=1e-5)
  assert got[3] == got[7] == 0
  np.testing.assert_allclose(bcl_i.memorization_weights(np.ones(4), np.ones(4, bool)), 0.5)


def test_objective_tracks_scores_and_refreshes_weights_at_epoch_ends():
  hp = {**bcl_i.DEFAULTS, "num_samples": 10, "steps_per_epoch": 2}
  state = BCL.init_state(hp, jax.random.key(0))
  step = jax.jit(lambda o, s: BCL.objective(o, None, s, hp))
  momentum, seen = np.zeros(10), np.zeros(10, bool)
  for t, index in enumerate(([0, 1, 2], [3, 4, 5], [6, 1, 9])):
    z = random((2, 3, 8), 10 + t)
    online = {"projection": z, "index": jnp.broadcast_to(jnp.asarray(index), (2, 3))}
    loss, metrics, state = step(online, state)
    per_sample = np_bcl_nt_xent(z[0], z[1], hp["temperature"])
    np.testing.assert_allclose(loss, per_sample.mean(), rtol=1e-5)
    for i, value in zip(index, per_sample, strict=True):
      momentum[i] = 0.05 * value + 0.95 * momentum[i] if seen[i] else value
      seen[i] = True
    np.testing.assert_allclose(state["momentum"], momentum, rtol=1e-5)
    assert int(state["step"]) == t + 1
    if t == 0:  # the first epoch runs without boost
      assert np.all(np.asarray(state["weight"]) == 0)
    elif t == 1:  # the end of the first epoch: weights from the momentum losses
      weights = np.asarray(bcl_i.memorization_weights(jnp.asarray(momentum), jnp.asarray(seen)))
      np.testing.assert_allclose(state["weight"], weights, rtol=1e-6)
      assert state["weight"][seen].max() == 1.0 and state["weight"][~seen].max() == 0
      epoch_weights = np.asarray(state["weight"])
    else:  # mid-epoch: the weights stay those of the last epoch's end
      np.testing.assert_array_equal(state["weight"], epoch_weights)
  assert {"batch_weight", "z_std"} <= set(metrics)


# ---------------------------------------------------------------------------- RandAugment


def _image(seed, size=12):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _run(name, img, level, u=(0.9, 0.5, 0.5)):
  op, _, _ = OPS[name]
  out = _apply_operation(
    jnp.asarray(img, jnp.float32) / 255.0, jnp.asarray(op), jnp.asarray(level), jnp.asarray(u)
  )
  return np.asarray(out) * 255.0


def _value(name, level):
  _, lo, hi = OPS[name]
  return lo + level * (hi - lo)


@pytest.mark.parametrize(
  ("name", "pil", "atol"),
  [
    ("auto_contrast", lambda im, v: ImageOps.autocontrast(im), 1.0),
    ("invert", lambda im, v: ImageOps.invert(im), 1e-3),
    ("equalize", lambda im, v: ImageOps.equalize(im), 1e-3),
    ("solarize", lambda im, v: ImageOps.solarize(im, v), 1e-3),
    ("posterize", lambda im, v: ImageOps.posterize(im, max(1, int(v))), 1e-3),
    ("contrast", lambda im, v: ImageEnhance.Contrast(im).enhance(v), 1.5),
    ("color", lambda im, v: ImageEnhance.Color(im).enhance(v), 1.5),
    ("brightness", lambda im, v: ImageEnhance.Brightness(im).enhance(v), 1.0),
    ("sharpness", lambda im, v: ImageEnhance.Sharpness(im).enhance(v), 1.5),
  ],
)
@pytest.mark.parametrize("level", [0.2, 0.7])
def test_pixel_operations_match_pil(name, pil, atol, level):
  img = _image(3)
  if name == "auto_contrast":  # give the channels a narrow range to stretch
    img = (img // 4 + 60).astype(np.uint8)
  expected = np.asarray(pil(Image.fromarray(img), _value(name, level)), np.float64)
  np.testing.assert_allclose(_run(name, img, level), expected, atol=atol)


@pytest.mark.parametrize("name", ["shear_x", "shear_y", "translate_x", "translate_y", "rotate"])
@pytest.mark.parametrize("sign", [0.2, 0.8])  # u[0] > 0.5 negates the value, as random.random()
def test_geometric_operations_match_pil(name, sign):
  img = _image(4, size=16)
  v = _value(name, 0.37)
  v = -v if sign > 0.5 else v
  im = Image.fromarray(img)
  size = im.size
  pil = {
    "shear_x": lambda: im.transform(size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda: im.transform(size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "translate_x": lambda: im.transform(size, Image.AFFINE, (1, 0, v * size[0], 0, 1, 0)),
    "translate_y": lambda: im.transform(size, Image.AFFINE, (1, 0, 0, 0, 1, v * size[1])),
    "rotate": lambda: im.rotate(v),
  }[name]()
  got = _run(name, img, 0.37, u=(sign, 0.5, 0.5))
  mismatched = np.mean(np.abs(got - np.asarray(pil, np.float64)).max(-1) > 1e-3)
  assert mismatched < 0.02, (name, mismatched)  # pixel-centre ties may round differently


def test_cutout_matches_numpy():
  img = _image(5, size=10)
  level, u = 0.5, (0.0, 0.42, 0.77)
  side = _value("cutout", level) * 10
  x0 = int(max(0.0, u[1] * 10 - side / 2))
  y0 = int(max(0.0, u[2] * 10 - side / 2))
  expected = img.astype(np.float64).copy()
  for y in range(10):
    for x in range(10):
      if x0 <= x < x0 + side and y0 <= y < y0 + side:
        expected[y, x] = (125, 123, 114)
  np.testing.assert_allclose(_run("cutout", img, level, u), expected, atol=1e-3)


def test_boost_is_identity_at_weight_zero_and_changes_views_at_one():
  views = jnp.asarray(
    np.stack([_image(6, 8), _image(7, 8)])[None].repeat(2, 0) / 255.0, jnp.float32
  )
  boost = jax.jit(bcl_i.boost_views, static_argnames=("rand_ops", "rand_strength"))
  kw = dict(rand_ops=2, rand_strength=30.0)
  same = boost(jax.random.key(0), views, jnp.zeros(2), **kw)
  np.testing.assert_array_equal(same, views)
  changed = boost(jax.random.key(0), views, jnp.ones(2), **kw)
  assert changed.shape == views.shape and float(changed.min()) >= 0 and float(changed.max()) <= 1
  assert np.abs(np.asarray(changed) - np.asarray(views)).max(axis=(2, 3, 4)).min() > 0
  with pytest.raises(ValueError, match="weights"):
    bcl_i.boost_views(jax.random.key(0), views, jnp.zeros(3), **kw)


# ------------------------------------------------------------------------------- plumbing


def test_batches_give_each_image_its_row():
  ds = data.synthetic("train", num_examples=12, image_size=4, channels=3, num_classes=3, seed=0)
  order = data.epoch_order(12, seed=1, epoch=2)
  got = list(
    data.batches(
      ds, global_batch=4, seed=1, epoch=2, process_index=1, process_count=2, with_index=True
    )
  )
  assert len(got) == 3
  for s, (images, labels, rows) in enumerate(got):
    np.testing.assert_array_equal(rows, order[4 * s + 2 : 4 * s + 4])
    np.testing.assert_array_equal(images, ds.images[rows])
    np.testing.assert_array_equal(labels, ds.labels[rows])
    assert rows.dtype == np.int32


def test_training_step_needs_the_index():
  hp = {**bcl_i.DEFAULTS, "proj_hidden_dim": 8, "proj_output_dim": 4, "num_samples": 8}
  model = resnet.create("resnet10", stem="cifar", width=4)
  common = dict(model=model, heads=BCL.heads(hp), method=BCL, hp=hp, tx=optax.sgd(0.1))
  state = train.init_state(
    jax.random.key(0), **common, input_shape=(8, 8, 3), num_classes=2, probe_tx=optax.sgd(0.1)
  )
  assert state.method_state["momentum"].shape == (8,)
  step = train.make_train_step(
    **common,
    probe_tx=optax.sgd(0.1),
    num_classes=2,
    image_size=8,
    mean=jnp.zeros(3),
    std=jnp.ones(3),
    total_steps=1,
  )
  batch = {"image": jnp.zeros((4, 8, 8, 3), jnp.uint8), "label": jnp.zeros(4, jnp.int32)}
  with pytest.raises(ValueError, match=r"\['index'\].*with_index=True"):
    step(state, batch, jax.random.key(0))
