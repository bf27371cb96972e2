"""UMM: its terms, variants and hyper-gradient modes, every method, and the `umm` stage.

A tiny SimCLR encoder (ResNet-10, width 8, 16 px, synthetic data) is pre-trained and fine-tuned
once per module through `umm_jax.main.run` (stages `pretrain`, `umm`); the other tests start from
its pre-training checkpoint. Everything runs on the CPU backend, on 2 cores in CI.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import pytest

from configs import test as test_config
from umm_jax import (
  checkpoint,
  crr,
  data,
  density,
  implicit,
  main,
  methods,
  parallel,
  pretrain,
  train,
  umm,
  umm_stage,
)
from umm_jax.models import resnet

SIZE = 16
BATCH = 16


def _config(**overrides):
  config = test_config.get_config()
  config.stages = ("pretrain", "umm")
  config.umm.update(overrides)
  return config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _max_change(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b), strict=True))


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
  """`configs/test.py` through the entry point: 2 epochs of pre-training, then 1 epoch of UMM."""
  workdir = tmp_path_factory.mktemp("umm_stage")
  main.run(_config(), workdir)
  return workdir


class Setup(NamedTuple):
  urun: umm_stage.UmmRun
  state: train.TrainState
  step: object
  measure: object
  parts: umm.Parts
  views_fn: object
  batch: dict


def _setup(workdir, **overrides) -> Setup:
  """The UMM pieces of `_config(**overrides)`, from the module's pre-training checkpoint."""
  variant = overrides.pop("variant", "umm")
  config = _config(**overrides)
  train_set = data.load(config.data, "train")
  urun = umm_stage.build(config, train_set, variant)
  template = pretrain.init_state(urun.pretrain_run, jax.random.key(0))
  pretrained, _ = umm_stage.load_pretrained(workdir, template)
  mean, std = (jnp.asarray(x) for x in train_set.channel_stats())
  run = urun.run
  kw = dict(model=run.model, heads=run.heads, method=run.method, hp=run.hp)
  parts = umm.make_parts(**kw, settings=urun.settings)
  views_fn = umm.make_views_fn(recipe=run.method.recipe, image_size=SIZE, mean=mean, std=std)
  measure = umm.make_measure(**kw, settings=urun.settings, image_size=SIZE, mean=mean, std=std)
  step = umm_stage.make_step(urun, image_size=SIZE, mean=mean, std=std)
  batch = {"image": jnp.asarray(train_set.images[:BATCH]), "label": train_set.labels[:BATCH]}
  state = umm_stage.umm_state(urun, pretrained)
  return Setup(urun, state, jax.jit(step), jax.jit(measure), parts, views_fn, batch)


def _theta_ctx(setup: Setup, key=1):
  return umm.prepare(setup.state, setup.batch, jax.random.key(key), setup.parts, setup.views_fn)[:2]


# --- the stage ----------------------------------------------------------------------------------


def test_stage_writes_checkpoints_and_metrics(stage_run):
  ckpt = checkpoint.Checkpointer(stage_run / "umm" / "umm" / "checkpoints", read_only=True)
  assert ckpt.all_steps() == [4]  # one epoch of 64 images in batches of 16
  meta = ckpt.metadata(4)
  assert meta["pretrain_step"] == 8 and meta["variant"] == "umm" and meta["epoch"] == 1
  lines = (stage_run / "umm" / "umm" / pretrain.METRICS_FILE).read_text().splitlines()
  records = [json.loads(line) for line in lines]
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_records] == [2, 4]  # every log_every_steps = 2
  for key in ("loss", "js", "delta_r", "grad_norm", "cg_residual", "loss_in", "loss_out"):
    assert all(np.isfinite(r[key]) for r in train_records), key
  assert all(0 <= r["js"] <= np.log(2) for r in train_records)
  assert [r["epoch"] for r in records if r["split"] == "test"] == [1]
  # Readers of pre-training checkpoints (evaluate, monitor) read the UMM'd encoder the same way.
  variables, _ = pretrain.load_backbone(ckpt, 4)
  assert set(variables) == {"params", "batch_stats"}


def test_stage_keeps_f_early_and_tunes_f_late(stage_run):
  pre = checkpoint.load_state_dict(stage_run / "checkpoints")["online"]
  post = checkpoint.load_state_dict(stage_run / "umm" / "umm" / "checkpoints")["online"]
  split = _config().umm.split
  for collection in ("params", "batch_stats"):
    early_pre, late_pre = resnet.split_variables(pre["backbone"], split)
    early_post, late_post = resnet.split_variables(post["backbone"], split)
    for a, b in zip(_leaves(early_pre[collection]), _leaves(early_post[collection]), strict=True):
      np.testing.assert_array_equal(a, b)  # bitwise
    assert _max_change(late_pre[collection], late_post[collection]) > 0, collection
  assert _max_change(pre["heads"]["params"], post["heads"]["params"]) > 0


def test_interrupted_stage_resumes_to_the_same_state(stage_run, tmp_path, monkeypatch):
  # SIGTERM while the 3rd UMM batch is put on the devices: the loop finishes step 3, saves it and
  # stops; rerunning resumes there and must end where the uninterrupted run ended. (As in
  # pretrain_test: the signal comes from the main thread, two global_batch calls a step.)
  shutil.copytree(stage_run / "checkpoints", tmp_path / "checkpoints")
  real_global_batch = parallel.global_batch
  calls = []

  def global_batch_then_sigterm(local, mesh):
    calls.append(1)
    if len(calls) == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_global_batch(local, mesh)

  monkeypatch.setattr(parallel, "global_batch", global_batch_then_sigterm)
  with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
    umm_stage.finetune(_config(), tmp_path, "umm")
  monkeypatch.setattr(parallel, "global_batch", real_global_batch)
  ckpt = checkpoint.Checkpointer(tmp_path / "umm" / "umm" / "checkpoints", read_only=True)
  assert ckpt.all_steps() == [3] and ckpt.metadata(3)["interrupted_by"] == "SIGTERM"
  resumed = umm_stage.finetune(_config(), tmp_path, "umm")
  reference = checkpoint.load_state_dict(stage_run / "umm" / "umm" / "checkpoints")
  for a, b in zip(_leaves(reference["online"]), _leaves(resumed.online), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  lines = (tmp_path / "umm" / "umm" / pretrain.METRICS_FILE).read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]


def test_stage_runs_each_variant_into_its_own_directory(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(umm_stage, "finetune", lambda c, w, v: calls.append((w, v)))
  umm_stage.run_stage(_config(variants=("no_rate", "no_js", "umm")), tmp_path)
  assert calls == [(tmp_path, "no_rate"), (tmp_path, "no_js"), (tmp_path, "umm")]
  assert umm_stage.variant_dir(tmp_path, "no_js") == tmp_path / "umm" / "no_js"


def test_missing_pretraining_checkpoint_says_to_pretrain(tmp_path):
  with pytest.raises(FileNotFoundError, match="run the 'pretrain' stage first"):
    umm_stage.finetune(_config(), tmp_path, "umm")


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("variants", ("both",), "valid: umm, no_rate, no_js, joint, interleaved"),
    ("variants", (), "must name distinct variants"),
    ("variants", ("umm", "umm"), "must name distinct variants"),
    ("hypergrad", "exact", "finite_difference"),
    ("volume", "logdet", "sketch"),
    ("membership", "labels", "soft, instance"),
    ("optimizer", "lamb", "adamw"),
    ("beta", -1.0, "umm.beta must be >= 0"),
    ("epochs", 0, "umm.epochs must be a positive integer"),
  ],
)
def test_validate_names_bad_umm_values(key, value, match):
  with pytest.raises(ValueError, match=match):
    main.validate(_config(**{key: value}))


# --- the terms ----------------------------------------------------------------------------------


def test_js_term_has_gradient_in_f_late_only_and_chunks_agree(stage_run):
  setup = _setup(stage_run)
  theta, ctx = _theta_ctx(setup)
  assert setup.parts.volume_chunk == 0 and setup.parts.group_block == crr.DEFAULT_GROUP_BLOCK
  js, grad = jax.jit(jax.value_and_grad(lambda t: umm.js_term(t, ctx, setup.parts)))(theta)
  assert 0 < float(js) < np.log(2)
  assert float(otu.tree_norm(grad["backbone"])) > 0
  assert float(otu.tree_norm(grad["heads"])) == 0  # JS reads f_late, not the heads
  # A loop over chunks of 2 views equals the batched value (same directions).
  chunked = setup.parts._replace(volume_chunk=2)
  np.testing.assert_allclose(float(umm.js_term(theta, ctx, chunked)), float(js), rtol=1e-5)
  z_e = ctx["early"][setup.urun.settings.split]
  late = {**ctx["late_rest"], "params": theta["backbone"]}
  f_late = lambda z: setup.parts.split.late(late, z[None], train=False)["embedding"][0]
  direct = density.density_js(
    f_late,
    z_e.reshape(-1, *z_e.shape[2:]),
    estimator="sketch",
    key=jax.random.wrap_key_data(ctx["js_key"]),
    num_directions=setup.urun.settings.num_directions,
    ridge=setup.urun.settings.volume_ridge,
  )
  np.testing.assert_allclose(float(direct), float(js), rtol=1e-5)


def test_volume_metrics_and_normalised_volumes(stage_run):
  setup = _setup(stage_run)
  theta, ctx = _theta_ctx(setup)
  v = np.asarray(umm.log_volumes(theta, ctx, setup.parts), np.float64)
  metrics = umm.volume_metrics(jnp.asarray(v))
  np.testing.assert_allclose(float(metrics["volume_std"]), v.std(), rtol=1e-5)
  p_l = np.exp(-(v - v.min())) / np.exp(-(v - v.min())).sum()
  np.testing.assert_allclose(float(metrics["p_l_max"]), p_l.max(), rtol=1e-5)
  # volume_normalize: v over the k sketch directions it sums, and JS of that.
  k = setup.urun.settings.num_directions
  settings = dataclasses.replace(setup.parts.settings, volume_normalize=True)
  normal = setup.parts._replace(settings=settings)
  np.testing.assert_allclose(umm.log_volumes(theta, ctx, normal), v / k, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    float(umm.js_term(theta, ctx, normal)), float(density.layer_js(jnp.asarray(v / k))), rtol=1e-5
  )
  # make_measure's share of the inner gradient, from the two gradients taken here.
  key = jax.random.key(1)
  measured = setup.measure(setup.state, setup.batch, key)
  step_key = jax.random.fold_in(key, setup.state.step)
  theta, ctx, _ = umm.prepare(setup.state, setup.batch, step_key, setup.parts, setup.views_fn)
  flat = lambda t: np.concatenate([np.ravel(x) for x in _leaves(t)]).astype(np.float64)
  js_grad = flat(jax.jit(jax.grad(lambda t: umm.js_term(t, ctx, setup.parts)))(theta))
  ssl_grad = flat(jax.jit(jax.grad(lambda t: umm.ssl_loss(t, ctx, setup.parts)[0]))(theta))
  beta = setup.urun.settings.beta
  expected = beta * np.linalg.norm(js_grad) / np.linalg.norm(ssl_grad)
  np.testing.assert_allclose(float(measured["js_grad_share"]), expected, rtol=1e-4)
  assert 0 < expected < 1


def test_grad_norm_volume_carries_gradient(stage_run):
  # The authors' proxy v_i = log ‖∂L_SSL/∂z_e,i‖: computed inside L_in, so β·JS has a gradient
  # (second order), through f_late and the heads alike (unlike the authors' code, which cut it).
  setup = _setup(stage_run, volume="grad_norm", beta=1.0)
  theta, ctx = _theta_ctx(setup)
  parts = setup.parts

  def js(t):
    return umm.inner_loss(t, ctx, parts)[0] - umm.ssl_loss(t, ctx, parts)[0]

  value, grad = jax.jit(jax.value_and_grad(js))(theta)
  assert 0 < float(value) < np.log(2)
  assert float(otu.tree_norm(grad["backbone"])) > 0 and float(otu.tree_norm(grad["heads"])) > 0


def test_rate_term_orders_rows_view_by_view():
  # 'instance' groups pair row i of view 1 with row i of view 2.
  emb = jax.random.normal(jax.random.key(0), (2, 4, 8))
  parts = umm.Parts(None, None, None, None, {}, umm.Settings(membership="instance"), 1, 1)
  rows = jnp.concatenate([emb[0], emb[1]])
  expected = crr.rate_reduction(rows, crr.instance_membership(4), eps2=0.5).delta
  np.testing.assert_allclose(float(umm.rate_term(emb, parts)), float(expected), rtol=1e-6)


def test_step_with_only_js_lowers_js(stage_run):
  # α = 0 and the look-ahead kept (θ ← θ* − tiny outer step): θ* = θ − η ∇L_in(θ), L_in = L_SSL +
  # β·JS with a large β, so JS at the same views and sketch directions drops. Descent by
  # construction, not by float32 luck: JS's slope along −∇L_in is checked negative, then η is
  # found by backtracking (Armijo's condition on JS itself; f_late is piecewise linear and ∇L_in
  # is mostly ∇L_SSL, so JS rises again past a kink at η ≈ 1e-5 here), and the UMM step with that
  # η must land on the same JS.
  overrides = dict(
    variant="no_rate",
    keep_inner_step=True,
    beta=100.0,
    hypergrad="finite_difference",
    lr=1e-9,
    optimizer="sgd",
    split="layer2",  # the default split
  )
  probe = _setup(stage_run, **overrides)
  key = jax.random.key(3)
  step_key = jax.random.fold_in(key, probe.state.step)  # the views and directions the step draws
  theta, ctx, _ = umm.prepare(probe.state, probe.batch, step_key, probe.parts, probe.views_fn)
  js_fn = jax.jit(lambda t: umm.js_term(t, ctx, probe.parts))
  js, js_grad = jax.jit(jax.value_and_grad(lambda t: umm.js_term(t, ctx, probe.parts)))(theta)
  in_grad = jax.jit(jax.grad(lambda t: umm.inner_loss(t, ctx, probe.parts)[0]))(theta)
  slope = float(otu.tree_vdot(js_grad, in_grad))
  assert slope > 0  # −∇L_in is a descent direction of JS
  js_at = lambda eta: float(js_fn(jax.tree.map(lambda a, g: a - eta * g, theta, in_grad)))
  eta = 1e-3 * float(js) / slope  # a first-order decrease of 1e-3 of JS
  for _ in range(12):
    if js_at(eta) < float(js) - 0.5 * eta * slope:
      break
    eta /= 4
  assert js_at(eta) < float(js) - 0.5 * eta * slope, eta
  setup = _setup(stage_run, **overrides, inner_lr=eta)
  before = setup.measure(setup.state, setup.batch, key)
  new_state, metrics = setup.step(setup.state, setup.batch, key)
  np.testing.assert_allclose(float(metrics["js"]), float(before["js"]), rtol=1e-5)
  np.testing.assert_allclose(float(before["js"]), float(js), rtol=1e-5)  # the same views
  # The step also moves f_late's BatchNorm running statistics (from L_in's train-mode pass), which
  # the JS term reads in inference mode; descent is a statement about θ, so JS is compared at the
  # old statistics.
  old_stats = setup.state.online["backbone"]["batch_stats"]
  backbone = {**new_state.online["backbone"], "batch_stats": old_stats}
  moved = new_state.replace(
    step=setup.state.step, online={**new_state.online, "backbone": backbone}
  )
  after = float(setup.measure(moved, setup.batch, key)["js"])
  np.testing.assert_allclose(after, js_at(eta), rtol=1e-4)
  assert after < float(before["js"])


def test_short_run_raises_delta_r_and_keeps_f_early(stage_run):
  # A large α makes ΔR lead L_out (the stage test runs the default 'implicit' mode).
  setup = _setup(stage_run, alpha=20.0, optimizer="adam", lr=3e-3, hypergrad="finite_difference")
  key = jax.random.key(5)
  state = setup.state
  for _ in range(4):
    state, metrics = setup.step(state, setup.batch, key)
    assert np.isfinite(float(metrics["loss_out"]))
  before = setup.measure(setup.state, setup.batch, key)
  after = setup.measure(state.replace(step=setup.state.step), setup.batch, key)
  assert float(after["delta_r"]) > float(before["delta_r"]) + 1e-3
  split = setup.urun.settings.split
  early_before, late_before = resnet.split_variables(setup.state.online["backbone"], split)
  early_after, late_after = resnet.split_variables(state.online["backbone"], split)
  for a, b in zip(_leaves(early_before), _leaves(early_after), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _max_change(late_before, late_after) > 0


# --- variants and hyper-gradient modes ----------------------------------------------------------


def test_variants_switch_terms_off_and_joint_sums_them(stage_run):
  setup = _setup(stage_run, hypergrad="finite_difference")
  theta, ctx = _theta_ctx(setup)
  full = setup.parts
  variant = lambda name: full._replace(settings=dataclasses.replace(full.settings, variant=name))
  fd = dict(eta=full.settings.inner_lr, args_in=(ctx,), args_out=(ctx,), has_aux_in=True)
  alpha, beta = full.settings.weights

  def separate(t):
    # The single-level loss from its three terms, evaluated side by side (no ordering).
    loss, aux = umm.ssl_loss(t, ctx, full)
    return loss + beta * umm.js_term(t, ctx, full) - alpha * umm.rate_term(aux["embedding"], full)

  @jax.jit
  def grads(theta):
    ssl_in = lambda w, c: umm.ssl_loss(w, c, full)
    ssl_out = lambda w, c: umm.ssl_loss(w, c, full)[0]
    inner = lambda w, c: umm.inner_loss(w, c, full)
    outer = lambda w, c: umm.outer_loss(w, c, full)
    return dict(
      umm=umm.hypergradient(theta, ctx, full).grad,
      no_js=umm.hypergradient(theta, ctx, variant("no_js")).grad,
      no_rate=umm.hypergradient(theta, ctx, variant("no_rate")).grad,
      joint=umm.hypergradient(theta, ctx, variant("joint")).grad,
      ssl_inner=implicit.hypergradient("finite_difference", ssl_in, outer, theta, **fd).grad,
      ssl_outer=implicit.hypergradient("finite_difference", inner, ssl_out, theta, **fd).grad,
      separate=jax.grad(separate)(theta),
    )

  g = grads(theta)
  # β = 0: the hyper-gradient of L_in = L_SSL alone; α = 0: of L_out = L_SSL alone.
  for a, b in zip(_leaves(g["no_js"]), _leaves(g["ssl_inner"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(_leaves(g["no_rate"]), _leaves(g["ssl_outer"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert _max_change(g["umm"], g["no_js"]) > 0 and _max_change(g["umm"], g["no_rate"]) > 0
  # 'joint' is the plain gradient of L_SSL + β·JS − α·ΔR; the ordering of its terms (`_after`)
  # changes neither the value nor the gradient.
  for a, b in zip(_leaves(g["joint"]), _leaves(g["separate"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert umm.Settings(variant="no_js").weights == (1.0, 0.0)
  assert umm.Settings(variant="no_rate", beta=0.3).weights == (0.0, 0.3)


def test_hypergradient_modes_agree_to_first_order(stage_run):
  setup = _setup(stage_run, inner_lr=1e-4, cg_maxiter=10)
  theta, ctx = _theta_ctx(setup)
  s = setup.parts.settings

  @jax.jit
  def grads(theta):
    out = {}
    for mode in implicit.HYPERGRADS:
      parts = setup.parts._replace(settings=dataclasses.replace(s, hypergrad=mode))
      out[mode] = umm.hypergradient(theta, ctx, parts).grad
    out["plain"] = jax.grad(umm.outer_loss)(theta, ctx, setup.parts)
    ssl = dataclasses.replace(s, hypergrad="implicit", hessian="ssl")
    out["implicit_ssl"] = umm.hypergradient(theta, ctx, setup.parts._replace(settings=ssl)).grad
    return out

  g = grads(theta)
  norm = float(otu.tree_norm(g["plain"]))
  diff = lambda a, b: float(otu.tree_norm(otu.tree_sub(g[a], g[b]))) / norm
  # Each mode is ∇L_out(θ) + O(η) (about 0.013 here; 0.15 at η = 1e-3). 'implicit' and 'unrolled'
  # share the O(η) term and differ at O(η²). 'finite_difference' replaces H·v by a central
  # difference over a step of norm 0.01, which across ReLU kinks is not the local H·v: it agrees
  # to first order only.
  first_order = diff("unrolled", "plain")
  assert 0 < first_order < 0.05
  assert diff("implicit", "plain") < 0.05 and diff("finite_difference", "plain") < 0.05
  assert diff("implicit", "unrolled") < 0.1 * first_order
  # hessian='ssl' leaves the JS term's curvature out of the solve: still ∇L_out + O(η), and off
  # the exact 'implicit' by an O(η·β) part of the correction only.
  assert diff("implicit_ssl", "plain") < 0.05
  assert 0 < diff("implicit_ssl", "implicit") < first_order


# --- every method, the interleaved variant -------------------------------------------------------


def _small(hp: dict) -> dict:
  """Shrinks widths, queues and prototype counts as tests/train_test.py does."""
  small = {}
  for key, value in hp.items():
    is_size = isinstance(value, int) and not isinstance(value, bool)
    shrink = key.endswith("_dim") or key in ("num_prototypes", "queue_length", "queue_size")
    small[key] = min(value, 16) if is_size and shrink and value > 0 else value
  return small


def _method_setup(name: str):
  method = methods.get(name)
  hp = _small(dict(method.defaults))
  if name == "wmse":
    hp["proj_output_dim"] = 4  # W-MSE whitens the batch: more rows than dimensions
  model = resnet.create("resnet10", stem="cifar", width=8)
  heads = method.heads(hp)
  ds = data.synthetic("train", num_examples=8, image_size=SIZE, channels=3, num_classes=4, seed=0)
  mean, std = (jnp.asarray(x) for x in ds.channel_stats())
  state = train.init_state(
    jax.random.key(0),
    model=model,
    heads=heads,
    method=method,
    hp=hp,
    tx=optax.sgd(0.1),
    input_shape=(SIZE, SIZE, 3),
    num_classes=4,
    probe_tx=optax.sgd(0.1),
  )
  common = dict(model=model, heads=heads, method=method, hp=hp, probe_tx=optax.sgd(0.1))
  common.update(num_classes=4, image_size=SIZE, mean=mean, std=std, total_steps=10)
  # `index`: each image's row in the data set, which methods with `batch_keys` (BCL-I) read.
  batch = {"image": jnp.asarray(ds.images), "label": jnp.asarray(ds.labels), "index": jnp.arange(8)}
  return method, state, common, batch


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_one_step_of_every_method(name):
  # The single-level variant: every term with its gradient, through each method's heads, target
  # network, queues and local features, at half the compile time of a bi-level step; the
  # hyper-gradient modes are method-agnostic (tested above on SimCLR and in the next test).
  settings = umm.Settings(split="layer3", variant="joint", num_directions=2)
  tx = optax.adam(1e-3)
  method, state, common, batch = _method_setup(name)
  state = umm.init_state(state, tx=tx, split="layer3")
  step = umm.make_umm_step(**common, settings=settings, tx=tx)
  new, metrics = jax.jit(step)(state, batch, jax.random.key(1))
  for key, value in metrics.items():
    assert np.all(np.isfinite(np.asarray(value))), (name, key, value)
  assert int(new.step) == 1
  early_old, late_old = resnet.split_variables(state.online["backbone"], "layer3")
  early_new, late_new = resnet.split_variables(new.online["backbone"], "layer3")
  assert _max_change(early_old, early_new) == 0
  assert _max_change(late_old["params"], late_new["params"]) > 0
  assert jax.tree.structure(new.method_state) == jax.tree.structure(state.method_state)
  assert (new.target is None) == (method.target_momentum is None)
  if new.target is not None:
    assert _max_change(state.target, new.target) > 0  # the EMA follows the online network


def test_interleaved_step_trains_everything_then_theta():
  settings = umm.Settings(
    variant="interleaved", split="layer3", hypergrad="finite_difference", num_directions=2
  )
  ssl_tx, umm_tx = optax.sgd(0.05), optax.adam(1e-3)
  _, state, common, batch = _method_setup("simclr")
  ssl_step = train.make_train_step(**common, tx=ssl_tx)
  umm_step = umm.make_umm_step(**common, settings=settings, tx=umm_tx)
  opt_state = {"ssl": state.opt_state, "umm": umm_tx.init(umm.theta_of(state.online, "layer3"))}
  state = state.replace(opt_state=opt_state)
  step = jax.jit(umm.make_interleaved_step(ssl_step, umm_step))
  new, metrics = step(state, batch, jax.random.key(1))
  assert int(new.step) == 1 and set(new.opt_state) == {"ssl", "umm"}
  assert {"loss", "probe_acc", "umm_loss", "umm_js", "umm_delta_r"} <= set(metrics)
  early_old, _ = resnet.split_variables(state.online["backbone"], "layer3")
  early_new, _ = resnet.split_variables(new.online["backbone"], "layer3")
  assert _max_change(early_old["params"], early_new["params"]) > 0  # the SSL step trains all


# --- CPU thread pool ----------------------------------------------------------------------------


def test_ordered_factorisations_do_not_deadlock_on_two_cores():
  # Two batched Cholesky factorisations with their gradients, as independent branches, hang a
  # 2-thread XLA CPU pool (jaxlib 0.10); `umm._after` orders them, forward and backward.
  script = textwrap.dedent(
    """
    import os
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))
    import jax, jax.numpy as jnp
    from umm_jax import umm

    def logdet(x):
      gram = x @ jnp.swapaxes(x, -1, -2) + jnp.eye(x.shape[-1])
      return jnp.log(jnp.diagonal(jnp.linalg.cholesky(gram), axis1=-2, axis2=-1)).sum()

    def loss(a, b):
      first = logdet(b)
      return first + logdet(umm._after(a, first))

    a = jax.random.normal(jax.random.key(0), (256, 64, 64))
    b = jax.random.normal(jax.random.key(1), (256, 64, 64))
    print(float(jax.jit(jax.grad(loss))(a, b).sum()))
    """
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
