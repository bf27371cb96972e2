"""summary.md, summary.json and plots over hand-made work dirs, checked against NumPy."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg

from configs import test as test_config
from umm_jax import aggregate, evaluate, monitor, plots, report, run_groups, umm_stage

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("layer1", "layer4")
PLUS, STAR = "+UMM", "* (α = 0)"


def _monitor(curves: dict) -> dict:
  """`monitor.json` of `{epoch: {layer: (knn_top1, linear_top1, delta)}}`."""
  settings = monitor.Settings(layers=LAYERS, linear_epochs=500)
  protocol = settings.protocol(dataset="cifar10", image_size=32, n_train=100, n_test=50)
  checkpoints = {}
  for epoch, layers in curves.items():
    values = {la: dict(knn_top1=k, linear_top1=li, delta=d) for la, (k, li, d) in layers.items()}
    step = int(10 * epoch)
    checkpoints[str(step)] = dict(step=step, epoch=epoch, layers=values, seconds={})
  return dict(protocol=protocol, encoder="checkpoints", checkpoint_dir="c", checkpoints=checkpoints)


def _evaluation(top1: dict) -> dict:
  """`evaluation.json` of `{encoder: {protocol: top-1}}` at the `embedding` layer."""
  proto = {"knn_k5": dict(evaluation="knn", k=5), "linear": dict(evaluation="linear", epochs=500)}
  return {
    encoder: {
      "step": 8,
      "checkpoint": "c/8",
      "layers": {"embedding": {p: dict(top1=v, top5=1.0, protocol=proto[p]) for p, v in r.items()}},
    }
    for encoder, r in top1.items()
  }


def _workdir(path, *, seed=0, alpha=1.0, method="simclr", evaluation=None, curves=None, umm=None):
  path.mkdir(parents=True)
  config = test_config.get_config()
  config.seed, config.umm.alpha, config.method.name = seed, alpha, method
  (path / report.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
  if evaluation is not None:
    (path / evaluate.RESULTS_FILE).write_text(json.dumps(_evaluation(evaluation)))
  if curves is not None:
    (path / monitor.MONITOR_FILE).write_text(json.dumps(_monitor(curves)))
  for variant, variant_curves in (umm or {}).items():
    directory = umm_stage.variant_dir(path, variant)
    directory.mkdir(parents=True)
    (directory / monitor.MONITOR_FILE).write_text(json.dumps(_monitor(variant_curves)))
  return path


def _stat(values):
  values = np.asarray(values, np.float64)
  return values.mean(), (values.std(ddof=1) if values.size > 1 else None), values.size


def _cell(values, scale=100.0, digits=2, sign=""):
  mean, std, n = _stat(values)
  text = f"{scale * mean:{sign}.{digits}f}"
  return text + (f" ± {scale * std:.{digits}f}" if n > 1 else "") + f" (n = {n})"


def _sweep(tmp_path):
  """Three seeds at α = 1 and one at α = 0.5: groups of unequal size."""
  top1 = {1.0: [0.80, 0.83, 0.78], 0.5: [0.70]}
  dirs = []
  for alpha, values in top1.items():
    for seed, v in enumerate(values):
      evaluation = {"baseline": {"knn_k5": v, "linear": v + 0.05}, PLUS: {"knn_k5": v + 0.01}}
      dirs.append(
        _workdir(tmp_path / f"a{alpha}_s{seed}", seed=seed, alpha=alpha, evaluation=evaluation)
      )
  return dirs, top1


def test_means_stds_and_n_match_numpy_with_groups_of_unequal_size(tmp_path):
  dirs, top1 = _sweep(tmp_path)
  text = aggregate.write(dirs, tmp_path / "out", keys=["umm.alpha"]).read_text()
  groups = json.loads((tmp_path / "out" / aggregate.SUMMARY_JSON).read_text())["groups"]
  assert [g["setting"] for g in groups] == [{"umm.alpha": 0.5}, {"umm.alpha": 1.0}]
  for g in groups:
    values = top1[g["setting"]["umm.alpha"]]
    mean, std, n = _stat(values)
    knn = g["evaluation"]["baseline"]["knn_k5"]
    np.testing.assert_allclose(knn["mean"], mean, rtol=1e-12)
    assert knn["n"] == n and (std is None) == (knn["std"] is None)
    if std is not None:
      np.testing.assert_allclose(knn["std"], std, rtol=1e-12)
    assert knn["workdirs"] == g["workdirs"] and len(g["workdirs"]) == n
    np.testing.assert_allclose(g["evaluation"]["baseline"]["linear"]["mean"], mean + 0.05)
    # The sweep table: one row per α, every protocol of every encoder.
    linear = _cell(np.array(values) + 0.05)
    row = f"| simclr | synthetic | {g['setting']['umm.alpha']} | {_cell(values)} | {linear} |"
    assert row + f" {_cell(np.array(values) + 0.01)} |" in text
  assert "| 70.00 (n = 1) |" in text and "70.00 ±" not in text  # n = 1: no ±
  assert "sample standard deviation (ddof = 1)" in text and "and `umm.alpha` (given)" in text


def test_keys_are_detected_when_not_given_and_seed_is_averaged(tmp_path):
  dirs, _ = _sweep(tmp_path)
  dirs.append(_workdir(tmp_path / "byol", method="byol", evaluation={"baseline": {"knn_k5": 0.5}}))
  config = json.loads((dirs[0] / report.CONFIG_FILE).read_text())
  config["stages"] = ["report"]  # what ran, not how: a rerun of one stage does not split a group
  (dirs[0] / report.CONFIG_FILE).write_text(json.dumps(config))
  runs = run_groups.collect(dirs)
  assert run_groups.grouping_keys(runs) == ["umm.alpha"]  # method.name differs too: always grouped
  groups = run_groups.group(runs, ["umm.alpha"])
  assert [(g.method, g.setting, len(g.runs)) for g in groups] == [
    ("byol", (("umm.alpha", 1.0),), 1),
    ("simclr", (("umm.alpha", 0.5),), 1),
    ("simclr", (("umm.alpha", 1.0),), 3),
  ]
  text = aggregate.write(dirs, tmp_path / "out").read_text()
  assert "and `umm.alpha` (found: the keys whose values differ between runs of one" in text
  summary = json.loads((tmp_path / "out" / aggregate.SUMMARY_JSON).read_text())
  assert summary["group_by"] == ["method.name", "data.name", "umm.alpha"]
  assert summary["keys_detected"]
  # Given keys replace the detected ones: every simclr run in one group, α averaged.
  groups = run_groups.group(runs, run_groups.grouping_keys(runs, ["umm.beta"]))
  assert [len(g.runs) for g in groups] == [1, 4]
  with pytest.raises(ValueError, match="'umm.gamma' is not in .*config.json"):
    run_groups.grouping_keys(runs, ["umm.gamma"])


def test_table_1_cells_and_change_from_the_baseline(tmp_path):
  base = {"knn_k5": [0.80, 0.84], "linear": [0.85, 0.86]}
  plus = {"knn_k5": [0.82, 0.85], "linear": [0.84, 0.88]}
  star = {"knn_k5": [0.79], "linear": [0.86]}  # one run only: its change is paired with that run
  dirs = []
  for seed in range(2):
    evaluation = {"baseline": {p: v[seed] for p, v in base.items()}}
    evaluation[PLUS] = {p: v[seed] for p, v in plus.items()}
    if seed == 0:
      evaluation[STAR] = {p: v[0] for p, v in star.items()}
    dirs.append(_workdir(tmp_path / f"s{seed}", seed=seed, evaluation=evaluation))
  text = aggregate.write(dirs, tmp_path / "out").read_text()
  assert "(paper Table 1 layout)" in text and "Table 10" not in text
  head = "| method | encoder | synthetic: linear top-1 (%) | synthetic: linear change (points) |"
  assert head + " synthetic: 5-NN top-1 (%) | synthetic: 5-NN change (points) |" in text
  assert (
    f"| simclr | baseline | {_cell(base['linear'])} | - | {_cell(base['knn_k5'])} | - |" in text
  )
  for label, values, runs in ((PLUS, plus, 2), (STAR, star, 1)):
    cells = []
    for p in ("linear", "knn_k5"):
      change = np.array(values[p]) - np.array(base[p][:runs])
      cells += [_cell(values[p]), _cell(change, sign="+")]
    assert f"| simclr | {label} | " + " | ".join(cells) + " |" in text
  assert "- linear: evaluation = linear; epochs = 500" in text  # the protocol of each number
  # Table 10 appears once a run has an interleaved or joint encoder.
  (dirs[0] / evaluate.RESULTS_FILE).write_text(
    json.dumps(_evaluation({"baseline": {"linear": 0.85}, "& UMM (interleaved)": {"linear": 0.9}}))
  )
  text = aggregate.write(dirs, tmp_path / "out").read_text()
  assert "(paper Table 10 layout)" in text
  assert f"| simclr | & UMM (interleaved) | 90.00 (n = 1) | {_cell([0.05], sign='+')} |" in text


def test_table_11_pearson_matches_corrcoef(tmp_path):
  rng = np.random.default_rng(0)
  epochs, dirs, rs = [1, 2, 3, 4, 5], [], {"knn": [], "linear": []}
  for seed in range(3):
    knn, linear, delta = rng.uniform(0.1, 1.0, (3, len(epochs)))
    curves = {e: {la: (knn[i], linear[i], delta[i]) for la in LAYERS} for i, e in enumerate(epochs)}
    curves[epochs[0]]["layer1"] = (0.5, 0.5, 0.5)  # only the last layer counts
    dirs.append(_workdir(tmp_path / f"s{seed}", seed=seed, curves=curves))
    rs["knn"].append(np.corrcoef(knn, delta)[0, 1])
    rs["linear"].append(np.corrcoef(linear, delta)[0, 1])
  text = aggregate.write(dirs, tmp_path / "out").read_text()
  pearson = json.loads((tmp_path / "out" / aggregate.SUMMARY_JSON).read_text())["groups"][0]
  for acc, values in rs.items():
    mean, std, n = _stat(values)
    got = pearson["pearson"][acc]
    np.testing.assert_allclose([got["mean"], got["std"]], [mean, std], rtol=1e-9)
    assert got["n"] == n
  cells = " | ".join(_cell(rs[a], scale=1.0, digits=3) for a in ("knn", "linear"))
  assert f"| simclr | {cells} |" in text and "(paper Table 11)" in text
  assert "last monitored layer (`layer4`)" in text


def test_curves_use_only_the_epochs_every_run_has(tmp_path):
  def curve(epochs, offset):
    return {
      e: {la: (0.5 + offset + e / 100, 0.6, 1.0 + e + offset) for la in LAYERS} for e in epochs
    }

  pre = [[1, 2, 3, 4], [2, 4, 6]]
  umm_epochs = [[1, 2], [2]]
  dirs = [
    _workdir(
      tmp_path / f"s{i}", seed=i, curves=curve(pre[i], i), umm={"umm": curve(umm_epochs[i], i)}
    )
    for i in range(2)
  ]
  text = aggregate.write(dirs, tmp_path / "out").read_text()
  curves = json.loads((tmp_path / "out" / aggregate.SUMMARY_JSON).read_text())["groups"][0][
    "curves"
  ]
  layer4 = curves["pretrain"]["layer4"]
  assert layer4["epochs"] == [2, 4] and layer4["left_out_epochs"] == [1, 3, 6] and layer4["n"] == 2
  knn = np.array([[0.5 + i + e / 100 for e in (2, 4)] for i in range(2)])
  np.testing.assert_allclose(layer4["values"]["knn_top1"]["mean"], knn.mean(0))
  np.testing.assert_allclose(layer4["values"]["knn_top1"]["std"], knn.std(0, ddof=1))
  delta = np.array([[1.0 + e + i for e in (2, 4)] for i in range(2)])
  normalized = delta / delta.max(1, keepdims=True)  # per run, over the common epochs
  np.testing.assert_allclose(layer4["values"]["delta/max"]["mean"], normalized.mean(0))
  # UMM epoch 0 is each run's newest pre-training checkpoint (epochs 4 and 6).
  along = curves["umm"]["umm"]
  assert along["epochs"] == [0, 2] and along["left_out_epochs"] == [1]
  start = [1.0 + 4 + 0, 1.0 + 6 + 1]
  np.testing.assert_allclose(along["values"]["delta"]["mean"][0], np.mean(start))
  assert (
    "pre-training layer4: epochs 2, 4, the ones all its 2 runs measured; left out: 1, 3, 6" in text
  )
  assert "UMM +UMM: epochs 0, 2, the ones all its 2 runs measured; left out: 1." in text


def test_plots_are_written_and_linked(tmp_path):
  curves = {e: {la: (0.5 + e / 10, 0.6 + e / 20, 1.0 + e) for la in LAYERS} for e in (1, 2, 3)}
  dirs = [
    _workdir(tmp_path / f"s{i}", seed=i, curves=curves, umm={"umm": curves, "no_rate": curves})
    for i in range(2)
  ]
  text = aggregate.write(dirs, tmp_path / "out").read_text()
  plots_dir = tmp_path / "out" / report.PLOTS_DIR
  assert sorted(p.name for p in plots_dir.iterdir()) == sorted(aggregate.PLOTS)
  for name in aggregate.PLOTS:
    assert f"]({report.PLOTS_DIR}/{name})" in text
    pixels = mpimg.imread(plots_dir / name)
    assert pixels.shape[:2] == (plots.FIGSIZE[1] * plots.DPI, plots.FIGSIZE[0] * plots.DPI)
    assert pixels.std() > 0.01
  # A rerun over runs without curves removes the figures of the first.
  bare = _workdir(tmp_path / "bare", evaluation={"baseline": {"knn_k5": 0.5}})
  text = aggregate.write([bare], tmp_path / "out").read_text()
  assert not any(plots_dir.iterdir()) and "## Curves" not in text and "Table 11" not in text


def test_a_dir_without_config_fails_naming_it(tmp_path):
  good = _workdir(tmp_path / "root" / "a" / "run", evaluation={"baseline": {"knn_k5": 0.5}})
  missing = tmp_path / "not_a_run"
  missing.mkdir()
  with pytest.raises(ValueError, match=re.escape(f"{missing} holds no config.json")):
    run_groups.collect([good, missing])
  assert aggregate.find([tmp_path / "root", good]) == [good, good]
  with pytest.raises(ValueError, match=re.escape(f"{missing}: no config.json in it or below")):
    aggregate.find([missing])


def test_command_line_searches_roots(tmp_path):
  dirs, _ = _sweep(tmp_path / "runs")
  proc = subprocess.run(
    [sys.executable, "-m", "umm_jax.aggregate", f"--out={tmp_path / 'out'}", "--keys=umm.alpha"]
    + [str(tmp_path / "runs")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((tmp_path / "out" / aggregate.SUMMARY_JSON).read_text())
  assert sorted(summary["workdirs"]) == sorted(map(str, dirs))
  assert [len(g["workdirs"]) for g in summary["groups"]] == [1, 3]
