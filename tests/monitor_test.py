"""The layer-wise monitor on a folder of tiny checkpoints: values, ΔR, resume, errors, stages.

The checkpoints are `pretrain.init_state` of `configs/test.py` with per-step noise on the
backbone parameters, written by `checkpoint.Checkpointer` (faster than pre-training).
"""

import functools
import json
import logging
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg

from configs import test as test_config
from umm_jax import augment, checkpoint, crr, data, main, monitor, pretrain, report

STEPS = (4, 8, 12)
LAYERS = ("layer1", "layer4")
MONITOR = dict(
  layers=LAYERS, linear_epochs=3, num_images=32, chunk_size=16, batch_size=32, eval_test_images=48
)
SETTINGS = monitor.Settings(**MONITOR)


def test_settings_from_config_and_bad_settings():
  config = test_config.get_config()
  settings = monitor.Settings.from_config(config)
  assert settings.knn_temperature is None and settings.knn_k == 5  # the config's 0: majority
  assert settings.layers == tuple(config.monitor.layers) and settings.recipe == "simclr"
  config.monitor.knn_temperature = 0.1
  assert monitor.Settings.from_config(config).knn_temperature == 0.1
  with pytest.raises(ValueError, match="Unknown signals \\['accuracy'\\]"):
    monitor.Settings(signals=("accuracy",))


# ----------------------------------------------------------------------------- checkpoints


def _perturbed(state, i: int):
  leaves, tree = jax.tree.flatten(state.online["backbone"]["params"])
  keys = jax.random.split(jax.random.key(i), len(leaves))
  noisy = [x + 0.1 * i * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  backbone = {**state.online["backbone"], "params": jax.tree.unflatten(tree, noisy)}
  return state.replace(online={**state.online, "backbone": backbone})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """`(workdir, config, run, state, train_set, test_set)` with checkpoints at `STEPS`."""
  config = test_config.get_config()
  config.monitor.update(MONITOR)
  train_set, test_set = data.load(config.data, "train"), data.load(config.data, "test")
  run = pretrain.build(config, train_set)
  state = pretrain.init_state(run, jax.random.key(0))
  workdir = tmp_path_factory.mktemp("run")
  with checkpoint.Checkpointer(workdir / pretrain.CHECKPOINT_DIR) as ckpt:
    for i, step in enumerate(STEPS):
      ckpt.save(step, _perturbed(state, i), metadata={"step": step, "epoch": i + 1})
  return workdir, config, run, state, train_set, test_set


@pytest.fixture(scope="module")
def measured(run_dir):
  workdir, _, run, _, train_set, test_set = run_dir
  output = workdir / monitor.MONITOR_FILE
  result = monitor.run(
    workdir / pretrain.CHECKPOINT_DIR,
    run.model,
    train_set,
    test_set,
    image_size=16,
    settings=SETTINGS,
    output=output,
    dataset="synthetic",
  )
  return result, output


def _copy(workdir, tmp_path, *, with_monitor: bool):
  shutil.copytree(workdir / pretrain.CHECKPOINT_DIR, tmp_path / pretrain.CHECKPOINT_DIR)
  if with_monitor:
    shutil.copy(workdir / monitor.MONITOR_FILE, tmp_path / monitor.MONITOR_FILE)
  return tmp_path / pretrain.CHECKPOINT_DIR


def test_every_checkpoint_and_layer_is_measured(measured):
  result, output = measured
  assert json.loads(output.read_text()) == result
  assert list(result["checkpoints"]) == [str(s) for s in STEPS]
  for i, (step, entry) in enumerate(result["checkpoints"].items()):
    assert entry["step"] == int(step) and entry["epoch"] == i + 1
    assert set(entry["seconds"]) == {"features", "knn", "linear", "rate_reduction"}
    assert all(s >= 0 for s in entry["seconds"].values())
    assert set(entry["layers"]) == set(LAYERS)
    for v in entry["layers"].values():
      assert 0 <= v["knn_top1"] <= v["knn_top5"] <= 1
      assert 0 <= v["linear_top1"] <= v["linear_top5"] <= 1
      assert np.isfinite(v["delta"]) and v["rate"] > 0
      np.testing.assert_allclose(v["delta"], v["rate"] - v["compressed"], rtol=1e-5, atol=1e-6)
  protocol = result["protocol"]
  assert protocol["knn"]["k"] == 5 and protocol["knn"]["temperature"] is None
  assert protocol["knn"]["n_train"] == 64 and protocol["knn"]["n_test"] == 48
  assert protocol["linear"]["epochs"] == 3 and protocol["linear"]["lr_end"] == 1e-6
  assert protocol["rate_reduction"]["membership"] == "soft"
  assert protocol["rate_reduction"]["chunk_size"] == 16


def test_rate_reduction_matches_a_direct_computation(run_dir, measured):
  # The monitored ΔR of step 8 against views, forward pass, pooling and chunk mean done by hand.
  workdir, _, run, _, train_set, _ = run_dir
  variables, _ = pretrain.load_backbone(
    checkpoint.Checkpointer(workdir / pretrain.CHECKPOINT_DIR, read_only=True), 8
  )
  mean, std = train_set.channel_stats()
  images = train_set.images[:32]  # one batch of 32 (batch_size), so view key fold_in(key, 0)
  views = augment.two_views(
    jax.random.fold_in(jax.random.key(0), 0), images, recipe="simclr", size=16
  )
  x = ((views["image"] - mean) / std).reshape(64, 16, 16, -1)
  out = jax.jit(functools.partial(run.model.apply, train=False))(variables, x)
  result, _ = measured
  reference = jax.jit(
    lambda z: crr.rate_reduction(z, crr.soft_membership(z, temperature=0.1), eps2=0.5).delta
  )
  for layer in LAYERS:
    z = np.asarray(out[layer]).mean(axis=(1, 2)).reshape(2, 32, -1)
    deltas = []
    for c in range(4):  # chunks of 16 views: both views of 8 consecutive images
      zc = np.concatenate([z[0, 8 * c : 8 * c + 8], z[1, 8 * c : 8 * c + 8]])
      deltas.append(float(reference(jnp.asarray(zc))))
    got = result["checkpoints"]["8"]["layers"][layer]["delta"]
    np.testing.assert_allclose(got, np.mean(deltas), rtol=2e-4, atol=1e-5)


def test_rerun_skips_measured_checkpoints(run_dir, measured, tmp_path, monkeypatch):
  workdir, _, run, state, train_set, test_set = run_dir
  directory = _copy(workdir, tmp_path, with_monitor=True)
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(16, _perturbed(state, 3), metadata={"step": 16, "epoch": 4})
  calls, real = [], monitor.measure
  monkeypatch.setattr(monitor, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
  output = tmp_path / monitor.MONITOR_FILE
  kw = dict(image_size=16, settings=SETTINGS, output=output, dataset="synthetic")
  result = monitor.run(directory, run.model, train_set, test_set, **kw)
  assert len(calls) == 1  # only the new step 16
  assert list(result["checkpoints"]) == ["4", "8", "12", "16"]
  for step in ("4", "8", "12"):
    assert result["checkpoints"][step] == measured[0]["checkpoints"][step]
  assert json.loads(output.read_text()) == result
  monitor.run(directory, run.model, train_set, test_set, **kw)
  assert len(calls) == 1  # everything measured: nothing to do


def test_rerun_under_another_protocol_is_refused(run_dir, measured):
  workdir, _, run, _, train_set, test_set = run_dir
  settings = monitor.Settings(**{**MONITOR, "linear_epochs": 500})
  with pytest.raises(ValueError, match="another protocol .*'linear'.*delete it"):
    monitor.run(
      workdir / pretrain.CHECKPOINT_DIR,
      run.model,
      train_set,
      test_set,
      image_size=16,
      settings=settings,
      output=measured[1],
      dataset="synthetic",
    )


def test_missing_checkpoint_or_directory_is_named(run_dir, tmp_path):
  workdir, _, run, _, train_set, test_set = run_dir
  directory = workdir / pretrain.CHECKPOINT_DIR
  kw = dict(image_size=16, settings=SETTINGS)
  with pytest.raises(ValueError, match=re.escape(f"Missing checkpoint {directory / '99'}")):
    monitor.run(directory, run.model, train_set, test_set, steps=[99], **kw)
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
    monitor.run(tmp_path / "nowhere", run.model, train_set, test_set, **kw)


# orbax's JSON reader leaves an asyncio callback behind when the metadata file is not JSON.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["data", "metadata", "state"])
def test_corrupt_checkpoint_is_named(run_dir, tmp_path, damage):
  workdir, _, run, _, train_set, test_set = run_dir
  directory = _copy(workdir, tmp_path, with_monitor=False)
  step_dir = directory / "8"
  if damage == "data":  # truncated array files
    for f in (step_dir / "state").rglob("d/*"):
      if f.is_file():
        f.write_bytes(b"xx")
  elif damage == "metadata":
    (step_dir / "metadata" / "metadata").write_text("{")
  else:
    shutil.rmtree(step_dir / "state")
  with pytest.raises(ValueError, match=re.escape(f"checkpoint {step_dir} (step 8)")):
    monitor.run(directory, run.model, train_set, test_set, image_size=16, settings=SETTINGS)


# ----------------------------------------------------------------------------- stages


def test_stages_monitor_and_report_on_a_work_dir(run_dir, tmp_path):
  workdir, config, *_ = run_dir
  _copy(workdir, tmp_path, with_monitor=False)
  config = config.copy_and_resolve_references()
  config.stages = ("monitor", "report")
  main.run(config, tmp_path)
  result = json.loads((tmp_path / monitor.MONITOR_FILE).read_text())
  assert result["encoder"] == "checkpoints" and list(result["checkpoints"]) == ["4", "8", "12"]
  text = (tmp_path / report.REPORT_FILE).read_text()
  for heading in ("### layer1", "### layer4", "(Table 11)", "(Table 9)", "Early stopping"):
    assert heading in text
  names = {
    "accuracy.png",
    "rate_reduction.png",
    "accuracy_vs_rate_reduction.png",
    "pearson.png",
    "cost.png",
  }
  assert {p.name for p in (tmp_path / report.PLOTS_DIR).iterdir()} == names
  for name in names:
    assert f"({report.PLOTS_DIR}/{name})" in text
    pixels = mpimg.imread(tmp_path / report.PLOTS_DIR / name)
    assert pixels.shape[:2] == (600, 1000) and pixels.std() > 0


def test_stage_without_checkpoints_measures_the_random_encoder(run_dir, tmp_path, caplog):
  _, config, *_ = run_dir
  with caplog.at_level(logging.WARNING):
    monitor.run_stage(config, tmp_path)
  assert "no checkpoints in" in caplog.text and "randomly initialised encoder" in caplog.text
  result = json.loads((tmp_path / monitor.MONITOR_FILE).read_text())
  assert result["encoder"].startswith("random init (seed 0)")
  assert list(result["checkpoints"]) == ["0"]
  assert set(result["checkpoints"]["0"]["layers"]) == set(LAYERS)


def test_stage_measures_the_checkpoints_of_each_umm_variant(run_dir, measured, tmp_path):
  """UMM checkpoints are `TrainState`s as pre-training's: a copy must measure the same."""
  workdir, config, *_ = run_dir
  _copy(workdir, tmp_path, with_monitor=True)  # pre-training already measured: skipped
  umm_checkpoints = tmp_path / "umm" / "no_js" / pretrain.CHECKPOINT_DIR
  keep = {"12"}
  shutil.copytree(
    workdir / pretrain.CHECKPOINT_DIR,
    umm_checkpoints,
    ignore=lambda d, names: [
      n for n in names if d.endswith(pretrain.CHECKPOINT_DIR) and n not in keep
    ],
  )
  monitor.run_stage(config, tmp_path)
  assert not monitor.umm_output(tmp_path, "umm").exists()
  result = json.loads(monitor.umm_output(tmp_path, "no_js").read_text())
  assert result["encoder"] == "UMM no_js" and list(result["checkpoints"]) == ["12"]
  expected = measured[0]["checkpoints"]["12"]["layers"]
  for layer, values in result["checkpoints"]["12"]["layers"].items():
    for name in ("knn_top1", "linear_top1", "delta"):
      np.testing.assert_allclose(values[name], expected[layer][name], rtol=1e-5, atol=1e-6)
