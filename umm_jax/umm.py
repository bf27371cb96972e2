"""UMM, the Undoing Memorization Mechanism: the bi-level fine-tuning step and its losses.

The encoder `f = f_late ∘ f_early` is cut after `Settings.split`. `f_early` is frozen: it runs in
inference mode (BatchNorm running statistics, `train=False`) and its parameters and statistics are
never written. The trainable `θ = {'backbone': params of f_late, 'heads': params of the method's
heads}`. One outer step on a batch (`make_umm_step`):

1. two augmented views (`augment.two_views`, the method's recipe, standardised as in pre-training);
   `Z_e = f_early(views)` once, without gradient; the target network (if the method has one)
   runs once in train mode, as in `umm_jax.train`.
2. `L_SSL(θ)`: the method's objective on `f_late(Z_e)` and the heads in train mode (batch
   statistics, each view on its own as in pre-training). `JS(θ) = JS(P_e ‖ P_l)`
   (`density.density_js` on `f_late` in inference mode; `Settings.volume` estimator with
   `num_directions` sketch directions drawn from the step key). `ΔR(θ)`: `crr.rate_reduction` of
   the last-layer pooled features `Z_l` of both views, `[2n, D]` ordered `[view 1; view 2]`, taken
   from the same train-mode pass that gives `L_SSL`, with the `Settings.membership` groups.
3. `L_in = L_SSL + β·JS`, `L_out = L_SSL − α·ΔR`, and the hyper-gradient
   `g = dL_out(θ*(θ))/dθ` by `implicit.hypergradient(Settings.hypergrad, ...)`, with the curvature
   of `L_in` ('full') or of `L_SSL` alone ('ssl', `Settings.hessian`, `HESSIANS`).
4. The outer optimiser moves `θ` by `g`; the look-ahead `θ*` is discarded, unless
   `keep_inner_step`, which applies the outer update to `θ*` instead (the authors' code).
   BatchNorm running statistics of `f_late` and the heads, and the method's queues, are updated
   once, from the aux of `L_in` at `θ`; the target network follows its EMA rule
   (`train.target_momentum` over the UMM run's steps); the online linear probe trains on the
   stop-gradient embedding as in pre-training.

Variants (`VARIANTS`): 'umm'; 'no_rate' (α = 0, the paper's "*"); 'no_js' (β = 0, "**"): the
switched-off term is left out of the loss, not multiplied by zero; 'joint' (Table 10 "+ +"): one
plain gradient step on `L_SSL + β·JS − α·ΔR`; 'interleaved' (Table 10 "& UMM"): its step is
`make_interleaved_step`, a normal SSL step on all parameters followed by this UMM step on `θ`.

A method's `SecondView` (SDCLR's pruned branch) gives the parameters of the second view's
f_early and f_late, as in pre-training; its `batch_keys` fields reach the objective as there, but
its `transform_views` (BCL-I's boosted augmentation) is not applied: UMM's views are the recipe's.

On CPU, two batched LAPACK factorisations in flight at once can deadlock XLA's thread pool (see
`umm_jax.crr`). The JS term has none (`density` factorises its small Grams in plain XLA
operations), so only ΔR calls LAPACK, in one sequential loop over groups, and every ΔR of a step
is ordered after the last (`_after`, forward and backward).

References: the UMM paper (arXiv 2410.00772), Eq. 8–9 and Table 10; the project's reading is
`shared/spec/umm-math.md`, section 4.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from umm_jax import augment, crr, density, implicit, train
from umm_jax.methods.base import Method
from umm_jax.models import resnet

VARIANTS = ("umm", "no_rate", "no_js", "joint", "interleaved")
# How the paper's tables name each variant's encoder (Table 1: *, **, +UMM; Table 10: + +, & UMM).
VARIANT_LABELS = {
  "no_rate": "* (α = 0)",
  "no_js": "** (β = 0)",
  "umm": "+UMM",
  "joint": "+ + (joint)",
  "interleaved": "& UMM (interleaved)",
}
# 'labels' would use class labels during self-supervised fine-tuning; UMM is label-free.
MEMBERSHIPS = ("soft", "instance")
# The curvature the hyper-gradient multiplies by: 'full', the Hessian of L_in = L_SSL + β·JS (the
# paper's); 'ssl', of L_SSL alone (the JS term left out, Gauss–Newton style: θ* still steps on
# ∇L_in, but its dependence on θ ignores JS's curvature, an O(η·β) change of g; far cheaper, since
# the JS term's Hessian-vector products differentiate its sketch VJPs twice more).
HESSIANS = ("full", "ssl")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The UMM hyper-parameters (the `umm` block of the config documents each one)."""

  split: str = "layer2"
  variant: str = "umm"
  alpha: float = 1.0
  beta: float = 0.1
  hypergrad: str = "implicit"
  inner_steps: int = 1
  inner_lr: float = 0.01
  cg_maxiter: int = 10
  cg_ridge: float = 1e-4
  cg_tol: float = 1e-5
  fd_radius: float = 0.01
  hessian: str = "full"
  keep_inner_step: bool = False
  volume: str = "sketch"
  num_directions: int = 16
  volume_ridge: float = 1e-6
  volume_normalize: bool = False
  volume_chunk: int = 0
  membership: str = "soft"
  temperature: float = 0.1
  eps2: float = 0.5
  group_block: int = 0

  def __post_init__(self):
    checks = [
      ("split point", self.split, resnet.SPLIT_POINTS),
      ("variant", self.variant, VARIANTS),
      ("hyper-gradient mode", self.hypergrad, implicit.HYPERGRADS),
      ("volume estimator", self.volume, density.VOLUME_ESTIMATORS),
      ("membership", self.membership, MEMBERSHIPS),
      ("Hessian", self.hessian, HESSIANS),
    ]
    for kind, value, valid in checks:
      if value not in valid:
        raise ValueError(f"Unknown UMM {kind} {value!r}; valid: {', '.join(valid)}")
    for name in ("alpha", "beta", "volume_chunk", "group_block", "volume_ridge", "cg_ridge"):
      if getattr(self, name) < 0:
        raise ValueError(f"umm.{name} must be >= 0, got {getattr(self, name)}")
    for name in (
      "inner_steps",
      "cg_maxiter",
      "num_directions",
      "inner_lr",
      "eps2",
      "temperature",
      "fd_radius",
    ):
      if not getattr(self, name) > 0:
        raise ValueError(f"umm.{name} must be > 0, got {getattr(self, name)}")

  @classmethod
  def from_config(cls, umm_config: Mapping[str, Any], variant: str) -> "Settings":
    """`variant`'s settings, the other fields read from the `umm` config block (whose other keys,
    `variants` among them, are the loop's)."""
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "variant"]
    return cls(variant=variant, **{name: umm_config[name] for name in fields})

  @property
  def weights(self) -> tuple[float, float]:
    """`(α, β)` after the variant: 'no_rate' zeroes α, 'no_js' zeroes β."""
    alpha = 0.0 if self.variant == "no_rate" else self.alpha
    beta = 0.0 if self.variant == "no_js" else self.beta
    return alpha, beta


class Parts(NamedTuple):
  """The static pieces the losses close over (modules, method, settings resolved for a backend)."""

  model: resnet.ResNet
  split: resnet.Split
  heads: nn.Module
  method: Method
  hp: dict
  settings: Settings
  volume_chunk: int
  group_block: int


def make_parts(model, heads, method, hp, settings: Settings) -> Parts:
  """`Parts` with `group_block` 0 resolved to `crr.DEFAULT_GROUP_BLOCK` (`volume_chunk` 0: all)."""
  block = settings.group_block or crr.DEFAULT_GROUP_BLOCK
  split = resnet.split(model, settings.split)
  return Parts(model, split, heads, method, dict(hp), settings, settings.volume_chunk, block)


def _after(tree, scalar: jax.Array):
  """`tree` unchanged in value but computed after `scalar`, whose gradient then waits for it.

  A real data dependency (`x + 0·s`): an optimisation barrier alone does not order XLA's CPU
  thunks, and two batched factorisations in flight can deadlock (module docstring).
  """
  zero = 0.0 * scalar
  return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)


def _rest(variables: Mapping) -> dict:
  return {k: v for k, v in variables.items() if k != "params"}


def _apply_train(fn, variables: dict, x):
  """`fn(variables, x, train=True)`, returning the outputs and the updated BatchNorm statistics."""
  if "batch_stats" in variables:
    out, updates = fn(variables, x, train=True, mutable=["batch_stats"])
    return out, {**variables, **updates}
  return fn(variables, x, train=True), variables


@jax.named_scope("umm_ssl")  # the profile's parts (benchmarks/step_profile.py)
def ssl_loss(theta, ctx, parts: Parts, z_split: jax.Array | None = None):
  """`L_SSL(θ)` on the early features of `ctx`; aux: new statistics, queues, metrics, `Z_l`.

  `z_split` replaces the split stage's features `[2, n, h, w, c]` (to differentiate with respect
  to them, for the 'grad_norm' volume). Each view passes `f_late` and the heads on its own, in
  train mode, as in `train._forward`.
  """
  at = parts.settings.split
  early = ctx["early"] if z_split is None else {**ctx["early"], at: z_split}
  late_vars = {**ctx["late_rest"], "params": theta["backbone"]}
  heads_vars = {**ctx["heads_rest"], "params": theta["heads"]}
  second_view = parts.method.second_view
  per_view = []
  for v in range(2):
    run = late_vars
    if v == 1 and second_view is not None:  # SDCLR: the pruned branch, from θ and the mask
      pruned = second_view.apply(late_vars["params"], ctx["method_state"], parts.hp)
      run = {**late_vars, "params": pruned}
    out, updated = _apply_train(parts.split.late, run, early[at][v])
    late_vars = {**updated, "params": late_vars["params"]}
    features = {**{k: e[v] for k, e in early.items()}, **out}
    head_out, heads_vars = _apply_train(parts.heads.apply, heads_vars, features)
    keep = {"embedding": out["embedding"], **{k: features[k] for k in parts.method.features}}
    per_view.append({**keep, **head_out})
  online = jax.tree.map(lambda *x: jnp.stack(x), *per_view)
  loss, metrics, method_state = parts.method.objective(
    {**online, **ctx["geometry"]}, ctx["target"], ctx["method_state"], parts.hp
  )
  aux = dict(
    late_rest=_rest(late_vars),
    heads_rest=_rest(heads_vars),
    method_state=method_state,
    metrics=metrics,
    embedding=online["embedding"],
  )
  return loss, aux


@jax.named_scope("umm_js")  # the profile's parts (benchmarks/step_profile.py)
def log_volumes(theta, ctx, parts: Parts, grads: jax.Array | None = None) -> jax.Array:
  """Log-volumes `v` `[2n]` of `f_late` (inference mode) at the batch's views, `[view 1; view 2]`.

  `density.log_volume` with the `Settings.volume` estimator, divided by the number of singular
  values it sums when `Settings.volume_normalize` (so that its spread, and the scale of JS, do not
  grow with the number of sketch directions `k`); `grads` `[2, n, ...]`:
  `∂L_SSL/∂Z_e` for 'grad_norm'. The Jacobians of all views are batched; with
  `parts.volume_chunk` below `2n`, their Grams are factorised `volume_chunk` at a time in a loop
  (the same values as one batched factorisation).
  """
  s = parts.settings
  z_e = ctx["early"][s.split]
  z_e = z_e.reshape(-1, *z_e.shape[2:])
  if s.volume == "grad_norm":  # one log-norm a view: nothing to normalise
    return density.log_volume(None, z_e, estimator="grad_norm", grads=grads.reshape(z_e.shape))
  late_vars = {**ctx["late_rest"], "params": theta["backbone"]}
  f_late = lambda z: parts.split.late(late_vars, z[None], train=False)["embedding"][0]
  if parts.volume_chunk and z_e.shape[0] % parts.volume_chunk:
    raise ValueError(
      f"umm.volume_chunk={parts.volume_chunk} must divide the number of views {z_e.shape[0]}"
    )
  return density.log_volume(
    f_late,
    z_e,
    estimator=s.volume,
    key=jax.random.wrap_key_data(ctx["js_key"]),
    num_directions=s.num_directions,
    ridge=s.volume_ridge,
    chunk=parts.volume_chunk,
    normalize=s.volume_normalize,
  )


def js_term(theta, ctx, parts: Parts, grads: jax.Array | None = None) -> jax.Array:
  """`JS(P_e ‖ P_l)` of the batch's `2n` views: `density.layer_js` of `log_volumes`."""
  return density.layer_js(log_volumes(theta, ctx, parts, grads))


def volume_metrics(v: jax.Array) -> dict:
  """How spread the log-volumes `v` `[m]` are: `volume_std` (nats) and `p_l_max` (the largest
  `P_l = softmax(−v)`; `1/m` when uniform, towards 1 as JS nears its one-hot ceiling)."""
  v = jax.lax.stop_gradient(v)
  return {"volume_std": jnp.std(v), "p_l_max": jnp.max(jax.nn.softmax(-v))}


@jax.named_scope("umm_delta_r")  # the profile's parts (benchmarks/step_profile.py)
def rate_term(embedding: jax.Array, parts: Parts) -> jax.Array:
  """`ΔR` of the pooled features `[2, n, D]` of both views, as `[2n, D]` rows `[view 1; view 2]`."""
  s = parts.settings
  z = embedding.reshape(-1, embedding.shape[-1])
  p = crr.make_membership(s.membership, z, temperature=s.temperature)
  return crr.rate_reduction(z, p, eps2=s.eps2, group_block=parts.group_block).delta


def inner_loss(theta, ctx, parts: Parts):
  """`L_in = L_SSL + β·JS` (just `L_SSL` when β = 0); aux of `ssl_loss` plus `ssl_loss`, and
  `js` and the log-volumes `v` when β > 0."""
  _, beta = parts.settings.weights
  if beta == 0:
    loss, aux = ssl_loss(theta, ctx, parts)
    return loss, {**aux, "ssl_loss": loss}
  if parts.settings.volume == "grad_norm":
    z_split = ctx["early"][parts.settings.split]
    grad_fn = jax.value_and_grad(lambda z: ssl_loss(theta, ctx, parts, z), has_aux=True)
    (loss, aux), grads = grad_fn(z_split)
    v = log_volumes(theta, ctx, parts, grads)
  else:
    loss, aux = ssl_loss(theta, ctx, parts)
    v = log_volumes(theta, ctx, parts)
  js = density.layer_js(v)
  return loss + beta * js, {**aux, "ssl_loss": loss, "js": js, "log_volume": v}


def outer_loss(theta, ctx, parts: Parts) -> jax.Array:
  """`L_out = L_SSL − α·ΔR` (just `L_SSL` when α = 0)."""
  alpha, _ = parts.settings.weights
  loss, aux = ssl_loss(theta, ctx, parts)
  if alpha == 0:
    return loss
  return loss - alpha * rate_term(_after(aux["embedding"], loss), parts)


def joint_loss(theta, ctx, parts: Parts):
  """Single-level `L_SSL + β·JS − α·ΔR` (the 'joint' variant); aux as `inner_loss`."""
  alpha, _ = parts.settings.weights
  loss, aux = inner_loss(theta, ctx, parts)
  if alpha == 0:
    return loss, aux
  return loss - alpha * rate_term(_after(aux["embedding"], loss), parts), aux


def hypergradient(theta, ctx, parts: Parts) -> implicit.Hypergradient:
  """`g = dL_out(θ*(θ))/dθ` (the plain gradient for 'joint'); `aux_in` is `L_in`'s aux at `θ`."""
  s = parts.settings
  if s.variant == "joint":
    (value, aux), grad = jax.value_and_grad(joint_loss, has_aux=True)(theta, ctx, parts)
    metrics = {"loss_joint": value, "grad_norm": otu.tree_norm(grad)}
    return implicit.Hypergradient(grad, theta, metrics, aux, None)
  return implicit.hypergradient(
    s.hypergrad,
    functools.partial(inner_loss, parts=parts),
    functools.partial(outer_loss, parts=parts),
    theta,
    eta=s.inner_lr,
    num_steps=s.inner_steps,
    args_in=(ctx,),
    args_out=(ctx,),
    has_aux_in=True,
    cg_maxiter=s.cg_maxiter,
    cg_ridge=s.cg_ridge,
    cg_tol=s.cg_tol,
    fd_radius=s.fd_radius,
    hessian_loss=functools.partial(ssl_loss, parts=parts) if s.hessian == "ssl" else None,
  )


def theta_of(online: Mapping, split: str) -> dict:
  """`θ = {'backbone': f_late's params, 'heads': the heads' params}` of `state.online`."""
  _, late = resnet.split_variables(online["backbone"], split)
  return {"backbone": late["params"], "heads": online["heads"]["params"]}


def init_state(
  pretrained: train.TrainState, *, tx: optax.GradientTransformation, split: str
) -> train.TrainState:
  """The UMM state from a pre-training state: step 0 and `tx`'s state on `θ`; all else kept."""
  opt_state = tx.init(theta_of(pretrained.online, split))
  return pretrained.replace(step=jnp.zeros((), jnp.int32), opt_state=opt_state)


def prepare(state: train.TrainState, batch: dict, key: jax.Array, parts: Parts, views_fn):
  """`(θ, ctx, new target variables)` of one step: views, frozen early features, the target."""
  x, geometry = views_fn(key, batch["image"])
  fields = train.batch_fields(batch, parts.method)
  geometry = {**geometry, **{k: jnp.broadcast_to(v, x.shape[:2]) for k, v in fields.items()}}
  at = parts.settings.split
  early_vars, late_vars = resnet.split_variables(state.online["backbone"], at)
  method_state, second_view = state.method_state, parts.method.second_view
  if second_view is not None:
    method_state = second_view.update(state.online["backbone"]["params"], method_state, parts.hp)
  # Inference mode: f_early's running statistics are read, never written.
  per_view = []
  for v, view in enumerate(x):
    variables = early_vars
    if v == 1 and second_view is not None:
      pruned = second_view.apply(early_vars["params"], method_state, parts.hp)
      variables = {**early_vars, "params": pruned}
    with jax.named_scope("umm_early"):
      per_view.append(parts.model.apply(variables, view, train=False, stop=at))
  early = jax.lax.stop_gradient(jax.tree.map(lambda *v: jnp.stack(v), *per_view))
  target, target_vars = None, None
  if state.target is not None:
    target, target_vars = train._forward(
      parts.model, parts.heads, state.target, x, parts.method, train=True
    )
    target = jax.lax.stop_gradient(target)
  ctx = dict(
    early=early,
    late_rest=_rest(late_vars),
    heads_rest=_rest(state.online["heads"]),
    target=target,
    method_state=method_state,
    geometry=geometry,
    js_key=jax.random.key_data(jax.random.fold_in(key, 1)),
  )
  return theta_of(state.online, at), ctx, target_vars


def make_views_fn(*, recipe: str, image_size: int, mean: jax.Array, std: jax.Array) -> Callable:
  """`(key, images uint8 [n, H, W, C]) -> (x [2, n, S, S, C], geometry)` as `train`'s step."""

  def views_fn(key, images):
    views = augment.two_views(key, images, recipe=recipe, size=image_size)
    return (views["image"] - mean) / std, {"box": views["box"], "flip": views["flip"]}

  return views_fn


def _volumes_aside(theta, ctx, parts: Parts) -> jax.Array:
  """`log_volumes` at `θ` outside `L_in`, the 'grad_norm' proxy's gradient computed here (live in
  `θ`, as in `inner_loss`)."""
  grads = None
  if parts.settings.volume == "grad_norm":
    z_split = ctx["early"][parts.settings.split]
    grads = jax.grad(lambda z: ssl_loss(theta, ctx, parts, z)[0])(z_split)
  return log_volumes(theta, ctx, parts, grads)


def _measured(theta, ctx, parts: Parts, aux: dict, after: jax.Array) -> dict:
  """`js`, `volume_metrics` and `delta_r` at `θ` for the log: from `aux` when in the loss, else
  computed aside.

  The ΔR waits for `after` (the step's last result), so it never runs beside the loss's ΔR.
  """
  v = aux.get("log_volume")
  if v is None:
    v = _volumes_aside(theta, ctx, parts)
  delta_r = rate_term(_after(aux["embedding"], after), parts)
  measured = {"js": density.layer_js(v), "delta_r": delta_r, **volume_metrics(v)}
  return jax.lax.stop_gradient(measured)


def make_umm_step(
  *,
  model: resnet.ResNet,
  heads: nn.Module,
  method: Method,
  hp: Mapping[str, Any],
  settings: Settings,
  tx: optax.GradientTransformation,
  probe_tx: optax.GradientTransformation,
  num_classes: int,
  image_size: int,
  mean: jax.Array,
  std: jax.Array,
  total_steps: int,
) -> Callable[[train.TrainState, dict, jax.Array], tuple[train.TrainState, dict]]:
  """The pure UMM step `(state, batch, key) -> (state, metrics)` (the module docstring's 1–4).

  `state` is a `train.TrainState` whose `opt_state` is `tx`'s state on `θ` (`init_state`);
  `batch`, `mean`, `std` and `key` as in `train.make_train_step` (the step folds in `state.step`).
  `total_steps` sets the target network's momentum schedule. Metrics: `loss` (`L_SSL` at `θ`),
  `js` and `delta_r` (at `θ`, also when their weight is 0), the log-volumes' `volume_std` and
  `p_l_max` (`volume_metrics`), `hypergradient`'s metrics
  (`grad_norm`, `loss_in`, `loss_out`, `cg_residual`, ...), the method's and the probe's.
  """
  parts = make_parts(model, heads, method, hp, settings)
  views_fn = make_views_fn(recipe=method.recipe, image_size=image_size, mean=mean, std=std)
  at = settings.split

  def step(state: train.TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    theta, ctx, target = prepare(state, batch, key, parts, views_fn)
    hg = hypergradient(theta, ctx, parts)
    aux = hg.aux_in
    base = hg.theta_star if settings.keep_inner_step else theta
    updates, opt_state = tx.update(hg.grad, state.opt_state, base)
    new_theta = optax.apply_updates(base, updates)
    early_vars, _ = resnet.split_variables(state.online["backbone"], at)
    late = {**aux["late_rest"], "params": new_theta["backbone"]}
    online = {
      "backbone": resnet.merge_variables(early_vars, late),
      "heads": {**aux["heads_rest"], "params": new_theta["heads"]},
    }
    metrics = {**aux["metrics"], **hg.metrics, "loss": aux["ssl_loss"]}
    metrics.update(_measured(theta, ctx, parts, aux, hg.metrics["grad_norm"]))
    if target is not None:
      m = train.target_momentum(state.step, total_steps, *method.target_momentum)
      params = {part: v["params"] for part, v in online.items()}
      ema = optax.incremental_update(params, {p: v["params"] for p, v in target.items()}, 1 - m)
      target = {part: {**v, "params": ema[part]} for part, v in target.items()}
      metrics["target_momentum"] = m
    labels = jnp.broadcast_to(batch["label"], aux["embedding"].shape[:2])
    probe_grad_fn = jax.value_and_grad(train.probe_loss, has_aux=True)
    (_, probe_metrics), probe_grads = probe_grad_fn(
      state.probe, aux["embedding"], labels, num_classes
    )
    probe_updates, probe_opt_state = probe_tx.update(
      probe_grads["params"], state.probe_opt_state, state.probe["params"]
    )
    probe = {"params": optax.apply_updates(state.probe["params"], probe_updates)}
    new_state = train.TrainState(
      state.step + 1, online, target, aux["method_state"], opt_state, probe, probe_opt_state
    )
    return new_state, {**metrics, **probe_metrics}

  return step


def make_interleaved_step(ssl_step: Callable, umm_step: Callable) -> Callable:
  """The 'interleaved' step: an SSL step on every parameter, then a UMM step on `θ`, one batch.

  `state.opt_state` is `{'ssl': ..., 'umm': ...}` (the two optimisers' states). Both steps see
  the same `state.step` (one step of the run) with keys folded from the run's key by 0 and 1;
  the target network takes both EMA updates. Metrics: the SSL step's, and the UMM step's with
  the prefix `umm_`.
  """

  def step(state: train.TrainState, batch: dict, key: jax.Array):
    opt = state.opt_state
    ssl_key, umm_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    mid, ssl_metrics = ssl_step(state.replace(opt_state=opt["ssl"]), batch, ssl_key)
    ssl_opt = mid.opt_state
    mid = mid.replace(step=state.step, opt_state=opt["umm"])
    new, umm_metrics = umm_step(mid, batch, umm_key)
    metrics = {**ssl_metrics, **{f"umm_{k}": v for k, v in umm_metrics.items()}}
    return new.replace(opt_state={"ssl": ssl_opt, "umm": new.opt_state}), metrics

  return step


def make_measure(
  *, model, heads, method, hp, settings: Settings, image_size: int, mean, std
) -> Callable[[train.TrainState, dict, jax.Array], dict]:
  """`(state, batch, key) -> {loss, js, delta_r, volume_std, p_l_max, js_grad_share}` at the
  state's `θ`, on the views and sketch directions a UMM step at `state.step` would draw; nothing
  is updated. `js_grad_share = ‖β ∇JS‖ / ‖∇L_SSL‖` is how much the JS term moves the inner step
  (with `settings.beta`, also for 'no_js'); it costs a gradient of each term."""
  parts = make_parts(model, heads, method, hp, settings)
  views_fn = make_views_fn(recipe=method.recipe, image_size=image_size, mean=mean, std=std)

  def measure(state, batch, key):
    key = jax.random.fold_in(key, state.step)
    theta, ctx, _ = prepare(state, batch, key, parts, views_fn)
    (loss, aux), ssl_grad = jax.value_and_grad(ssl_loss, has_aux=True)(theta, ctx, parts)

    def js_of(t):
      v = _volumes_aside(t, ctx, parts)
      return density.layer_js(v), v

    (_, v), js_grad = jax.value_and_grad(js_of, has_aux=True)(theta)
    share = settings.beta * otu.tree_norm(js_grad) / otu.tree_norm(ssl_grad)
    measured = _measured(theta, ctx, parts, {**aux, "log_volume": v}, loss)
    return {"loss": loss, **measured, "js_grad_share": share}

  return measure
