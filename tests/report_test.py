"""report.md and its plots from hand-made work-dir files (`monitor_test` covers real ones)."""

import importlib
import io
import json
import re

import numpy as np
import pytest
from etils import epath
from fsspec.implementations import memory
from matplotlib import image as mpimg

from configs import test as test_config
from umm_jax import evaluate, monitor, plots, pretrain, report, umm_stage

EPOCHS = [5, 10, 15, 20, 25, 30]
CURVES = {  # layer1 rises and stays; layer4 rises, peaks at epoch 15 and falls (the paper's Fig. 1)
  "layer1": dict(
    knn_top1=[0.40, 0.50, 0.55, 0.56, 0.56, 0.56], delta=[1.0, 1.5, 1.6, 1.6, 1.6, 1.6]
  ),
  "layer4": dict(
    knn_top1=[0.50, 0.70, 0.80, 0.72, 0.70, 0.69], delta=[2.0, 3.0, 3.6, 3.5, 3.1, 3.0]
  ),
}
PLOTS = {"pretrain.png", "accuracy.png", "rate_reduction.png", "pearson.png", "cost.png"}
PLOTS |= {"accuracy_vs_rate_reduction.png"}


def _result(signals=monitor.SIGNALS, epochs=EPOCHS) -> dict:
  settings = monitor.Settings(layers=tuple(CURVES), signals=signals, linear_epochs=500)
  protocol = settings.protocol(dataset="cifar10", image_size=32, n_train=50000, n_test=10000)
  checkpoints = {}
  for i, epoch in enumerate(epochs):
    layers = {}
    for layer, c in CURVES.items():
      v = {}
      if "knn" in signals:
        v.update(knn_top1=c["knn_top1"][i], knn_top5=min(1.0, c["knn_top1"][i] + 0.2))
      if "linear" in signals:
        v.update(linear_top1=c["knn_top1"][i] + 0.05, linear_top5=c["knn_top1"][i] + 0.25)
      if "rate_reduction" in signals:
        v.update(delta=c["delta"][i], rate=c["delta"][i] + 5.0, compressed=5.0)
      layers[layer] = v
    seconds = {"features": 3.0 + (i == 0), "knn": 1.0, "linear": 9.0, "rate_reduction": 0.5}
    if "knn" not in signals:
      seconds = {"rate_reduction": 0.5}
    step = 100 * epoch
    entry = dict(step=step, epoch=epoch, layers=layers, seconds=seconds)
    checkpoints[str(step)] = entry
  return dict(
    protocol=protocol, encoder="checkpoints", checkpoint_dir="/x", checkpoints=checkpoints
  )


def _work_dir(path, result=None, metrics=True):
  (path / report.CONFIG_FILE).write_text(json.dumps(test_config.get_config().to_dict()))
  if result is not None:
    (path / monitor.MONITOR_FILE).write_text(json.dumps(result))
  if metrics:
    lines = []
    for step in range(1, 31):
      lines.append(dict(split="train", step=step, epoch=step / 10, loss=5.0 / step, lr=0.1))
      if step % 10 == 0:
        top1 = 0.3 + step / 100
        lines.append(
          dict(split="test", step=step, epoch=step // 10, probe_top1=top1, probe_top5=0.9)
        )
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (path / pretrain.METRICS_FILE).write_text(text)
  return path


def _check_png(path):
  data = path.read_bytes()  # a local or a bucket path alike
  assert len(data) > 1000
  pixels = mpimg.imread(io.BytesIO(data))
  assert pixels.shape[:2] == (plots.FIGSIZE[1] * plots.DPI, plots.FIGSIZE[0] * plots.DPI)
  assert pixels.std() > 0.01  # not blank


def test_full_report_holds_every_table_and_plot(tmp_path):
  text = report.write(_work_dir(tmp_path, _result())).read_text()
  assert {p.name for p in (tmp_path / report.PLOTS_DIR).iterdir()} == PLOTS
  for name in PLOTS:
    assert f"]({report.PLOTS_DIR}/{name})" in text
    _check_png(tmp_path / report.PLOTS_DIR / name)
  for heading in ("## Pre-training", "### layer1", "### layer4", "### Peaks", "(Table 11)"):
    assert heading in text
  assert "### Early stopping by ΔR" in text and "### Cost of each signal (Table 9)" in text
  # The protocol of every number is stated.
  for protocol in ("k = 5", "vote = majority", "epochs = 500", "lr_end = 1e-06", "eps2 = 0.5"):
    assert protocol in text
  assert "membership = soft" in text and "online linear probe" in text
  # Pearson's r as NumPy computes it (linear top-1 is kNN + 0.05: the same r).
  for layer, c in CURVES.items():
    r = np.corrcoef(c["knn_top1"], c["delta"])[0, 1]
    assert f"| {layer} | {r:.3f} | {r:.3f} |" in text
  # layer4: ΔR and accuracy both peak at epoch 15 (step 1500), which is the label-free choice.
  assert "keep the checkpoint at epoch 15, step 1500, the ΔR peak of the last" in text
  assert (
    "| layer4 | kNN | epoch 15, step 1500 | 80.00 | 80.00 at epoch 15, step 1500 | 0.00 |" in text
  )
  assert "| 1500 | 15 | **80.00** | **85.00** | **3.6000** |" in text  # peaks in bold
  assert "| 1 | 10 | 0.5000 | 40.00 | 90.00 |" in text  # pre-training: epoch, step, loss, probe
  # Cost: the median of the checkpoints after the first (3.0 s), the first one (4.0 s) apart.
  assert "| features | 3 | 4 |" in text and "| knn + features | 4 | 5 | 13.63 |" in text


def test_early_stopping_reports_the_gap_when_the_peaks_differ(tmp_path):
  result = _result()
  result["checkpoints"]["2000"]["layers"]["layer4"]["delta"] = 4.0  # ΔR peaks one save late
  text = report.write(_work_dir(tmp_path, result)).read_text()
  assert "keep the checkpoint at epoch 20, step 2000" in text
  assert "kNN top-1 72.00% there, 8.00 points below the best checkpoint (80.00%" in text


def test_signals_not_measured_leave_their_plots_and_tables_out(tmp_path):
  report.write(_work_dir(tmp_path, _result()))  # every plot, then a rerun that measured less
  text = report.write(_work_dir(tmp_path, _result(signals=("rate_reduction",)))).read_text()
  names = {p.name for p in (tmp_path / report.PLOTS_DIR).iterdir()}
  assert names == {"pretrain.png", "rate_reduction.png", "cost.png"}
  assert "kNN top-1" not in text and "(Table 11)" not in text and "Early stopping" not in text


def test_single_checkpoint_has_no_correlation(tmp_path):
  text = report.write(_work_dir(tmp_path, _result(epochs=[5]))).read_text()
  assert "| layer1 | n/a | n/a |" in text
  for name in PLOTS:
    _check_png(tmp_path / report.PLOTS_DIR / name)


@pytest.mark.parametrize("metrics", [True, False])
def test_missing_files_are_stated(tmp_path, metrics):
  text = report.write(_work_dir(tmp_path, metrics=metrics)).read_text()
  assert f"No `{monitor.MONITOR_FILE}` in the work dir" in text
  if not metrics:
    assert f"No `{pretrain.METRICS_FILE}`" in text
    assert not any((tmp_path / report.PLOTS_DIR).iterdir())
  assert re.search(r"Run: method `simclr`, data `synthetic`, model `resnet10`", text)
  assert "Figure 5" not in text  # no umm/<variant>/monitor.json: no section, no error


def test_evaluation_results_are_tabulated_with_their_protocols(tmp_path):
  knn = dict(top1=0.81, top5=0.97, protocol=dict(evaluation="knn", layer="embedding", k=5))
  linear = dict(top1=0.855, top5=0.99, protocol=dict(evaluation="linear", epochs=500))
  results = {
    "baseline": {"step": 8, "checkpoint": "c/8", "layers": {"embedding": {"knn_k5": knn}}},
    "+UMM": {"step": 4, "checkpoint": "u/4", "layers": {"embedding": {"linear": linear}}},
  }
  (tmp_path / evaluate.RESULTS_FILE).write_text(json.dumps(results))
  text = report.write(_work_dir(tmp_path, metrics=False)).read_text()
  assert "| baseline | 8 | embedding | knn_k5 | 81.00 | 97.00 |" in text
  assert "| +UMM | 4 | embedding | linear | 85.50 | 99.00 |" in text
  assert (
    "- knn_k5: evaluation = knn; k = 5" in text
    and "- linear: evaluation = linear; epochs = 500" in text
  )


def test_variants_are_compared_with_the_baseline_in_table_1_layout(tmp_path):
  def entry(step, knn, linear):
    proto = dict(evaluation="knn", layer="embedding", k=5)
    return {
      "step": step,
      "checkpoint": f"c/{step}",
      "layers": {
        "embedding": {
          "knn_k5": dict(top1=knn, top5=1.0, protocol=proto),
          "linear": dict(top1=linear, top5=1.0, protocol=dict(evaluation="linear")),
        }
      },
    }

  results = {
    "baseline": entry(8, 0.80, 0.85),
    "* (α = 0)": entry(12, 0.7925, 0.86),
    "+UMM": entry(12, 0.8125, 0.8475),
  }
  (tmp_path / evaluate.RESULTS_FILE).write_text(json.dumps(results))
  text = report.write(_work_dir(tmp_path, metrics=False)).read_text()
  assert "| encoder | step | knn_k5 top-1 (%) | linear top-1 (%) |" in text
  assert "| baseline | 8 | 80.00 | 85.00 |" in text
  assert "| * (α = 0) | 12 | 79.25 (-0.75) | 86.00 (+1.00) |" in text
  assert "| +UMM | 12 | 81.25 (+1.25) | 84.75 (-0.25) |" in text
  # One encoder alone has nothing to be compared with.
  (tmp_path / evaluate.RESULTS_FILE).write_text(json.dumps({"baseline": results["baseline"]}))
  assert "Table 1 layout" not in report.write(tmp_path).read_text()


def test_umm_curves_start_from_the_newest_pre_training_checkpoint(tmp_path):
  _work_dir(tmp_path, _result(), metrics=False)  # pre-training: epochs 5 to 30, steps 500 to 3000
  for variant in ("umm", "interleaved"):
    directory = umm_stage.variant_dir(tmp_path, variant)
    directory.mkdir(parents=True)
    (directory / monitor.MONITOR_FILE).write_text(json.dumps(_result(epochs=[1, 2])))
  text = report.write(tmp_path).read_text()
  assert "## Along UMM fine-tuning (Figure 5)" in text and "Layer `layer4`" in text
  assert f"]({report.PLOTS_DIR}/{report.UMM_PNG})" in text
  _check_png(tmp_path / report.PLOTS_DIR / report.UMM_PNG)
  # +UMM epoch 0: layer4 of the pre-training checkpoint at epoch 30 (kNN 0.69, linear 0.74, ΔR 3).
  assert "| +UMM | 0 | 3000 (pre-training) | 69.00 | 74.00 | 3.0000 |" in text
  assert "| +UMM | 1 | 100 | 50.00 | 55.00 | 2.0000 |" in text
  assert "| +UMM | 2 | 200 | 70.00 | 75.00 | 3.0000 |" in text
  # The interleaved variant pre-trains from the initial state: no epoch 0 borrowed for it.
  assert "| & UMM (interleaved) | 0 |" not in text
  assert "| & UMM (interleaved) | 1 | 100 | 50.00 |" in text
  curves = report.umm_curves(tmp_path)
  assert list(curves) == ["umm", "interleaved"] and curves["umm"]["start"]
  np.testing.assert_array_equal(curves["umm"]["epoch"], [0, 1, 2])
  # Without the pre-training monitor the UMM curve starts at its own first checkpoint.
  (tmp_path / monitor.MONITOR_FILE).unlink()
  np.testing.assert_array_equal(report.umm_curves(tmp_path)["umm"]["epoch"], [1, 2])


@pytest.fixture
def memory_bucket(monkeypatch):
  """`gs://` served by fsspec's in-memory file system, as epath reaches it without TensorFlow.

  Yields the file system class; its `store` maps '/bucket/path' to each file written.
  """

  class MemoryBucket(memory.MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]  # this test's own, not the shared memory:// ones

    @classmethod
    def _strip_protocol(cls, path):
      return super()._strip_protocol(str(path).removeprefix("gs://").removeprefix("gcs://"))

  registry = importlib.import_module("fsspec.registry")._registry
  for protocol in MemoryBucket.protocol:  # epath asks fsspec for 'gcs'; undone after the test
    monkeypatch.setitem(registry, protocol, MemoryBucket)
  monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)  # the fsspec backend
  # epath keeps one file system per protocol: drop ours after, and any cached before.
  cached = type(epath.backend.fsspec_backend)._get_filesystem
  cached.cache_clear()
  yield MemoryBucket
  cached.cache_clear()


def test_report_writes_to_a_bucket_work_dir(memory_bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where pathlib's 'gs:/bucket/run' would land
  workdir = epath.Path("gs://bucket/run")
  _work_dir(workdir, _result())
  for variant in ("umm", "interleaved"):
    directory = umm_stage.variant_dir("gs://bucket/run", variant)
    (directory / monitor.MONITOR_FILE).write_text(json.dumps(_result(epochs=[1, 2])))
  knn = dict(top1=0.81, top5=0.97, protocol=dict(evaluation="knn", layer="embedding", k=5))
  results = {"baseline": {"step": 8, "checkpoint": "c/8", "layers": {"embedding": {"knn": knn}}}}
  (workdir / evaluate.RESULTS_FILE).write_text(json.dumps(results))

  path = report.write("gs://bucket/run")
  assert str(path) == f"gs://bucket/run/{report.REPORT_FILE}"
  text = path.read_text()
  assert "# Report: run" in text and "Work dir: `gs://bucket/run`." in text
  for heading in ("## Pre-training", "(Table 11)", "(Figure 5)", "## Evaluation of the last"):
    assert heading in text
  names = {p.name for p in (workdir / report.PLOTS_DIR).iterdir()}
  assert names == PLOTS | {report.UMM_PNG}
  for name in names:
    assert f"]({report.PLOTS_DIR}/{name})" in text
    _check_png(workdir / report.PLOTS_DIR / name)
  written = {f"/bucket/run/{report.PLOTS_DIR}/{name}" for name in names}
  assert written | {f"/bucket/run/{report.REPORT_FILE}"} <= set(memory_bucket.store)
  assert not any(tmp_path.iterdir())  # nothing local: no 'gs:' directory
