"""Layer-wise overfitting monitor across checkpoints (the paper's Section 4, Tables 9 and 11).

For every checkpoint of a pre-training run and every monitored stage (`layer1`…`layer4`; the
paper compares an early and the last one), three signals and each one's wall-clock cost:
- kNN test accuracy (`evaluate.knn_accuracy`; `k = 5`, majority vote, as the paper) and
- linear-probe test accuracy (`evaluate.linear_probe`; SGD momentum 0.9, lr 1e-2 → 1e-6
  exponentially, `linear_epochs`: the paper's 500, fewer in CPU demos), both on the pooled
  features of non-augmented images (`evaluate.extract_features`), and
- label-free ΔR (`layer_rate_reduction`): soft membership over two augmented views of the first
  `num_images` training images, in chunks of `chunk_size` views (spec section 2).

`run` measures the checkpoints of a folder and writes `monitor.json` after each one, so a rerun
measures only the checkpoints not yet in it (a rerun under another protocol is refused). Layout:
  {"protocol": {...}, "encoder": str, "checkpoint_dir": str,
   "checkpoints": {"<step>": {"step", "epoch", "layers": {layer: {"knn_top1", "knn_top5",
     "linear_top1", "linear_top5", "delta", "rate", "compressed"}},
     "seconds": {"features", "knn", "linear", "rate_reduction"}}}}
"features" is the forward pass shared by kNN and linear; "rate_reduction" includes its own.

`umm_jax.overfitting` analyses that dict (normalised curves, Pearson's r, peaks, ΔR early
stopping) and `umm_jax.report` turns it into tables and plots.
"""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from umm_jax import (
  augment,
  checkpoint,
  crr,
  data,
  evaluate,
  methods,
  overfitting,
  pretrain,
  umm,
  umm_stage,
)
from umm_jax.models import resnet

MONITOR_FILE = "monitor.json"
SIGNALS = ("knn", "linear", "rate_reduction")
FEATURES = (
  "global average pool of the stage output; encoder in inference mode (BatchNorm running "
  "statistics); non-augmented images resized to {size} px and standardised by the train split's "
  "channel mean and std"
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the monitor measures and how; the defaults are the paper's protocols.

  `knn_temperature=None` is the majority vote; `eval_*_images=0` uses the whole split.
  """

  layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
  signals: tuple[str, ...] = SIGNALS
  knn_k: int = 5
  knn_temperature: float | None = None
  linear_epochs: int = 500
  linear_batch_size: int = 256
  linear_lr_start: float = 1e-2
  linear_lr_end: float = 1e-6
  eval_train_images: int = 0
  eval_test_images: int = 0
  num_images: int = 1024
  chunk_size: int = 512
  eps2: float = 0.5
  membership: str = "soft"
  temperature: float = 0.1
  recipe: str = "simclr"
  batch_size: int = 256
  seed: int = 0

  def __post_init__(self):
    bad = [s for s in self.signals if s not in SIGNALS]
    if bad or not self.signals or not self.layers:
      raise ValueError(f"Unknown signals {bad} (valid: {SIGNALS}) or no layers: {self}")
    if min(self.knn_k, self.linear_epochs, self.num_images, self.batch_size) < 1:
      raise ValueError(f"knn_k, linear_epochs, num_images, batch_size must be >= 1: {self}")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Settings":
    values = {
      f.name: config.monitor[f.name] for f in dataclasses.fields(cls) if f.name in config.monitor
    }
    values["knn_temperature"] = values["knn_temperature"] or None  # the config's 0: majority vote
    return cls(**values, recipe=methods.get(config.method.name).recipe, seed=config.seed)

  def protocol(self, *, dataset: str, image_size: int, n_train: int, n_test: int) -> dict:
    """The JSON protocol of every number the monitor records (compared on resume)."""
    features = FEATURES.format(size=image_size)
    split = dict(split=f"{dataset} train -> test", n_train=n_train, n_test=n_test)
    vote = "majority (ties: nearer neighbour)" if self.knn_temperature is None else "exp(s / T)"
    knn = dict(k=self.knn_k, temperature=self.knn_temperature, vote=vote, similarity="cosine")
    linear = dict(epochs=self.linear_epochs, batch_size=self.linear_batch_size)
    linear.update(lr_start=self.linear_lr_start, lr_end=self.linear_lr_end)
    linear.update(lr_decay="exponential per epoch", optimizer="sgd momentum 0.9", seed=0)
    linear.update(weight_decay=0.0, standardize="train mean/std per dimension", init="zeros")
    views = f"2 augmented views ({self.recipe!r} recipe) of the first {self.num_images} images"
    rate = dict(views=f"{views} of the {dataset} train split, no labels", view_seed=self.seed)
    rate.update(chunk_size=self.chunk_size, eps2=self.eps2, membership=self.membership)
    rate.update(temperature=self.temperature, normalize=True, pooling="global average")
    proto = dict(layers=list(self.layers), signals=list(self.signals))
    if "knn" in self.signals:
      proto["knn"] = {**knn, **split, "features": features}
    if "linear" in self.signals:
      proto["linear"] = {**linear, **split, "features": features}
    if "rate_reduction" in self.signals:
      proto["rate_reduction"] = rate
    return json.loads(json.dumps(proto))


# ----------------------------------------------------------------------------- ΔR of views


@functools.lru_cache(maxsize=16)
def _view_features_fn(model, layers: tuple[str, ...], recipe: str, image_size: int):
  """Jitted `(variables, images, key, mean, std) -> {layer: [2, n, c]}`, cached across calls."""
  stop = max(layers, key=resnet.STAGES.index)

  def features(variables, batch, key, mean, std):
    x = (augment.two_views(key, batch, recipe=recipe, size=image_size)["image"] - mean) / std
    n = batch.shape[0]
    out = model.apply(variables, x.reshape(2 * n, *x.shape[2:]), train=False, stop=stop)
    return {k: out[k].astype(jnp.float32).mean(axis=(1, 2)).reshape(2, n, -1) for k in layers}

  return jax.jit(features)


@functools.partial(jax.jit, static_argnames=("chunk_size", "membership", "eps2", "temperature"))
def _rate(z, *, chunk_size, membership, eps2, temperature) -> crr.RateReduction:
  return crr.dataset_rate_reduction(
    z, chunk_size=chunk_size, membership=membership, eps2=eps2, temperature=temperature
  )


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
  the encoder in inference mode in batches of `batch_size` images (batch `i` with view key
  `fold_in(key, i)`). Each layer's `[2, n, c]` features are cut into chunks of `chunk_size`
  views holding both views of their images; ΔR is the mean over chunks.
  """
  fn = _view_features_fn(model, tuple(layers), recipe, image_size)
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  parts = []
  for i, start in enumerate(range(0, len(images), batch_size)):
    batch = jnp.asarray(images[start : start + batch_size])
    parts.append(fn(variables, batch, jax.random.fold_in(key, i), mean, std))
  feats = {layer: jnp.concatenate([p[layer] for p in parts], axis=1) for layer in layers}
  kw = dict(chunk_size=chunk_size, membership=membership, eps2=eps2, temperature=temperature)
  # One layer at a time: two batched factorisations in flight can deadlock (see umm_jax.crr).
  return {layer: jax.tree.map(float, _rate(feats[layer], **kw)) for layer in layers}


# ----------------------------------------------------------------------------- measuring


class Inputs(NamedTuple):
  """The images every checkpoint is measured on (`prepare`)."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  view_images: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  num_classes: int


def _take(images, rows: np.ndarray):
  return images.subset(rows) if isinstance(images, data.LazyImages) else images[rows]


def _rows(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
  """Sorted labelled rows; `count` of them drawn by `seed` when `0 < count` < their number."""
  rows = np.flatnonzero(np.asarray(labels) >= 0)
  if 0 < count < len(rows):
    rows = np.sort(np.random.default_rng(seed).choice(rows, count, replace=False))
  return rows


def prepare(train_set: data.Dataset, test_set: data.Dataset, settings: Settings) -> Inputs:
  """Labelled train/test images for kNN and linear, view images for ΔR, channel statistics."""
  train_rows = _rows(train_set.labels, settings.eval_train_images, settings.seed)
  test_rows = _rows(test_set.labels, settings.eval_test_images, settings.seed + 1)
  mean, std = train_set.channel_stats()
  return Inputs(
    _take(train_set.images, train_rows),
    train_set.labels[train_rows],
    _take(test_set.images, test_rows),
    test_set.labels[test_rows],
    np.asarray(train_set.images[: settings.num_images]),
    mean,
    std,
    train_set.num_classes,
  )


def measure(
  model, variables, inputs: Inputs, *, settings: Settings, image_size: int, mesh=None
) -> dict:
  """`{'layers': {layer: {signal values}}, 'seconds': {part: s}}` of one encoder (`variables`)."""
  s, layers = settings, {layer: {} for layer in settings.layers}
  seconds, tic = {}, time.perf_counter()

  def lap(name):
    nonlocal tic
    seconds[name], tic = time.perf_counter() - tic, time.perf_counter()

  if set(overfitting.ACCURACIES) & set(s.signals):
    kw = dict(layers=s.layers, image_size=image_size, mean=inputs.mean, std=inputs.std)
    kw.update(batch_size=s.batch_size, mesh=mesh)
    train = evaluate.extract_features(model, variables, inputs.train_images, **kw)
    test = evaluate.extract_features(model, variables, inputs.test_images, **kw)
    args = lambda layer: (train[layer], inputs.train_labels, test[layer], inputs.test_labels)
    lap("features")
  if "knn" in s.signals:
    kw = dict(k=s.knn_k, temperature=s.knn_temperature, num_classes=inputs.num_classes)
    for layer in s.layers:
      r = evaluate.knn_accuracy(*args(layer), **kw)
      layers[layer].update(knn_top1=r["top1"], knn_top5=r["top5"])
    lap("knn")
  if "linear" in s.signals:
    kw = dict(num_classes=inputs.num_classes, epochs=s.linear_epochs)
    kw.update(batch_size=s.linear_batch_size, lr_start=s.linear_lr_start, lr_end=s.linear_lr_end)
    for layer in s.layers:
      r = evaluate.linear_probe(*args(layer), **kw)
      layers[layer].update(linear_top1=r["top1"], linear_top5=r["top5"])
    lap("linear")
  if "rate_reduction" in s.signals:
    kw = dict(layers=s.layers, recipe=s.recipe, image_size=image_size, mean=inputs.mean)
    kw.update(std=inputs.std, chunk_size=s.chunk_size, batch_size=s.batch_size, eps2=s.eps2)
    kw.update(membership=s.membership, temperature=s.temperature)
    key = jax.random.key(s.seed)
    for layer, r in layer_rate_reduction(model, variables, inputs.view_images, key, **kw).items():
      layers[layer].update(delta=r.delta, rate=r.rate, compressed=r.compressed)
    lap("rate_reduction")
  return {"layers": layers, "seconds": seconds}


def _previous(output, protocol: dict, encoder: str) -> dict:
  """Measured checkpoints of an earlier `monitor.json` with the same protocol and encoder."""
  if output is None or not epath.Path(output).exists():
    return {}
  try:
    old = json.loads(epath.Path(output).read_text())
    old_protocol, old_encoder, measured = old["protocol"], old["encoder"], old["checkpoints"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{output} is not a monitor.json this version reads ({e}); delete it") from e
  if old_encoder != encoder:
    logging.info("monitor: %s measured %r; starting over for %r", output, old_encoder, encoder)
    return {}
  if old_protocol != protocol:
    keys = sorted(k for k in {*protocol, *old_protocol} if protocol.get(k) != old_protocol.get(k))
    raise ValueError(
      f"{output} was measured under another protocol (differences in {keys}: "
      f"{ {k: old_protocol.get(k) for k in keys} } -> { {k: protocol.get(k) for k in keys} }); "
      "delete it or write to another file to measure again"
    )
  return measured


def _write(output, result: dict) -> None:
  """Atomic write (a rename), by process 0 only.

  On an object store (`gs://...`) the rename is a server-side copy, which creates the object
  whole: a reader sees the old or the new file, never a part of one.
  """
  if output is None or jax.process_index() != 0:
    return
  tmp = epath.Path(f"{output}.tmp")
  tmp.write_text(json.dumps(result, indent=2))
  tmp.replace(output)


def run(
  checkpoint_dir: str | os.PathLike,
  model,
  train_set: data.Dataset,
  test_set: data.Dataset,
  *,
  image_size: int,
  settings: Settings = Settings(),
  output: str | os.PathLike | None = None,
  steps: Sequence[int] | None = None,
  dataset: str = "",
  encoder: str = "checkpoints",
  mesh=None,
) -> dict:
  """Measures every checkpoint (or `steps`) of `checkpoint_dir`; returns the `monitor.json` dict.

  With `output`, the dict is written there after each checkpoint, and checkpoints already in
  an existing `output` of the same protocol and `encoder` are not measured again. `dataset`
  only names the data in the protocol, `encoder` the checkpoints. Raises a `ValueError` naming
  the path of a missing or corrupt checkpoint.
  """
  directory = epath.Path(checkpoint_dir)
  if not directory.is_dir():
    raise FileNotFoundError(f"No checkpoint directory {directory}")
  inputs = prepare(train_set, test_set, settings)
  sizes = dict(n_train=len(inputs.train_labels), n_test=len(inputs.test_labels))
  protocol = settings.protocol(dataset=dataset, image_size=image_size, **sizes)
  result = dict(protocol=protocol, encoder=encoder, checkpoint_dir=str(directory))
  result["checkpoints"] = dict(_previous(output, protocol, encoder))
  with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
    todo = ckpt.all_steps() if steps is None else list(steps)
    for step in todo:
      if str(step) in result["checkpoints"]:
        logging.info("monitor: step %d already in %s", step, output)
        continue
      variables, meta = pretrain.load_backbone(ckpt, step)
      entry = measure(model, variables, inputs, settings=settings, image_size=image_size, mesh=mesh)
      result["checkpoints"][str(step)] = dict(step=step, epoch=meta.get("epoch"), **entry)
      _log(step, meta.get("epoch"), entry)
      _write(output, result)
  result["checkpoints"] = dict(sorted(result["checkpoints"].items(), key=lambda kv: int(kv[0])))
  _write(output, result)
  return result


def _log(step: int, epoch, entry: dict) -> None:
  cost = " ".join(f"{k} {v:.1f}s" for k, v in entry["seconds"].items())
  logging.info("monitor: step %d (epoch %s): %s", step, epoch, cost)
  for layer, values in entry["layers"].items():
    logging.info("  %s %s", layer, " ".join(f"{k} {v:.4f}" for k, v in values.items()))


def _random_encoder(config, model, train_set, test_set, *, settings: Settings) -> dict:
  """`monitor.json` of the encoder pre-training starts from (its `init_state`), as step 0."""
  init_key = jax.random.split(jax.random.key(config.seed))[0]  # as `pretrain.pretrain`
  state = pretrain.init_state(pretrain.build(config, train_set), init_key)
  inputs = prepare(train_set, test_set, settings)
  sizes = dict(n_train=len(inputs.train_labels), n_test=len(inputs.test_labels))
  image_size = config.data.image_size
  protocol = settings.protocol(dataset=config.data.name, image_size=image_size, **sizes)
  entry = measure(model, state.online["backbone"], inputs, settings=settings, image_size=image_size)
  _log(0, 0, entry)
  encoder = f"random init (seed {config.seed}): no checkpoints"
  checkpoints = {"0": dict(step=0, epoch=0, **entry)}
  return dict(protocol=protocol, encoder=encoder, checkpoint_dir=None, checkpoints=checkpoints)


def _steps(directory: epath.Path) -> list[int]:
  if not directory.is_dir():
    return []
  with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
    return ckpt.all_steps()


def umm_output(workdir: str | os.PathLike, variant: str) -> epath.Path:
  """Where the monitor writes the measurements of UMM variant `variant`'s checkpoints."""
  return umm_stage.variant_dir(workdir, variant) / MONITOR_FILE


def run_stage(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """The `monitor` stage: every checkpoint of the work dir's encoders, resumable.

  `<workdir>/checkpoints` (pre-training) into `monitor.json`; then, for every UMM variant the
  `umm` stage ran, `umm/<variant>/checkpoints` into `umm/<variant>/monitor.json` (the paper's
  Figure 5: accuracy and ΔR along UMM; epochs there are UMM epochs). Put `monitor` after `umm`
  in `config.stages` to measure both. Checkpoints already measured are skipped. With no
  pre-training checkpoints, the randomly initialised encoder pre-training starts from is
  measured instead, as step 0, and the log says so.
  """
  workdir = epath.Path(workdir)
  settings = Settings.from_config(config)
  train_set, test_set = data.load(config.data, "train"), data.load(config.data, "test")
  model = pretrain.create_model(config)
  kw = dict(image_size=config.data.image_size, dataset=config.data.name, settings=settings)
  todo = [(workdir / pretrain.CHECKPOINT_DIR, workdir / MONITOR_FILE, "checkpoints")]
  for variant in umm.VARIANTS:
    directory = umm_stage.variant_dir(workdir, variant) / pretrain.CHECKPOINT_DIR
    todo.append((directory, umm_output(workdir, variant), f"UMM {variant}"))
  for index, (directory, output, encoder) in enumerate(todo):
    steps = _steps(directory)
    if steps:
      logging.info("monitor: %d checkpoints in %s", len(steps), directory)
      result = run(directory, model, train_set, test_set, output=output, encoder=encoder, **kw)
    elif index == 0:
      message = (
        "monitor: no checkpoints in %s; measuring the randomly initialised encoder (seed %d)"
      )
      logging.warning(message, directory, config.seed)
      result = _random_encoder(config, model, train_set, test_set, settings=settings)
      _write(output, result)
    else:
      continue
    if jax.process_index() == 0:  # the process that wrote it
      print(summary(result) + f"\n(written to {output})")


def summary(result: dict) -> str:
  """A plain-text table: one row per checkpoint and layer."""
  names = ("knn_top1", "linear_top1", "delta")
  lines = [f"{'step':>7s} {'epoch':>6s} {'layer':8s} " + " ".join(f"{n:>11s}" for n in names)]
  for entry in result["checkpoints"].values():
    for layer, values in entry["layers"].items():
      cells = " ".join(f"{values[n]:11.4f}" if n in values else f"{'-':>11s}" for n in names)
      lines.append(f"{entry['step']:7d} {entry['epoch']!s:>6s} {layer:8s} {cells}")
  return f"{result['encoder']}\n" + "\n".join(lines)
