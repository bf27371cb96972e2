"""What every self-supervised method declares, and the collapse signals all of them report.

A method is a small file in this package exporting `METHODS`, a tuple of `Method`s. The
training step (`umm_jax.train`) runs the backbone and the method's heads on both views, the
target network when the method has one, and then the method's `objective`:

  objective(online, target, state, hp) -> (loss, metrics, new_state)

- `online`: dict of per-view arrays with a leading view axis of size 2: the heads' outputs
  (e.g. `projection` `[2, n, d]`), the backbone's `embedding` `[2, n, D]`, the stage maps the
  method asked for in `features` (e.g. `layer4` `[2, n, h, w, c]`), and the views' crop
  geometry from `umm_jax.augment` (`box` `[2, n, 4]` as `(y0, x0, h, w)` in source-image
  fractions, `flip` `[2, n]`).
- `target`: the same dict from the target network (gradients already stopped), or `None` for
  methods without one.
- `state`: the method's own pytree (queues), `{}` when it has none; returned updated.
- `hp`: the method's hyper-parameters (`defaults`, overridden by the config).
The objective is a thin layer over the method's pure loss functions, which take arrays and
keyword-only scalars and are tested against NumPy references.

A method whose second view runs through a transformed copy of the online backbone (SDCLR's
pruned branch) declares a `SecondView`; the training and UMM steps apply it. A method that reads
batch fields besides the images and labels names them in `batch_keys` (BCL-I: `index`, each
image's row in the training set): the steps pass them, broadcast to `[2, n]`, in `online`, and to
`transform_views`, which may change the augmented views from the method state (BCL-I's
memorization-boosted augmentation).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def no_state(hp: Mapping[str, Any], key: jax.Array) -> dict:
  """`init_state` of methods that keep no state between steps."""
  del hp, key
  return {}


class SecondView(NamedTuple):
  """The backbone parameters the second view runs with, derived from the online ones.

  The two views share the BatchNorm statistics; gradients of the second view reach the online
  parameters through `apply`.

  Attributes:
    init: `init(params, hp) -> dict`, entries added to the method state at initialisation, from
      the backbone's initial parameters (SDCLR: the pruning mask).
    update: `update(params, state, hp) -> state`, once per step before the forward passes, from
      the online backbone's current parameters (SDCLR: the mask, refreshed once per epoch).
    apply: `apply(params, state, hp) -> params`, the second view's parameters; `params` may hold
      any subset of the backbone's top-level stages (UMM passes f_early's and f_late's apart).
  """

  init: Callable[[Mapping[str, Any], Mapping[str, Any]], dict]
  update: Callable[[Mapping[str, Any], dict, Mapping[str, Any]], dict]
  apply: Callable[[Mapping[str, Any], dict, Mapping[str, Any]], dict]


@dataclasses.dataclass(frozen=True)
class Method:
  """One SSL method as the training step sees it.

  Attributes:
    name: registry name.
    heads: `heads(hp) -> nn.Module`; the module maps the backbone's feature dict
      (`embedding` `[N, D]` plus stage maps) with `train=` to a dict of head outputs.
    objective: `objective(online, target, state, hp) -> (loss, metrics, new_state)`.
    defaults: every hyper-parameter the heads, objective and state read, with its default.
    optimizer: default optimiser family: 'lars', 'sgd', 'adam' or 'adamw'.
    recipe: augmentation recipe name in `umm_jax.augment.RECIPES`.
    target_momentum: `(base, final)` EMA momentum of the target network, following a cosine
      schedule from base to final; `None` when the method has no target network.
    init_state: `init_state(hp, key) -> dict` of method state such as queues.
    features: backbone stages the objective reads besides `embedding` (VICRegL: `layer4`).
    second_view: how the second view's backbone differs from the online one (SDCLR), or `None`.
    batch_keys: batch fields the method reads besides `image` and `label` (BCL-I: `index`).
    transform_views: `transform_views(key, images, state, fields, hp) -> images`, applied by the
      pre-training step to the augmented views `[2, n, S, S, C]` (floats in [0, 1], before
      standardisation) with the method state and the `batch_keys` fields `{name: [n]}`; `None`
      for most methods.
  """

  name: str
  heads: Callable[[Mapping[str, Any]], nn.Module]
  objective: Callable[..., tuple[jax.Array, dict, dict]]
  defaults: Mapping[str, Any]
  optimizer: str
  recipe: str
  target_momentum: tuple[float, float] | None = None
  init_state: Callable[[Mapping[str, Any], jax.Array], dict] = no_state
  features: tuple[str, ...] = ()
  second_view: SecondView | None = None
  batch_keys: tuple[str, ...] = ()
  transform_views: Callable[..., jax.Array] | None = None


def split_views(x: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
  """The two views `x[0], x[1]` of a `[2, n, ...]` array; a `ValueError` naming `name` otherwise."""
  if x.ndim < 2 or x.shape[0] != 2:
    raise ValueError(f"{name} must have a leading view axis of size 2, got shape {x.shape}")
  return x[0], x[1]


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(‖x‖, eps)` along `axis`."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def collapse_metrics(z: jax.Array) -> dict[str, jax.Array]:
  """Collapse signals of embeddings `z` `[n, d]` (rows are samples), without gradient.

  - `z_std`: mean over dimensions of the std over the batch of L2-normalised rows; about
    `1/sqrt(d)` for well-spread embeddings and 0 under complete collapse.
  - `z_offdiag_corr`: mean absolute off-diagonal entry of the `d × d` correlation matrix;
    near 0 for decorrelated dimensions, near 1 under dimensional collapse.
  """
  if z.ndim != 2:
    raise ValueError(f"collapse_metrics expects [n, d] embeddings, got shape {z.shape}")
  z = jax.lax.stop_gradient(z.astype(jnp.float32))
  std = jnp.std(l2_normalize(z), axis=0).mean()
  zc = z - z.mean(axis=0)
  zc = zc / jnp.maximum(jnp.linalg.norm(zc, axis=0), 1e-12)
  corr = zc.T @ zc
  d = z.shape[1]
  offdiag = (jnp.abs(corr).sum() - jnp.abs(jnp.diagonal(corr)).sum()) / (d * (d - 1))
  return {"z_std": std, "z_offdiag_corr": offdiag}
