"""Semi-supervised fine-tuning: backbone and linear classifier on a class-balanced label subset.

The paper's protocol (spec section 5; `umm_jax.evaluate.PROTOCOLS` 'semi_1pct' / 'semi_10pct'):
the backbone and a linear classifier are fine-tuned on a class-balanced 1% / 10% label subset
(`semi_supervised_subset`) for 50 epochs, classifier lr 1.0 / 0.1, backbone lr 1e-4 / 1e-2,
constant (the paper gives no schedule), BatchNorm in training mode, random resized crop +
horizontal flip (`augment`'s 'minimal' recipe). Accuracy is measured afterwards with
`umm_jax.evaluate`'s features in inference mode.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from umm_jax import augment, optim, parallel
from umm_jax.evaluate import extract_features, standardised, top_k_accuracy
from umm_jax.models.heads import LinearClassifier


def semi_supervised_subset(labels, *, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a class-balanced subset holding about `fraction` of the labelled images.

  Every class present in `labels` `[N]` (-1: unlabelled, skipped) gets the same count,
  `max(1, round(fraction · n_labelled / n_classes))`, drawn uniformly without replacement
  by `np.random.default_rng(seed)`, or all its images if it has fewer.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not 0 < fraction <= 1:
    raise ValueError(f"Need labels [N] and 0 < fraction <= 1, got {labels.shape}, {fraction}")
  classes = np.unique(labels[labels >= 0])
  if classes.size == 0:
    raise ValueError("semi_supervised_subset needs labelled images (all labels are -1)")
  per_class = max(1, round(fraction * np.sum(labels >= 0) / classes.size))
  rng = np.random.default_rng(seed)
  keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
  return np.sort(np.concatenate(keep))


class FineTuneResult(NamedTuple):
  """`metrics` (JSON-able, with its `protocol`), the tuned backbone variables and classifier."""

  metrics: dict
  variables: dict
  classifier: dict


def _sgd(learning_rate, momentum, weight_decay) -> optax.GradientTransformation:
  decay = optax.add_decayed_weights(weight_decay, mask=optim.decay_mask)
  return optax.chain(decay, optax.sgd(learning_rate, momentum))


def _part_labels(params: dict) -> dict:
  return {part: jax.tree.map(lambda _, part=part: part, tree) for part, tree in params.items()}


def fine_tune_optimizer(
  *, backbone_lr: float, classifier_lr: float, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
  """SGD with `momentum` on params `{'backbone', 'classifier'}`, one lr each (`multi_transform`).

  Coupled weight decay on kernels only (`optim.decay_mask`). The hyper-parameters live in the
  optimiser state (`inject_hyperparams`), so a step compiled once serves every setting.
  """
  group = optax.inject_hyperparams(_sgd)
  return optax.multi_transform(
    {
      "backbone": group(backbone_lr, momentum, weight_decay),
      "classifier": group(classifier_lr, momentum, weight_decay),
    },
    _part_labels,
  )


@functools.lru_cache(maxsize=8)
def _fine_tune_step(model, num_classes: int, image_size: int, augment_views: bool, mesh):
  """Jitted `(state, images, labels, mean, std, key) -> (state, loss)`; the state is donated."""
  view = augment.get_recipe("minimal").for_size(image_size)[0]
  # Hyper-parameters come from the state, so these placeholder values are never used.
  tx = fine_tune_optimizer(backbone_lr=0.0, classifier_lr=0.0, momentum=0.0, weight_decay=0.0)

  def step(state, images, labels, mean, std, key):
    params, batch_stats, opt_state = state
    if augment_views:
      keys = jax.random.split(key, images.shape[0])
      crop = lambda k, im: augment.augment_view(k, im, view, size=image_size)[0]
      x = (jax.vmap(crop)(keys, images) - mean) / std
    else:
      x = standardised(images, image_size, mean, std)

    def loss_fn(params):
      variables = {"params": params["backbone"], "batch_stats": batch_stats}
      out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      logits = LinearClassifier(num_classes).apply(
        {"params": params["classifier"]}, out["embedding"]
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  replicated = parallel.replicated(mesh)
  return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))


def _fine_tune_epochs(step, state, images, labels, norm, key, *, epochs, batch, seed, mesh):
  """`epochs` passes over `images` in shuffled batches; returns the state and the last losses."""
  n, rng, losses, t = len(labels), np.random.default_rng(seed), [], 0
  steps = -(-n // batch)
  for _ in range(epochs):
    order = rng.permutation(n)
    order = np.concatenate([order, order[: steps * batch - n]])  # the last batch made whole
    losses = []
    for rows in order[: steps * batch].reshape(steps, batch):
      x, y = (jax.device_put(a[rows], parallel.batch_sharding(mesh)) for a in (images, labels))
      state, loss = step(state, x, y, *norm, jax.random.fold_in(key, t))
      losses.append(loss)
      t += 1
  return state, [float(v) for v in jax.device_get(losses)]


def fine_tune(
  model,
  variables,
  train_images,
  train_labels,
  test_images,
  test_labels,
  *,
  num_classes: int,
  image_size: int,
  mean,
  std,
  fraction: float = 1.0,
  epochs: int = 50,
  batch_size: int = 256,
  classifier_lr: float = 1.0,
  backbone_lr: float = 1e-4,
  momentum: float = 0.9,
  weight_decay: float = 0.0,
  augment_views: bool = True,
  seed: int = 0,
  eval_batch_size: int = 512,
  mesh=None,
) -> FineTuneResult:
  """Fine-tunes backbone `variables` ({params, batch_stats}) and a new linear classifier.

  Trains on `semi_supervised_subset(train_labels, fraction=fraction, seed=seed)` of
  `train_images` `[N, H, W, C]` uint8 (every labelled image when `fraction` is 1) for `epochs`:
  each epoch a fresh permutation, cut into global batches of `batch_size` (capped at the subset
  size, rounded up to the mesh's devices), the last one filled from the permutation's start.
  Views: random resized crop + flip ('minimal' recipe) with `augment_views`, else the resized
  images. Cross-entropy; `optax.multi_transform` gives the backbone and classifier each SGD with
  `momentum` at constant `backbone_lr` / `classifier_lr`, weight decay on kernels only. The
  classifier `LinearClassifier(num_classes)` is drawn from `seed`. Metrics: test `top1`/`top5`
  and `train_top1` on the subset, in inference mode (`extract_features` of the embedding).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  known = np.flatnonzero(np.asarray(train_labels) >= 0)
  subset = (
    known if fraction == 1 else semi_supervised_subset(train_labels, fraction=fraction, seed=seed)
  )
  images, labels = np.asarray(train_images[subset]), np.asarray(train_labels)[subset]
  key_classifier, key_views = jax.random.split(jax.random.key(seed))
  classifier = LinearClassifier(num_classes)
  probe = jnp.zeros((1, image_size, image_size, images.shape[-1]))
  apply = functools.partial(model.apply, train=False)
  width = jax.eval_shape(apply, variables, probe)["embedding"].shape[-1]
  params = {
    "backbone": variables["params"],
    "classifier": classifier.init(key_classifier, jnp.zeros((1, width)))["params"],
  }
  tx = fine_tune_optimizer(
    backbone_lr=backbone_lr,
    classifier_lr=classifier_lr,
    momentum=momentum,
    weight_decay=weight_decay,
  )
  # Copies: the step donates its state, which must not alias the caller's variables.
  state = jax.tree.map(jnp.copy, (params, variables["batch_stats"], tx.init(params)))
  state = parallel.replicate(state, mesh)
  norm = [parallel.replicate(jnp.asarray(v, jnp.float32), mesh) for v in (mean, std)]
  step = _fine_tune_step(model, num_classes, image_size, augment_views, mesh)
  batch = -(-min(batch_size, len(labels)) // mesh.devices.size) * mesh.devices.size
  state, losses = _fine_tune_epochs(
    step, state, images, labels, norm, key_views, epochs=epochs, batch=batch, seed=seed, mesh=mesh
  )
  params, batch_stats, _ = state
  tuned = {"params": params["backbone"], "batch_stats": batch_stats}
  head = {"params": params["classifier"]}
  extract = functools.partial(
    extract_features,
    model,
    tuned,
    layers=("embedding",),
    image_size=image_size,
    mean=mean,
    std=std,
    batch_size=eval_batch_size,
    mesh=mesh,
  )
  logits = lambda imgs: classifier.apply(head, jnp.asarray(extract(imgs)["embedding"]))
  proto = dict(evaluation="fine_tune", fraction=fraction, labelled=len(labels))
  proto.update(classes=len(set(labels.tolist())))
  proto.update(epochs=epochs, batch_size=batch, classifier_lr=classifier_lr)
  proto.update(backbone_lr=backbone_lr, lr_schedule="constant", momentum=momentum, seed=seed)
  proto.update(weight_decay=weight_decay, batch_norm="train mode")
  proto.update(augmentation="random resized crop + flip" if augment_views else "none")
  metrics = {
    **top_k_accuracy(logits(test_images), test_labels),
    "train_top1": top_k_accuracy(logits(images), labels)["top1"],
    "train_loss": float(np.mean(losses)) if losses else None,
    "protocol": proto,
  }
  return FineTuneResult(metrics, jax.device_get(tuned), jax.device_get(head))
