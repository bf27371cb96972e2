"""SDCLR: self-damaging contrastive learning (Jiang, Chen, Mortazavi and Wang 2021,
"Self-Damaging Contrastive Learning", ICML 2021, arXiv:2106.02990).

SimCLR in which the second view passes a magnitude-pruned copy of the online backbone, a
"self-competitor" that forgets the long-tail samples first, so that contrasting the two branches
emphasises them. The loss is SimCLR's NT-Xent between the dense branch's projection of view 1 and
the pruned branch's projection of view 2, with gradients through both branches into the shared
weights (the official code, VITA-Group/SDCLR `prune/prune_simCLR.py`, gets the same gradient from
two backward passes).

Pruning (`base.SecondView`): every convolution kernel of the backbone — not BatchNorm, not the
projector, as the official `prune_conv2d` layers — keeps the weights with `|w| >= t`, where `t` is
the `k`-th smallest magnitude, `k = ceil(prune_ratio · count)` (so the `k` smallest are pruned),
counted per layer (`prune_scope='layer'`, the default here) or over all kernels at once ('global',
the official `mask.py`). The mask is recomputed from the current weights at the first step of
every epoch (every `steps_per_epoch` steps, a step counter in the method state) and kept in the
method state in between; the pruned branch multiplies the kernels by it. Pruning ratio 90% as in
the paper's CIFAR experiments.

Both branches share the BatchNorm layers and their running statistics (the official code without
`--prune_dual_bn`); the online probe and, under UMM, the ΔR and JS terms see the second view's
embedding as this branch computes it, i.e. pruned.

Defaults: the official CIFAR-LT scripts (`cmds/shell_scrips/cifar-10-LT.sh`): a two-layer
projector to 128 dimensions, τ = 0.2, SGD; `steps_per_epoch` 195 is CIFAR's 50,000 images at batch
256 (the long-tail configs set theirs).
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from umm_jax.methods import base, simclr
from umm_jax.models.heads import MLP, ProjectionHeads

PRUNE_SCOPES = ("layer", "global")
DEFAULTS = {
  "proj_hidden_dim": 512,
  "proj_output_dim": 128,
  "temperature": 0.2,
  "prune_ratio": 0.9,
  "prune_scope": "layer",
  "steps_per_epoch": 195,
}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """SDCLR's two-layer projector: Linear → BN → ReLU → Linear."""
  return ProjectionHeads(projector=MLP((hp["proj_hidden_dim"],), hp["proj_output_dim"]))


def _kernels(params: Mapping[str, Any]) -> dict[tuple[str, ...], jax.Array]:
  return {k: v for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "kernel"}


def _threshold(magnitudes: jax.Array, ratio: float) -> jax.Array:
  """The `ceil(ratio · count)`-th smallest of `magnitudes` (the largest one when all are cut)."""
  count = magnitudes.size
  k = min(math.ceil(ratio * count), count - 1)
  return jnp.sort(magnitudes.ravel())[k]


def prune_masks(params: Mapping[str, Any], *, ratio: float, scope: str) -> dict:
  """Magnitude-pruning masks of the convolution kernels in `params` (nested like them).

  `mask = |w| >= t`, `t` the `ceil(ratio · count)`-th smallest `|w|` of the layer ('layer') or of
  all kernels ('global'). Other parameters get no mask.
  """
  if scope not in PRUNE_SCOPES:
    raise ValueError(f"Unknown SDCLR prune_scope {scope!r}; valid: {PRUNE_SCOPES}")
  if not 0 <= ratio < 1:
    raise ValueError(f"SDCLR prune_ratio must be in [0, 1), got {ratio}")
  kernels = _kernels(jax.lax.stop_gradient(params))
  if scope == "global":
    t = _threshold(jnp.concatenate([jnp.abs(w).ravel() for w in kernels.values()]), ratio)
    masks = {k: jnp.abs(w) >= t for k, w in kernels.items()}
  else:
    masks = {k: jnp.abs(w) >= _threshold(jnp.abs(w), ratio) for k, w in kernels.items()}
  return traverse_util.unflatten_dict(masks)


def apply_masks(params: Mapping[str, Any], masks: Mapping[str, Any]) -> dict:
  """`params` with every kernel that has a mask multiplied by it; `params` may be a subset of
  the stages `masks` covers (the gradient reaches the kept weights only)."""
  flat_masks = traverse_util.flatten_dict(masks)
  flat = traverse_util.flatten_dict(params)
  pruned = {k: v * flat_masks[k].astype(v.dtype) if k in flat_masks else v for k, v in flat.items()}
  return traverse_util.unflatten_dict(pruned)


def init_pruning(params: Mapping[str, Any], hp: Mapping[str, Any]) -> dict:
  """The mask of the initial weights and the step counter 0."""
  masks = prune_masks(params, ratio=hp["prune_ratio"], scope=hp["prune_scope"])
  return {"mask": masks, "step": jnp.zeros((), jnp.int32)}


def update_pruning(params: Mapping[str, Any], state: dict, hp: Mapping[str, Any]) -> dict:
  """A new mask from `params` at the first step of every epoch, else the kept one; step + 1."""
  refresh = state["step"] % hp["steps_per_epoch"] == 0
  mask = jax.lax.cond(
    refresh,
    lambda: prune_masks(params, ratio=hp["prune_ratio"], scope=hp["prune_scope"]),
    lambda: state["mask"],
  )
  return {**state, "mask": mask, "step": state["step"] + 1}


def pruned_params(params: Mapping[str, Any], state: dict, hp: Mapping[str, Any]) -> dict:
  """The second view's parameters: `params` with the state's masks applied."""
  del hp
  return apply_masks(params, state["mask"])


def objective(online, target, state, hp):
  """NT-Xent between the dense branch's view 1 and the pruned branch's view 2."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  loss, metrics = simclr.nt_xent(z1, z2, temperature=hp["temperature"])
  kept = [m.mean() for m in jax.tree.leaves(state["mask"])]
  metrics = {**metrics, "kept_fraction": jnp.mean(jnp.stack(kept))}
  return loss, {**metrics, **base.collapse_metrics(jnp.concatenate([z1, z2]))}, state


METHODS = (
  base.Method(
    name="sdclr",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="sgd",
    recipe="simclr",
    second_view=base.SecondView(init=init_pruning, update=update_pruning, apply=pruned_params),
  ),
)
