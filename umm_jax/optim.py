"""Optimisers and learning-rate schedules for pre-training, UMM fine-tuning and linear probes.

`create(hp, family=..., global_batch=..., steps_per_epoch=..., total_steps=...)` turns the flat
hyper-parameter block `config.optim` (keys and defaults: `DEFAULTS`) into an optax transformation
of the params pytree (`{'backbone': ..., 'heads': ...}`) and the learning-rate schedule it follows,
so the training loop can log `schedule(state.step)`.

Conventions, chosen for parity with solo-learn (PyTorch) and SimCLR:
- Learning rate: the peak is `base_lr × global_batch / 256` when `scale_lr_by_batch`
  (solo-learn's `solo/args/pretrain.py`); `warmup_start_lr`, `min_lr` and `final_lr` are
  absolute. The schedule is evaluated at the number of updates already applied (0 for the
  first), as a PyTorch scheduler stepped after every optimiser step.
- Momentum is PyTorch's: `buf ← μ·buf + d; w ← w − lr_t·buf`, so the current learning rate
  multiplies the whole buffer (`optax.trace` before `optax.scale_by_learning_rate`, as
  `optax.sgd`).
- `exclude_bias_and_norm`: leaves with `ndim <= 1` (Dense/Conv biases, BatchNorm scales and
  biases) get neither weight decay nor the LARS trust ratio.
- LARS (`scale_by_lars`) reproduces solo-learn's `solo/utils/lars.py` step. `optax.lars` is not
  used because it differs: its trust ratio divides by `‖g + wd·w‖` instead of `‖g‖ + wd·‖w‖`,
  has no `eps` and no lr clipping, keeps the weight decay when a norm is zero, and multiplies
  the learning rate into the momentum buffer (a different trajectory under a schedule).
- `sgd` and `adam` couple the weight decay to the gradient (`g + wd·w`, as `torch.optim.SGD`
  and `torch.optim.Adam`, which solo-learn uses for W-MSE); `adamw` decouples it
  (`w ← w − lr_t·(adam_direction + wd·w)`, `torch.optim.AdamW` and `optax.adamw`).
"""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("lars", "sgd", "adam", "adamw")
SCHEDULES = ("warmup_cosine", "constant", "cosine", "exponential")

DEFAULTS: Mapping[str, Any] = dict(
  name="",  # one of OPTIMIZERS; "" takes the SSL method's default family
  base_lr=0.3,  # learning rate at global batch 256 when scale_lr_by_batch
  scale_lr_by_batch=True,  # peak lr = base_lr × global_batch / 256
  weight_decay=1e-4,
  momentum=0.9,  # lars and sgd, PyTorch convention
  schedule="warmup_cosine",  # one of SCHEDULES
  warmup_epochs=10,  # warmup_cosine only; may be fractional
  warmup_start_lr=0.0,  # absolute lr of the first warm-up step (solo-learn's recipes: 3e-5)
  min_lr=0.0,  # absolute final lr of warmup_cosine and cosine
  final_lr=1e-6,  # absolute lr reached after total_steps by exponential: γ = (final/peak)^(1/T)
  exponential_per_epoch=False,  # exponential: decay once per epoch (staircase), else every step
  lars_eta=0.02,  # LARS trust coefficient η (solo-learn's CIFAR/ImageNet-100 recipes)
  lars_clip=False,  # solo-learn's clip_lr: per-leaf lr = min(η·trust, lr_t)
  exclude_bias_and_norm=True,  # no weight decay / LARS adaptation on leaves with ndim <= 1
  b1=0.9,  # adam, adamw
  b2=0.999,  # adam, adamw
  eps=1e-8,  # adam/adamw denominator and LARS trust-ratio denominator (both 1e-8 in PyTorch)
)


def _check(kind: str, name: str, valid: tuple[str, ...]) -> None:
  if name not in valid:
    raise ValueError(f"Unknown {kind} {name!r}; valid {kind}s: {list(valid)}")


def decay_mask(params: Any) -> Any:
  """Pytree of bools like `params`: True on leaves with `ndim >= 2` (kernels, embeddings).

  False marks vectors and scalars — in flax, Dense/Conv `bias` and BatchNorm `scale`/`bias` —
  which `exclude_bias_and_norm` spares from weight decay and the LARS trust ratio (solo-learn's
  `remove_bias_and_norm_from_weight_decay` also tests `ndim <= 1`).
  """
  return jax.tree.map(lambda w: jnp.ndim(w) >= 2, params)


def peak_lr(*, base_lr: float, global_batch: int, scale_by_batch: bool) -> float:
  """`base_lr × global_batch / 256` if `scale_by_batch` (linear scaling rule), else `base_lr`."""
  if global_batch <= 0:
    raise ValueError(f"global_batch must be positive, got {global_batch}")
  return base_lr * global_batch / 256 if scale_by_batch else base_lr


def warmup_cosine(
  peak: float, *, warmup_steps: int, total_steps: int, start: float = 0.0, end: float = 0.0
) -> optax.Schedule:
  """Linear warm-up from `start` to `peak` over `warmup_steps`, then cosine from `peak` to `end`.

  `lr(t) = start + (peak − start)·t/W` for `t < W`, then
  `end + (peak − end)·(1 + cos(π·(t − W)/(T − W)))/2`, held at `end` after `T = total_steps`.
  This is pl_bolts' `LinearWarmupCosineAnnealingLR` used by solo-learn with `interval='step'`,
  except that its warm-up divides by `W − 1` (the peak is reached one step earlier there).
  `warmup_steps=0` gives plain cosine decay.
  """
  if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
    raise ValueError(
      f"Need 0 <= warmup_steps <= total_steps and total_steps > 0, got warmup_steps="
      f"{warmup_steps}, total_steps={total_steps}; lower optim.warmup_epochs or train longer"
    )

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = start + (peak - start) * t / max(warmup_steps, 1)
    progress = jnp.clip((t - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    decay = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(t < warmup_steps, warm, decay)

  return schedule


def exponential(
  peak: float, *, final: float, total_steps: int, steps_per_epoch: int, per_epoch: bool
) -> optax.Schedule:
  """`lr(t) = peak·γ^t` with `γ = (final/peak)^(1/T)`, `T = total_steps`; `final` from `t = T` on.

  The decay rate is the one of the UMM paper's learning-rate ablation (its Figure 7),
  `γ = (η_T/η_0)^(1/T)`. With `per_epoch` the exponent is the number of completed epochs
  (`γ_epoch = γ^steps_per_epoch`, PyTorch's `ExponentialLR` stepped once per epoch).
  """
  if peak <= 0 or final <= 0:
    raise ValueError(f"exponential decay needs peak > 0 and final > 0, got {peak}, {final}")
  if total_steps <= 0 or steps_per_epoch <= 0:
    raise ValueError(f"total_steps={total_steps}, steps_per_epoch={steps_per_epoch} must be > 0")
  log_ratio = math.log(final / peak)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    if per_epoch:
      t = jnp.floor(t / steps_per_epoch) * steps_per_epoch
    return peak * jnp.exp(log_ratio * jnp.minimum(t / total_steps, 1.0))

  return schedule


class ScaleByLarsState(NamedTuple):
  """Number of updates applied, to evaluate the schedule that `lars_clip` compares against."""

  count: jax.Array


def scale_by_lars(
  *,
  weight_decay: float,
  eta: float,
  eps: float = 1e-8,
  exclude_bias_and_norm: bool = True,
  clip_schedule: optax.Schedule | None = None,
) -> optax.GradientTransformation:
  """solo-learn's LARS scaling, before momentum and the learning rate.

  Per leaf `w` with gradient `g`, when the leaf is adapted (`ndim >= 2`, or every leaf when not
  `exclude_bias_and_norm`) and `‖w‖ > 0` and `‖g‖ > 0`:
    `r = η·‖w‖ / (‖g‖ + wd·‖w‖ + eps)`; with `clip_schedule`: `r = min(r / lr_t, 1)`;
    `d = r·(g + wd·w)`.
  Otherwise `d = g` (no weight decay either, as solo-learn). Chain with `optax.trace(momentum)`
  and `optax.scale_by_learning_rate(schedule)` for the full step; `clip_schedule` must be the
  same schedule so that `lr_t` is the learning rate of this step (the clipped per-leaf learning
  rate is then `min(η·‖w‖/(…), lr_t)`).
  """

  def init_fn(params):
    del params
    return ScaleByLarsState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lars needs the params: call update(grads, state, params)")
    lr = None if clip_schedule is None else clip_schedule(state.count)

    def leaf(g, w):
      if exclude_bias_and_norm and jnp.ndim(w) < 2:
        return g
      w_norm = jnp.linalg.norm(w.astype(jnp.float32))
      g_norm = jnp.linalg.norm(g.astype(jnp.float32))
      ratio = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
      if lr is not None:
        # lr_t = 0 (the first warm-up step) gives ratio/0 = inf, clipped to 1, as in PyTorch.
        ratio = jnp.minimum(ratio / lr, 1.0)
      scaled = (ratio * (g + weight_decay * w)).astype(g.dtype)
      return jnp.where((w_norm > 0) & (g_norm > 0), scaled, g)

    updates = jax.tree.map(leaf, updates, params)
    return updates, ScaleByLarsState(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def make_schedule(
  hp: Mapping[str, Any], *, peak: float, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """The schedule `hp['schedule']` (one of `SCHEDULES`) peaking at `peak`; see `DEFAULTS`.

  `constant`, `cosine` and `exponential` have no warm-up (`warmup_epochs` is ignored).
  """
  name = hp["schedule"]
  _check("schedule", name, SCHEDULES)
  if name == "constant":
    return optax.constant_schedule(peak)
  if name == "exponential":
    return exponential(
      peak,
      final=hp["final_lr"],
      total_steps=total_steps,
      steps_per_epoch=steps_per_epoch,
      per_epoch=hp["exponential_per_epoch"],
    )
  warmup = round(hp["warmup_epochs"] * steps_per_epoch) if name == "warmup_cosine" else 0
  start = hp["warmup_start_lr"] if warmup else peak
  return warmup_cosine(
    peak, warmup_steps=warmup, total_steps=total_steps, start=start, end=hp["min_lr"]
  )


def make_optimizer(
  name: str, hp: Mapping[str, Any], schedule: optax.Schedule
) -> optax.GradientTransformation:
  """The optimiser `name` (one of `OPTIMIZERS`) following `schedule`; see the module doc."""
  _check("optimizer", name, OPTIMIZERS)
  wd, exclude = hp["weight_decay"], hp["exclude_bias_and_norm"]
  mask = decay_mask if exclude else None
  if name == "lars":
    lars = scale_by_lars(
      weight_decay=wd,
      eta=hp["lars_eta"],
      eps=hp["eps"],
      exclude_bias_and_norm=exclude,
      clip_schedule=schedule if hp["lars_clip"] else None,
    )
    return optax.chain(
      lars, optax.trace(decay=hp["momentum"]), optax.scale_by_learning_rate(schedule)
    )
  if name == "adamw":
    return optax.adamw(
      schedule, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=wd, mask=mask
    )
  direction = (
    optax.trace(decay=hp["momentum"])
    if name == "sgd"
    else optax.scale_by_adam(b1=hp["b1"], b2=hp["b2"], eps=hp["eps"])
  )
  return optax.chain(
    optax.add_decayed_weights(wd, mask=mask), direction, optax.scale_by_learning_rate(schedule)
  )


def create(
  hp: Mapping[str, Any],
  *,
  family: str,
  global_batch: int,
  steps_per_epoch: int,
  total_steps: int,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser and its learning-rate schedule from the `config.optim` block `hp`.

  Args:
    hp: every key of `DEFAULTS` (a dict or an `ml_collections.ConfigDict`).
    family: the optimiser used when `hp['name']` is "" (the SSL method's `optimizer`).
    global_batch: images per step over all devices, for `scale_lr_by_batch`.
    steps_per_epoch: optimiser steps per epoch, to convert `warmup_epochs`.
    total_steps: optimiser steps of the whole run, where the schedule ends.

  Returns:
    `(tx, schedule)`: `tx` transforms gradients of the params pytree; `schedule(step)` is the
    learning rate of update `step` (0-based), for logging.

  Raises:
    ValueError: a missing key, an unknown optimiser or schedule name (listing the valid ones),
      or inconsistent step counts.
  """
  missing = [k for k in DEFAULTS if k not in hp]
  if missing:
    raise ValueError(f"optim hyper-parameters lack {missing}; expected keys: {list(DEFAULTS)}")
  hp = {k: hp[k] for k in DEFAULTS}
  name = hp["name"] or family
  _check("optimizer", name, OPTIMIZERS)
  peak = peak_lr(
    base_lr=hp["base_lr"], global_batch=global_batch, scale_by_batch=hp["scale_lr_by_batch"]
  )
  schedule = make_schedule(hp, peak=peak, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  return make_optimizer(name, hp, schedule), schedule
