"""Tests for umm_jax.methods.sdclr: magnitude pruning against NumPy, the per-epoch refresh, the
SimCLR loss between branches, and the `SecondView` hook in the training step's forward pass.

The pruning reference sorts each kernel's magnitudes with NumPy and cuts the `ceil(ratio · count)`
smallest, as the official `prune/mask.py` does (per layer, or over all kernels for 'global').
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from umm_jax import train, umm
from umm_jax.methods import sdclr, simclr
from umm_jax.models import resnet

SDCLR = sdclr.METHODS[0]
HP = {**sdclr.DEFAULTS, "steps_per_epoch": 3}


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def toy_params(seed=0):
  # A backbone-like tree: kernels in two stages, BatchNorm parameters that are never pruned.
  return {
    "stem": {"conv1": {"kernel": random((3, 3, 2, 4), seed)}, "bn1": {"scale": random((4,), 1)}},
    "layer1": {"block0": {"conv1": {"kernel": random((3, 3, 4, 4), seed + 2)}}},
  }


def np_keep(w, ratio, threshold_from=None):
  pool = np.abs(w if threshold_from is None else threshold_from).ravel()
  k = min(math.ceil(ratio * pool.size), pool.size - 1)
  return np.abs(w) >= np.sort(pool)[k]


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_layer_masks_match_numpy(ratio):
  params = toy_params()
  masks = jax.jit(lambda p: sdclr.prune_masks(p, ratio=ratio, scope="layer"))(params)
  flat = traverse_util.flatten_dict(masks)
  assert set(flat) == {("stem", "conv1", "kernel"), ("layer1", "block0", "conv1", "kernel")}
  for key, mask in flat.items():
    w = traverse_util.flatten_dict(params)[key]
    np.testing.assert_array_equal(mask, np_keep(w, ratio))
    assert mask.sum() == w.size - math.ceil(ratio * w.size)


def test_global_masks_share_one_threshold():
  params = toy_params(3)
  masks = traverse_util.flatten_dict(sdclr.prune_masks(params, ratio=0.7, scope="global"))
  kernels = {k: v for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "kernel"}
  everything = np.concatenate([w.ravel() for w in kernels.values()])
  for key, w in kernels.items():
    np.testing.assert_array_equal(masks[key], np_keep(w, 0.7, threshold_from=everything))
  kept = sum(int(m.sum()) for m in masks.values())
  assert kept == everything.size - math.ceil(0.7 * everything.size)


def test_bad_scope_and_ratio_raise():
  with pytest.raises(ValueError, match="valid"):
    sdclr.prune_masks(toy_params(), ratio=0.5, scope="channel")
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    sdclr.prune_masks(toy_params(), ratio=1.0, scope="layer")


def test_apply_masks_on_a_subset_and_its_gradient():
  params = toy_params()
  masks = sdclr.prune_masks(params, ratio=0.5, scope="layer")
  subset = {"layer1": params["layer1"]}
  pruned = sdclr.apply_masks(subset, masks)
  w = params["layer1"]["block0"]["conv1"]["kernel"]
  m = np.asarray(masks["layer1"]["block0"]["conv1"]["kernel"])
  np.testing.assert_array_equal(pruned["layer1"]["block0"]["conv1"]["kernel"], w * m)
  grads = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(sdclr.apply_masks(p, masks))))(
    params
  )
  np.testing.assert_array_equal(grads["layer1"]["block0"]["conv1"]["kernel"], m)
  np.testing.assert_array_equal(grads["stem"]["bn1"]["scale"], np.ones(4))  # never pruned


def test_mask_is_refreshed_at_the_first_step_of_each_epoch_only():
  params = toy_params()
  state = sdclr.init_pruning(params, HP)
  update = jax.jit(lambda p, s: sdclr.update_pruning(p, s, HP))
  new_params = toy_params(seed=10)
  expected_new = sdclr.prune_masks(new_params, ratio=0.9, scope="layer")
  old_mask = state["mask"]
  for step in range(7):
    state = update(new_params if step > 0 else params, state)
    assert int(state["step"]) == step + 1
    reference = expected_new if step >= 3 else old_mask  # epochs of 3 steps: refresh at 0, 3, 6
    jax.tree.map(np.testing.assert_array_equal, state["mask"], reference)


def test_objective_is_nt_xent_between_the_branches():
  hp = {**HP, "proj_output_dim": 8}
  state = sdclr.init_pruning(toy_params(), hp)
  online = {"projection": random((2, 6, 8), 4)}
  loss, metrics, new_state = jax.jit(lambda o, s: SDCLR.objective(o, None, s, hp))(online, state)
  expected, _ = simclr.nt_xent(*online["projection"], temperature=hp["temperature"])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["kept_fraction"], 0.1, atol=0.02)
  jax.tree.map(np.testing.assert_array_equal, new_state, state)


def test_forward_runs_the_second_view_through_the_pruned_backbone():
  model = resnet.create("resnet10", stem="cifar", width=4)
  heads = SDCLR.heads({**HP, "proj_hidden_dim": 8, "proj_output_dim": 4})
  x = jnp.asarray(random((2, 3, 8, 8, 3), 5))
  backbone = model.init(jax.random.key(0), x[0], train=False)
  features = model.apply(backbone, x[0], train=False)
  variables = {"backbone": backbone, "heads": heads.init(jax.random.key(1), features, train=False)}
  state = sdclr.init_pruning(backbone["params"], HP)
  second = lambda p: sdclr.pruned_params(p, state, HP)
  out, new_vars = train._forward(model, heads, variables, x, SDCLR, train=False, second_view=second)
  dense = model.apply(backbone, x[0], train=False)["embedding"]
  pruned_vars = {**backbone, "params": sdclr.apply_masks(backbone["params"], state["mask"])}
  pruned = model.apply(pruned_vars, x[1], train=False)["embedding"]
  np.testing.assert_allclose(out["embedding"][0], dense, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["embedding"][1], pruned, rtol=1e-5, atol=1e-6)
  # The online parameters are kept whole.
  jax.tree.map(np.testing.assert_array_equal, new_vars["backbone"]["params"], backbone["params"])


def _train_state(model, hp):
  return train.init_state(
    jax.random.key(0),
    model=model,
    heads=SDCLR.heads(hp),
    method=SDCLR,
    hp=hp,
    tx=optax.sgd(0.1),
    input_shape=(8, 8, 3),
    num_classes=2,
    probe_tx=optax.sgd(0.1),
  )


def test_train_state_holds_the_initial_mask():
  model = resnet.create("resnet10", stem="cifar", width=4)
  hp = {**HP, "proj_hidden_dim": 8, "proj_output_dim": 4}
  state = _train_state(model, hp)
  expected = sdclr.prune_masks(state.online["backbone"]["params"], ratio=0.9, scope="layer")
  jax.tree.map(np.testing.assert_array_equal, state.method_state["mask"], expected)
  assert int(state.method_state["step"]) == 0 and SDCLR.second_view is not None


def test_umm_runs_the_second_view_through_the_pruned_early_layers():
  model = resnet.create("resnet10", stem="cifar", width=4)
  hp = {**HP, "proj_hidden_dim": 8, "proj_output_dim": 4}
  state = _train_state(model, hp)
  parts = umm.make_parts(model, SDCLR.heads(hp), SDCLR, hp, umm.Settings(split="layer1"))
  x = jnp.asarray(random((2, 3, 8, 8, 3), 6))
  views_fn = lambda key, images: (x, {})
  _, ctx, _ = umm.prepare(state, {"image": None}, jax.random.key(0), parts, views_fn)
  assert int(ctx["method_state"]["step"]) == 1  # the step's mask refresh happened once
  early, _ = resnet.split_variables(state.online["backbone"], "layer1")
  pruned = {**early, "params": sdclr.apply_masks(early["params"], ctx["method_state"]["mask"])}
  for view, variables in enumerate((early, pruned)):
    expected = model.apply(variables, x[view], train=False, stop="layer1")["layer1"]
    np.testing.assert_allclose(ctx["early"]["layer1"][view], expected, rtol=1e-5, atol=1e-6)
