"""Evaluation of an encoder: pooled features, kNN, linear probe, semi-supervised fine-tuning.

The paper's protocols (spec section 5), named in `PROTOCOLS`. Every result carries the protocol
that produced it (its `protocol` entry), so numbers from different protocols are never mixed.

- Features (`extract_features`): the encoder in inference mode (BatchNorm running statistics) on
  non-augmented images, resized to the input size (bilinear) and standardised; each requested
  stage `[N, h, w, c]` is global-average-pooled to `[N, c]`.
- kNN (`knn_accuracy`): cosine similarity to every training feature; the majority vote of the
  `k = 5` nearest (the paper) or the vote weighted by `exp(s / T)` of the `k = 200` nearest with
  `T = 0.1` (Wu et al. 2018, InstDisc; solo-learn's offline kNN).
- Linear probe (`linear_probe`): softmax regression on frozen, cached features, SGD momentum 0.9,
  500 epochs of shuffled batches of 256, lr decayed exponentially per epoch from 1e-2 to 1e-6.
  Features are standardised per dimension with the training set's mean and std (a choice the
  paper does not state; recorded as `protocol['features']`), classifier initialised at zero.
- Semi-supervised fine-tuning: `umm_jax.finetune` (its protocols are named here too).
"""

import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from umm_jax import checkpoint, data, parallel, pretrain, umm_stage
from umm_jax.models import resnet

FEATURE_LAYERS = (*resnet.STAGES, "embedding")
# Keyword arguments of the function each protocol names (`knn_accuracy`, `linear_probe`,
# `finetune.fine_tune`): e.g. `knn_accuracy(..., num_classes=10, **PROTOCOLS['knn_k5'])`.
PROTOCOLS: dict[str, dict[str, Any]] = {
  "knn_k5": dict(k=5, temperature=None),
  "knn_k200_t0.1": dict(k=200, temperature=0.1),
  "linear": dict(
    epochs=500, batch_size=256, lr_start=1e-2, lr_end=1e-6, momentum=0.9, weight_decay=0.0
  ),
  "semi_1pct": dict(fraction=0.01, epochs=50, classifier_lr=1.0, backbone_lr=1e-4),
  "semi_10pct": dict(fraction=0.1, epochs=50, classifier_lr=0.1, backbone_lr=1e-2),
}
_HIGHEST = jax.lax.Precision.HIGHEST


def protocol(name: str) -> dict[str, Any]:
  """A copy of `PROTOCOLS[name]`; a `ValueError` lists the valid names otherwise."""
  if name not in PROTOCOLS:
    raise ValueError(f"Unknown protocol {name!r}; valid protocols: {list(PROTOCOLS)}")
  return dict(PROTOCOLS[name])


# ----------------------------------------------------------------------------- features


def standardised(images: jax.Array, image_size: int, mean, std) -> jax.Array:
  """uint8 `[n, H, W, C]` → float32 `[n, S, S, C]`: scaled to [0, 1], resized, standardised."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bilinear")
  return (x - mean) / std


@functools.lru_cache(maxsize=32)
def _features_fn(model, layers: tuple[str, ...], image_size: int, mesh):
  """Jitted `(variables, images, mean, std) -> {layer: [n, c]}`, replicated for the host."""
  stages = [layer for layer in layers if layer != "embedding"]
  stop = "layer4" if "embedding" in layers else max(stages, key=resnet.STAGES.index)

  def features(variables, images, mean, std):
    x = standardised(images, image_size, mean, std)
    # Stop at the deepest requested stage: the later ones would be computed for nothing.
    out = model.apply(variables, x, train=False, **({} if stop == "layer4" else {"stop": stop}))
    pooled = {layer: out[layer].astype(jnp.float32).mean(axis=(1, 2)) for layer in stages}
    if "embedding" in layers:
      pooled["embedding"] = out["embedding"].astype(jnp.float32)
    return pooled

  return jax.jit(features, out_shardings=parallel.replicated(mesh))


def extract_features(
  model,
  variables,
  images: np.ndarray,
  *,
  layers: Sequence[str],
  image_size: int,
  mean,
  std,
  batch_size: int,
  mesh=None,
) -> dict[str, np.ndarray]:
  """Pooled features `{layer: [N, c] float32}` of `images` `[N, H, W, C]` uint8 (or `LazyImages`).

  Inference mode, no augmentation: images scaled to [0, 1], resized bilinearly to `image_size`
  when their size differs (as `pretrain.make_probe_eval`), standardised by `mean`, `std` `[C]`.
  `layers` are stages of `resnet.STAGES` (global-average-pooled) and/or 'embedding'. Batches of
  `batch_size` (rounded up to a multiple of the mesh's devices) are sharded over the mesh's
  `data` axis (`parallel.make_mesh()` when `mesh` is None); the last one is zero-padded to the
  same shape, so one compilation serves all. `variables` are an argument of the jitted
  function, not a constant baked into it; the host fetches batch `i` while `i + 1` runs.
  """
  layers = tuple(layers)
  unknown = [layer for layer in layers if layer not in FEATURE_LAYERS]
  if not layers or unknown:
    raise ValueError(f"Unknown layers {unknown or '(none given)'}; valid: {list(FEATURE_LAYERS)}")
  if len(images.shape) != 4 or images.dtype != np.uint8 or len(images) == 0:
    raise ValueError(f"extract_features expects uint8 images [N>0, H, W, C], got {images.shape}")
  mesh = parallel.make_mesh() if mesh is None else mesh
  devices = mesh.devices.size
  batch_size = -(-batch_size // devices) * devices
  fn = _features_fn(model, layers, image_size, mesh)
  variables = parallel.replicate(variables, mesh)
  mean, std = (parallel.replicate(jnp.asarray(v, jnp.float32), mesh) for v in (mean, std))
  parts, pending = [], None
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start : start + batch_size])
    padded = np.concatenate(
      [batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), np.uint8)]
    )
    result = fn(variables, jax.device_put(padded, parallel.batch_sharding(mesh)), mean, std)
    if pending is not None:
      parts.append({k: parallel.fetch(v)[: pending[1]] for k, v in pending[0].items()})
    pending = (result, len(batch))
  parts.append({k: parallel.fetch(v)[: pending[1]] for k, v in pending[0].items()})
  return {layer: np.concatenate([p[layer] for p in parts]) for layer in layers}


# ----------------------------------------------------------------------------- kNN


def _unit_rows(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "temperature", "num_classes", "chunk_size"))
def _knn_scores(train_feats, train_labels, test_feats, *, k, temperature, num_classes, chunk_size):
  train = _unit_rows(train_feats)
  n_test = test_feats.shape[0]
  chunks = -(-n_test // chunk_size)
  test = jnp.pad(_unit_rows(test_feats), ((0, chunks * chunk_size - n_test), (0, 0)))

  def one_chunk(queries):
    # HIGHEST: TF32 matmuls (the accelerator default) would reorder close neighbours.
    sims, idx = jax.lax.top_k(jnp.matmul(queries, train.T, precision=_HIGHEST), k)
    votes = jax.nn.one_hot(train_labels[idx], num_classes, dtype=jnp.float32)  # [c, k, C]
    if temperature is None:
      # Count + a tie-break in [0, 1): (k - r) / (k + 1) for the class's nearest neighbour, rank r.
      nearest = jnp.max(votes * ((k - jnp.arange(k)) / (k + 1))[:, None], axis=1)
      return votes.sum(axis=1) + nearest
    return jnp.einsum("ck,ckn->cn", jnp.exp(sims / temperature), votes, precision=_HIGHEST)

  scores = jax.lax.map(one_chunk, test.reshape(chunks, chunk_size, -1))
  return scores.reshape(-1, num_classes)[:n_test]


def _check_features(train_feats, train_labels, test_feats, num_classes: int) -> None:
  tr, te, lab = np.shape(train_feats), np.shape(test_feats), np.shape(train_labels)
  if len(tr) != 2 or len(te) != 2 or tr[1] != te[1] or lab != tr[:1]:
    raise ValueError(f"Expected train [n, d], labels [n], test [m, d]; got {tr}, {lab}, {te}")
  labels = np.asarray(train_labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"train labels must lie in [0, {num_classes}), got [{labels.min()}, ...]")


def knn_classify(
  train_feats,
  train_labels,
  test_feats,
  *,
  k: int,
  temperature: float | None,
  num_classes: int,
  chunk_size: int = 1024,
) -> jax.Array:
  """Class scores `[m, num_classes]` of test features `[m, d]` by their `k` nearest neighbours.

  Neighbours are the training features `[n, d]` (labels `[n]` in `[0, num_classes)`) of highest
  cosine similarity `s`; equal similarities rank the lower training index first (`lax.top_k`).
  `temperature=None`: majority vote; a class scores its number of votes plus
  `(k - r) / (k + 1)` < 1, r the rank (0 = nearest) of its nearest neighbour among the k, so the
  floor of a score is its vote count and tied counts go to the class with the nearer neighbour.
  A float `T`: each neighbour votes `exp(s / T)` (InstDisc / solo-learn weighting). Predictions
  are the argmax (lowest class index among exactly equal scores, e.g. classes with no vote).
  Test rows are processed `chunk_size` at a time (memory `chunk_size × n` similarities).
  """
  _check_features(train_feats, train_labels, test_feats, num_classes)
  if not 1 <= k <= np.shape(train_feats)[0]:
    raise ValueError(f"k={k} must lie in [1, n_train={np.shape(train_feats)[0]}]")
  return _knn_scores(
    jnp.asarray(train_feats),
    jnp.asarray(train_labels, jnp.int32),
    jnp.asarray(test_feats),
    k=k,
    temperature=None if temperature is None else float(temperature),
    num_classes=num_classes,
    chunk_size=chunk_size,
  )


def top_k_accuracy(scores, labels) -> dict[str, float]:
  """Top-1 and top-5 accuracy of scores `[m, C]` for labels `[m]`; ties → lower class index."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  if scores.ndim != 2 or labels.shape != scores.shape[:1]:
    raise ValueError(f"Expected scores [m, C] and labels [m], got {scores.shape}, {labels.shape}")
  ranked = np.argsort(-scores, axis=1, kind="stable")[:, :5]
  hit = ranked == labels[:, None]
  return {"top1": float(hit[:, 0].mean()), "top5": float(hit.any(axis=1).mean())}


def knn_accuracy(
  train_feats,
  train_labels,
  test_feats,
  test_labels,
  *,
  k: int,
  temperature: float | None,
  num_classes: int,
  chunk_size: int = 1024,
  layer: str | None = None,
) -> dict:
  """`{'top1', 'top5', 'protocol'}` of `knn_classify` (see there); `layer` is only recorded."""
  scores = knn_classify(
    train_feats,
    train_labels,
    test_feats,
    k=k,
    temperature=temperature,
    num_classes=num_classes,
    chunk_size=chunk_size,
  )
  vote = "majority (ties: nearer neighbour)" if temperature is None else "exp(s / T)"
  proto = dict(evaluation="knn", layer=layer, k=k, temperature=temperature, vote=vote)
  proto.update(similarity="cosine", n_train=len(train_labels), n_test=len(test_labels))
  return {**top_k_accuracy(scores, test_labels), "protocol": proto}


# ----------------------------------------------------------------------------- linear probe


def exponential_lr(epoch, *, lr_start: float, lr_end: float, epochs: int):
  """lr of (0-based) `epoch`: `lr_start · γ^epoch`, `γ = (lr_end / lr_start)^(1 / epochs)`.

  As PyTorch's `ExponentialLR` stepped after each epoch: epoch 0 uses `lr_start` and the value
  after the last epoch, `exponential_lr(epochs)`, is `lr_end`.
  """
  return lr_start * (lr_end / lr_start) ** (epoch / epochs)


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def fit_linear_classifier(
  x, y, key, *, num_classes, epochs, batch_size, lr_start, lr_end, momentum, weight_decay
):
  """Softmax regression on features `x` `[n, d]`, labels `y` `[n]`, trained by SGD with momentum.

  Minimises `mean_i CE(x_i W + b, y_i) + weight_decay/2 · ‖W‖²` (no decay on the bias) from
  `W = 0, b = 0`. Each epoch visits a permutation drawn from `fold_in(key, epoch)` in
  `ceil(n / batch_size)` batches, the last one partial (its padding masked out); momentum as
  PyTorch (`buf ← μ·buf + g; w ← w − lr·buf`); lr `exponential_lr(epoch, ...)`. One jitted
  `lax.scan` over epochs and batches.

  Returns:
    `({'w': [d, C], 'b': [C]}, loss [epochs], lr [epochs])`: each epoch's mean batch loss
    (cross-entropy without the decay term) and learning rate.
  """
  n, d = x.shape
  steps = -(-n // batch_size)
  valid = (jnp.arange(steps * batch_size) < n).reshape(steps, batch_size).astype(jnp.float32)

  def batch_loss(params, idx, mask):
    logits = x[idx] @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[idx])
    return jnp.sum(ce * mask) / jnp.sum(mask)

  def epoch(carry, e):
    lr = exponential_lr(e, lr_start=lr_start, lr_end=lr_end, epochs=epochs)
    order = jax.random.permutation(jax.random.fold_in(key, e), n)
    order = jnp.pad(order, (0, steps * batch_size - n)).reshape(steps, batch_size)

    def step(carry, batch):
      params, buf = carry
      loss, grads = jax.value_and_grad(batch_loss)(params, *batch)
      grads["w"] = grads["w"] + weight_decay * params["w"]
      buf = jax.tree.map(lambda m, g: momentum * m + g, buf, grads)
      return (jax.tree.map(lambda p, m: p - lr * m, params, buf), buf), loss * jnp.sum(batch[1])

    carry, losses = jax.lax.scan(step, carry, (order, valid))
    return carry, (jnp.sum(losses) / n, lr)

  params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}
  carry = (params, jax.tree.map(jnp.zeros_like, params))
  (params, _), (losses, lrs) = jax.lax.scan(epoch, carry, jnp.arange(epochs))
  return params, losses, lrs


def linear_probe(
  train_feats,
  train_labels,
  test_feats,
  test_labels,
  *,
  num_classes: int,
  epochs: int = 500,
  batch_size: int = 256,
  lr_start: float = 1e-2,
  lr_end: float = 1e-6,
  momentum: float = 0.9,
  weight_decay: float = 0.0,
  seed: int = 0,
  standardize: bool = True,
  layer: str | None = None,
) -> dict:
  """Linear-probe accuracy of frozen features: `fit_linear_classifier` on the training features.

  With `standardize`, both sets are standardised per dimension by the training set's mean and
  std (dimensions of zero std are only centred). Returns `{'top1', 'top5', 'train_top1',
  'train_loss' (last epoch's mean batch loss), 'protocol'}`; `layer` is only recorded.
  """
  _check_features(train_feats, train_labels, test_feats, num_classes)
  if epochs < 1 or batch_size < 1:
    raise ValueError(f"Need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
  x, xt = jnp.asarray(train_feats, jnp.float32), jnp.asarray(test_feats, jnp.float32)
  if standardize:
    mu, sigma = x.mean(axis=0), x.std(axis=0)
    sigma = jnp.where(sigma > 0, sigma, 1.0)
    x, xt = (x - mu) / sigma, (xt - mu) / sigma
  params, losses, _ = fit_linear_classifier(
    x,
    jnp.asarray(train_labels, jnp.int32),
    jax.random.key(seed),
    num_classes=num_classes,
    epochs=epochs,
    batch_size=min(batch_size, x.shape[0]),
    lr_start=lr_start,
    lr_end=lr_end,
    momentum=momentum,
    weight_decay=weight_decay,
  )
  logits = lambda f: jnp.matmul(f, params["w"], precision=_HIGHEST) + params["b"]
  proto = dict(evaluation="linear", layer=layer, epochs=epochs, batch_size=batch_size)
  proto.update(lr_start=lr_start, lr_end=lr_end, lr_decay="exponential per epoch")
  proto.update(optimizer="sgd", momentum=momentum, weight_decay=weight_decay, seed=seed)
  proto.update(features="standardized (train mean/std)" if standardize else "raw", init="zeros")
  return {
    **top_k_accuracy(logits(xt), test_labels),
    "train_top1": top_k_accuracy(logits(x), train_labels)["top1"],
    "train_loss": float(losses[-1]),
    "protocol": proto,
  }


# ----------------------------------------------------------------------------- the stage

RESULTS_FILE = "evaluation.json"


def evaluate_encoder(
  model, variables, train_set, test_set, *, layers, protocols, image_size, batch_size, overrides
) -> dict:
  """`{layer: {protocol name: result}}` of one encoder, features extracted once per split.

  `protocols` are names in `PROTOCOLS` ('knn_*', 'linear'); `overrides` `{name: {arg: value}}`
  changes a protocol's arguments (recorded in each result's protocol). Unlabelled training images
  (label -1) are left out.
  """
  mean, std = train_set.channel_stats()
  labelled = np.flatnonzero(np.asarray(train_set.labels) >= 0)
  feats = {
    split: extract_features(
      model,
      variables,
      images,
      layers=layers,
      image_size=image_size,
      mean=mean,
      std=std,
      batch_size=batch_size,
    )  # fmt: skip
    for split, images in (("train", train_set.images[labelled]), ("test", test_set.images))
  }
  train_labels, test_labels = np.asarray(train_set.labels)[labelled], test_set.labels
  results = {}
  for layer in layers:
    args = (feats["train"][layer], train_labels, feats["test"][layer], test_labels)
    results[layer] = {}
    for name in protocols:
      fn = linear_probe if name == "linear" else knn_accuracy
      kwargs = {**protocol(name), **overrides.get(name, {})}
      results[layer][name] = fn(*args, num_classes=train_set.num_classes, layer=layer, **kwargs)
  return results


def run_stage(config, workdir) -> dict:
  """The `evaluate` stage: the last checkpoint of each encoder in the work dir.

  The encoders are those of `umm_stage.encoders`: the baseline and each UMM variant run.

  Writes `evaluation.json`: `{encoder: {'step', 'checkpoint', 'layers': {layer: {protocol:
  {top1, top5, protocol}}}}}` and prints a table. `config.evaluate.linear_epochs` overrides the
  linear protocol's 500 epochs (recorded in each result's protocol).
  """
  workdir = epath.Path(workdir)
  cfg = config.evaluate
  train_set, test_set = data.load(config.data, "train"), data.load(config.data, "test")
  model = pretrain.create_model(config)
  out = {}
  for name, directory in umm_stage.encoders(workdir).items():
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
      steps = ckpt.all_steps()
      if not steps:
        continue
      variables, _ = pretrain.load_backbone(ckpt, steps[-1])
    probes = [p for p in cfg.protocols if not p.startswith("semi")]
    layers = evaluate_encoder(
      model, variables, train_set, test_set, layers=tuple(cfg.layers), protocols=probes,
      image_size=config.data.image_size, batch_size=cfg.batch_size,
      overrides={"linear": {"epochs": cfg.linear_epochs}},
    )  # fmt: skip
    out[name] = {"step": steps[-1], "checkpoint": str(directory / str(steps[-1])), "layers": layers}
    semi = [p for p in cfg.protocols if p.startswith("semi")]
    if semi:
      out[name]["semi_supervised"] = _semi_supervised(
        model, variables, train_set, test_set, semi, config=config
      )
  if not out:
    raise ValueError(f"evaluate: no checkpoints under {workdir}; run the pretrain stage first")
  if jax.process_index() != 0:  # every process measured the same; one writes
    return out
  (workdir / RESULTS_FILE).write_text(json.dumps(out, indent=2))
  lines = [f"{'encoder':20s} {'layer':10s} {'protocol':14s} {'top1':>7s} {'top5':>7s}"]
  for name, entry in out.items():
    rows = [(layer, results) for layer, results in entry["layers"].items()]
    rows += [("embedding", entry.get("semi_supervised", {}))]
    for layer, results in rows:
      for proto, r in results.items():
        lines.append(f"{name:20s} {layer:10s} {proto:14s} {r['top1']:7.4f} {r['top5']:7.4f}")
  print("\n".join(lines) + f"\n(written to {workdir / RESULTS_FILE})")
  return out


def _semi_supervised(model, variables, train_set, test_set, names, *, config) -> dict:
  """`{protocol: metrics}` of `finetune.fine_tune` for each 'semi_*' protocol in `names`."""
  from umm_jax import finetune  # finetune builds on this module's features and accuracies

  mean, std = train_set.channel_stats()
  results = {}
  for name in names:
    kwargs = {**protocol(name), "epochs": config.evaluate.semi_epochs}
    results[name] = finetune.fine_tune(
      model, variables, train_set.images, train_set.labels, test_set.images, test_set.labels,
      num_classes=train_set.num_classes, image_size=config.data.image_size, mean=mean, std=std,
      seed=config.seed, **kwargs,
    ).metrics  # fmt: skip
  return results
