"""The self-supervised training state and step shared by every method.

One step: augment two views on device → backbone on each view → the method's heads → the target
network (EMA) when the method has one → the method's objective → optax update → EMA update of
the target, plus the online linear probe: a classifier trained on the stop-gradient backbone
embedding, so the run reports linear accuracy as it goes (as solo-learn does). The step is a
pure function `(state, batch, key) -> (state, metrics)` built by `make_train_step` and jitted
by the caller (with the state donated). The loop that drives it is `umm_jax.pretrain`.
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from umm_jax import augment
from umm_jax.methods.base import Method
from umm_jax.models.heads import LinearClassifier

Variables = dict[str, Any]


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes, as one pytree.

  Attributes:
    step: number of optimiser steps taken (int32 scalar).
    online: `{'backbone': variables, 'heads': variables}`, flax variable dicts with
      `params` and, where the module has BatchNorm, `batch_stats`.
    target: the EMA target network's variables in the same layout, or `None`.
    method_state: the method's own state (queues), `{}` when it has none.
    opt_state: the optax state of `online[...]['params']`.
    probe: the online linear classifier's variables (`params` only).
    probe_opt_state: the optax state of `probe['params']`.
  """

  step: jax.Array
  online: Variables
  target: Variables | None
  method_state: dict
  opt_state: optax.OptState
  probe: Variables
  probe_opt_state: optax.OptState


def _params(variables: Variables) -> dict:
  return {part: v["params"] for part, v in variables.items()}


def _with_params(variables: Variables, params: dict) -> Variables:
  return {part: {**v, "params": params[part]} for part, v in variables.items()}


def init_state(
  key: jax.Array,
  *,
  model: nn.Module,
  heads: nn.Module,
  method: Method,
  hp: Mapping[str, Any],
  tx: optax.GradientTransformation,
  input_shape: tuple[int, int, int],
  num_classes: int,
  probe_tx: optax.GradientTransformation,
) -> TrainState:
  """Initial state for inputs of `input_shape` `(H, W, C)`; the target starts as a copy."""
  k_model, k_heads, k_state, k_probe = jax.random.split(key, 4)
  x = jnp.zeros((2, *input_shape), jnp.float32)
  backbone = model.init(k_model, x, train=False)
  features = model.apply(backbone, x, train=False)
  online = {"backbone": backbone, "heads": heads.init(k_heads, features, train=False)}
  probe = LinearClassifier(num_classes).init(k_probe, features["embedding"])
  method_state = method.init_state(hp, k_state)
  if method.second_view is not None:
    method_state = {**method_state, **method.second_view.init(backbone["params"], hp)}
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    online=online,
    # A copy, not an alias: the step donates the state, and a buffer cannot be donated twice.
    target=jax.tree.map(jnp.copy, online) if method.target_momentum is not None else None,
    method_state=method_state,
    opt_state=tx.init(_params(online)),
    probe=probe,
    probe_opt_state=probe_tx.init(probe["params"]),
  )


def target_momentum(step: jax.Array, total_steps: int, base: float, final: float) -> jax.Array:
  """BYOL's cosine schedule of the EMA momentum, from `base` at step 0 to `final` at the end."""
  progress = jnp.minimum(step / max(total_steps, 1), 1.0)
  return final - (final - base) * (jnp.cos(math.pi * progress) + 1) / 2


def _forward(model, heads, variables, x, method, train, second_view=None):
  """Backbone and heads on each view of `x` `[2, n, H, W, C]`; outputs stacked to `[2, n, ...]`.

  The views pass one after the other, so BatchNorm normalises each view by its own batch
  statistics (and updates the running statistics twice) as in solo-learn and the BYOL, SimSiam
  and MoCo code; concatenating the views would mix their statistics. `second_view`, a function of
  the backbone's parameters, gives the parameters the second view runs with (SDCLR's pruning).
  """
  per_view = []
  for v, view in enumerate(x):
    backbone = variables["backbone"]
    if v == 1 and second_view is not None:
      backbone = {**backbone, "params": second_view(backbone["params"])}
    out, updated = _apply(model, {**variables, "backbone": backbone}, "backbone", view, train)
    # The online parameters stay; the BatchNorm statistics are updated by either view.
    params = variables["backbone"]["params"]
    variables = {**variables, "backbone": {**updated["backbone"], "params": params}}
    head_out, variables = _apply(heads, variables, "heads", out, train)
    keep = {"embedding": out["embedding"], **{k: out[k] for k in method.features}, **head_out}
    per_view.append(keep)
  return jax.tree.map(lambda *v: jnp.stack(v), *per_view), variables


def _apply(module, variables, part, x, train):
  """`module.apply` on `variables[part]`: the outputs, and `variables` with new statistics."""
  if train and "batch_stats" in variables[part]:
    out, updates = module.apply(variables[part], x, train=True, mutable=["batch_stats"])
    return out, {**variables, part: {**variables[part], **updates}}
  return module.apply(variables[part], x, train=train), variables


def batch_fields(batch: Mapping[str, jax.Array], method: Method) -> dict[str, jax.Array]:
  """The fields `method.batch_keys` names, `{name: [n]}`; a `ValueError` names missing ones."""
  missing = [k for k in method.batch_keys if k not in batch]
  if missing:
    raise ValueError(
      f"Method {method.name!r} reads batch fields {missing} that this batch lacks (it holds "
      f"{sorted(batch)}); the data loop must pass them ('index': data.batches(..., "
      "with_index=True))"
    )
  return {k: batch[k] for k in method.batch_keys}


def probe_loss(
  probe: Variables, embedding: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, dict]:
  """Cross-entropy and top-1 accuracy of the linear probe on `embedding` `[..., D]`.

  Examples labelled `-1` (unlabelled data such as STL-10's `unlabelled` split) are left out.
  """
  logits = LinearClassifier(num_classes).apply(probe, jax.lax.stop_gradient(embedding))
  known = labels >= 0
  count = jnp.maximum(known.sum(), 1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  loss = jnp.sum(jnp.where(known, ce, 0.0)) / count
  acc = jnp.sum(jnp.where(known, jnp.argmax(logits, -1) == labels, False)) / count
  return loss, {"probe_loss": loss, "probe_acc": acc}


def make_train_step(
  *,
  model: nn.Module,
  heads: nn.Module,
  method: Method,
  hp: Mapping[str, Any],
  tx: optax.GradientTransformation,
  probe_tx: optax.GradientTransformation,
  num_classes: int,
  image_size: int,
  mean: jax.Array,
  std: jax.Array,
  total_steps: int,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """The pure step `(state, batch, key) -> (state, metrics)`.

  `batch` holds `image` `[n, H, W, C]` uint8 and `label` `[n]` int32 (`-1`: unlabelled, used by
  the probe only), and the fields `method.batch_keys` names. `mean`/`std` `[C]` standardise the
  augmented views (values in [0, 1]) before the backbone. `key` is the run's root key: the step
  folds in its own step number, so a resumed run draws the same views as an uninterrupted one.
  """
  hp = dict(hp)
  recipe = method.recipe

  def loss_fn(params, state, views, geometry):
    method_state, second_view = state.method_state, None
    if method.second_view is not None:
      method_state = method.second_view.update(params["backbone"], method_state, hp)
      second_view = functools.partial(method.second_view.apply, state=method_state, hp=hp)
    online, online_vars = _forward(
      model,
      heads,
      _with_params(state.online, params),
      views,
      method,
      train=True,
      second_view=second_view,
    )
    target, target_vars = None, None
    if state.target is not None:
      target, target_vars = _forward(model, heads, state.target, views, method, train=True)
      target = jax.lax.stop_gradient(target)
    loss, metrics, method_state = method.objective({**online, **geometry}, target, method_state, hp)
    return loss, (metrics, method_state, online_vars, target_vars, online["embedding"])

  def step(state: TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    fields = batch_fields(batch, method)
    views = augment.two_views(key, batch["image"], recipe=recipe, size=image_size)
    images = views["image"]
    if method.transform_views is not None:
      images = method.transform_views(
        jax.random.fold_in(key, 1), images, state.method_state, fields, hp
      )
    x = (images - mean) / std
    geometry = {"box": views["box"], "flip": views["flip"]}
    # The batch fields ride with the crop geometry into the objective's `online` dict.
    geometry.update({k: jnp.broadcast_to(v, views["flip"].shape) for k, v in fields.items()})
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    params = _params(state.online)
    (loss, aux), grads = grad_fn(params, state, x, geometry)
    metrics, method_state, online, target, embedding = aux
    param_updates, opt_state = tx.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, param_updates)
    online = _with_params(online, params)
    if target is not None:
      m = target_momentum(state.step, total_steps, *method.target_momentum)
      ema = functools.partial(optax.incremental_update, step_size=1 - m)
      target = _with_params(target, ema(params, _params(target)))
      metrics = {**metrics, "target_momentum": m}
    # Both views train the probe, each with the image's label.
    labels = jnp.broadcast_to(batch["label"], embedding.shape[:2])
    probe_grad_fn = jax.value_and_grad(probe_loss, has_aux=True)
    (_, probe_metrics), probe_grads = probe_grad_fn(state.probe, embedding, labels, num_classes)
    probe_updates, probe_opt_state = probe_tx.update(
      probe_grads["params"], state.probe_opt_state, state.probe["params"]
    )
    probe = {"params": optax.apply_updates(state.probe["params"], probe_updates)}
    new_state = TrainState(
      state.step + 1, online, target, method_state, opt_state, probe, probe_opt_state
    )
    return new_state, {**metrics, **probe_metrics, "loss": loss}

  return step
