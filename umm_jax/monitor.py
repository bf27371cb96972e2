"""Layer-wise, label-free rate reduction of an encoder (the paper's Section 4 signal).

`layer_rate_reduction` extracts the pooled features of each stage for two augmented views of
training images and computes ΔR (`umm_jax.crr.dataset_rate_reduction`) per layer, in chunks of
`m` views. The `monitor` stage runs it on the configured encoder and writes `monitor.json`.
"""

import json
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from umm_jax import augment, crr, data, methods
from umm_jax.models import resnet


def pooled_features(model, variables, x: jax.Array, *, layers: Sequence[str]) -> dict:
  """Global-average-pooled stage outputs `{layer: [N, c]}` of images `x` `[N, H, W, C]`."""
  out = model.apply(variables, x, train=False)
  return {layer: out[layer].astype(jnp.float32).mean(axis=(1, 2)) for layer in layers}


def layer_rate_reduction(
  model,
  variables,
  images: np.ndarray,
  key: jax.Array,
  *,
  layers: Sequence[str],
  recipe: str,
  image_size: int,
  mean: np.ndarray,
  std: np.ndarray,
  chunk_size: int,
  batch_size: int,
  eps2: float,
  membership: str,
  temperature: float,
) -> dict[str, crr.RateReduction]:
  """ΔR per layer of the pooled features of two augmented views of `images` `[n, H, W, C]`.

  Views come from `augment.two_views` with `recipe`, standardised by `mean`/`std` `[C]`, and pass
  the encoder in inference mode in batches of `batch_size` images. Each layer's `[2, n, c]`
  features are cut into chunks of `chunk_size` views holding both views of their images.
  """

  # Variables are an argument, not a closure, so XLA does not embed them as constants.
  @jax.jit
  def features(variables, batch, batch_key):
    views = augment.two_views(batch_key, batch, recipe=recipe, size=image_size)
    x = (views["image"] - mean) / std
    n = batch.shape[0]
    feats = pooled_features(model, variables, x.reshape(2 * n, *x.shape[2:]), layers=layers)
    return {k: v.reshape(2, n, -1) for k, v in feats.items()}

  parts = []
  for i, start in enumerate(range(0, len(images), batch_size)):
    batch = jnp.asarray(images[start : start + batch_size])
    parts.append(features(variables, batch, jax.random.fold_in(key, i)))
  feats = {layer: jnp.concatenate([p[layer] for p in parts], axis=1) for layer in layers}
  rate = jax.jit(
    lambda z: crr.dataset_rate_reduction(
      z, chunk_size=chunk_size, membership=membership, eps2=eps2, temperature=temperature
    )
  )
  return {layer: jax.tree.map(float, rate(feats[layer])) for layer in layers}


def run_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """The `monitor` stage: layer-wise ΔR of the encoder, printed and written to monitor.json.

  Until pre-training lands the encoder is the randomly initialised one of `config.seed`.
  """
  key_model, key_views = jax.random.split(jax.random.key(config.seed))
  train_set = data.load(config.data, "train")
  images = train_set.images[: config.monitor.num_images]
  mean, std = train_set.channel_stats()
  model = resnet.create(
    config.model.name,
    stem=config.model.stem,
    width=config.model.width,
    dtype=jnp.dtype(config.model.dtype),
  )
  shape = (1, config.data.image_size, config.data.image_size, images.shape[-1])
  variables = model.init(key_model, jnp.zeros(shape), train=False)
  recipe = methods.get(config.method.name).recipe
  start = time.perf_counter()
  rates = layer_rate_reduction(
    model,
    variables,
    images,
    key_views,
    layers=config.monitor.layers,
    recipe=recipe,
    image_size=config.data.image_size,
    mean=mean,
    std=std,
    chunk_size=config.monitor.chunk_size,
    batch_size=config.monitor.batch_size,
    eps2=config.monitor.eps2,
    membership=config.monitor.membership,
    temperature=config.monitor.temperature,
  )
  seconds = time.perf_counter() - start
  result = {
    "encoder": f"{config.model.name} (random init, seed {config.seed})",
    "protocol": {
      "views": f"2 x {len(images)} {config.data.name} train images, recipe {recipe!r}",
      "chunk_size": config.monitor.chunk_size,
      "eps2": config.monitor.eps2,
      "membership": config.monitor.membership,
      "temperature": config.monitor.temperature,
    },
    "layers": {layer: r._asdict() for layer, r in rates.items()},
    "seconds": seconds,
  }
  (workdir / "monitor.json").write_text(json.dumps(result, indent=2))
  lines = [f"{'layer':8s} {'dR':>8s} {'R':>8s} {'Rc':>8s}"]
  lines += [f"{k:8s} {r.delta:8.4f} {r.rate:8.4f} {r.compressed:8.4f}" for k, r in rates.items()]
  print("\n".join(lines) + f"\n({seconds:.1f} s; written to {workdir / 'monitor.json'})")
  logging.info("monitor: %s", result)
