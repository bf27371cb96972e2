"""Work dirs on an object store: every stage's output lands under `gs://...`, never locally.

Without network, fsspec's in-memory file system stands in for Google Cloud Storage: etils'
`epath` reaches `gs://` through fsspec when TensorFlow is not importable, and the test registers
the memory file system (its own store per test, appends refused as an object store refuses
them) for the `gs` and `gcs` protocols. Orbax's array data goes to `gs://` through TensorStore's
own GCS driver, which this cannot stand in for, so checkpoints here are local (or, for the
listing, an empty remote directory).
"""

import json
import pathlib
import struct
import time

import fsspec
import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend
from fsspec.implementations import memory
from fsspec.registry import _registry as fsspec_registry  # fsspec has no unregister
from tensorboardX.proto import event_pb2

from configs import test as test_config
from umm_jax import checkpoint, data, evaluate, export, main, monitor, pretrain, report, umm_stage

WORKDIR = "gs://bucket/run"
_PROTOCOLS = ("gs", "gcs")  # epath asks fsspec for 'gcs'; paths say 'gs'


class _MemoryGcs(memory.MemoryFileSystem):
  """fsspec's memory file system under `gs://`, without appends (GCS objects are immutable)."""

  protocol = _PROTOCOLS

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for name in _PROTOCOLS:
      path = path.removeprefix(f"{name}://")
    return super()._strip_protocol(path)

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"{path}: an object store cannot append")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  """`gs://` in memory for this test, run from an empty cwd; the registry is restored after."""
  monkeypatch.chdir(tmp_path)
  fs_class = type("MemoryGcs", (_MemoryGcs,), {"store": {}, "pseudo_dirs": [""]})
  previous = {name: fsspec_registry.get(name) for name in _PROTOCOLS}
  for name in _PROTOCOLS:
    fsspec.register_implementation(name, fs_class, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the file system
  yield fs_class
  for name, cls in previous.items():
    if cls is None:
      del fsspec_registry[name]
    else:
      fsspec.register_implementation(name, cls, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()


def _assert_nothing_local(fs_class):
  """No local `gs:` directory (what `pathlib.Path('gs://...')` writes into) and no `.tmp` left."""
  assert not pathlib.Path("gs:").exists() and not pathlib.Path("gs").exists()
  assert not [p for p in fs_class.store if p.endswith(".tmp")]


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
  """`(config, checkpoint dir)`: a random `configs/test.py` encoder, saved locally as step 4.

  Readers of checkpoints read `state.online['backbone']` only, so that is all it holds; its
  values are uniform in [0.5, 1.5] (no compiled `init`: only the files written matter here).
  """
  config = test_config.get_config()
  config.evaluate.layers = ("embedding",)
  config.evaluate.protocols = ("knn_k5",)
  images = data.load(config.data, "train").images[:1]
  model = pretrain.create_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images / 255.0, train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)
  directory = tmp_path_factory.mktemp("run") / pretrain.CHECKPOINT_DIR
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(4, {"online": {"backbone": variables}}, metadata={"epoch": 1})
  return config, directory


def test_paths_under_a_uri_keep_their_scheme(gcs):
  assert str(umm_stage.variant_dir(WORKDIR, "no_js")) == f"{WORKDIR}/umm/no_js"
  assert str(monitor.umm_output(WORKDIR, "umm")) == f"{WORKDIR}/umm/umm/{monitor.MONITOR_FILE}"
  workdir = epath.Path(WORKDIR)
  for sub in ("checkpoints/4", "umm/no_rate/checkpoints/8", "umm/joint"):
    (workdir / sub).mkdir(parents=True)
  found = {name: str(path) for name, path in umm_stage.encoders(WORKDIR).items()}
  assert found == {
    "baseline": f"{WORKDIR}/checkpoints",
    "* (α = 0)": f"{WORKDIR}/umm/no_rate/checkpoints",
  }
  assert export.sources(WORKDIR) == ["checkpoints", "umm/no_rate/checkpoints"]
  _assert_nothing_local(gcs)


def test_checkpointer_gives_orbax_the_uri_unchanged(gcs):
  # orbax lists steps through epath (here the memory store); saving needs TensorStore's GCS.
  for directory in (f"{WORKDIR}/checkpoints", epath.Path(WORKDIR) / "checkpoints"):
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
      assert ckpt.directory == f"{WORKDIR}/checkpoints" and ckpt.all_steps() == []
  _assert_nothing_local(gcs)


def _scalars(events: bytes) -> dict[str, list[tuple[int, float]]]:
  """`{tag: [(step, value)]}` of a TensorBoard events file (TFRecord framing, CRCs skipped)."""
  out, offset = {}, 0
  while offset < len(events):
    (length,) = struct.unpack("<Q", events[offset : offset + 8])
    event = event_pb2.Event.FromString(events[offset + 12 : offset + 12 + length])
    offset += 16 + length
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def _log_two_sessions(workdir) -> None:
  """Three records, then a resume from step 4 that rewrites step 6 and adds a test record."""
  with pretrain.MetricsLog(workdir, resume_step=0) as log:
    for step, loss in ((2, 1.5), (4, 1.25), (6, 1.0)):
      log.write("train", {"step": step, "loss": loss})
  time.sleep(1.01 - time.time() % 1)  # events files are named by the second they were opened in
  with pretrain.MetricsLog(workdir, resume_step=4) as log:
    log.write("train", {"step": 6, "loss": 0.5})
    log.write("test", {"step": 6, "probe_top1": 0.25})


def test_metrics_log_rewrites_its_files_on_an_object_store(gcs, tmp_path):
  _log_two_sessions(WORKDIR)
  workdir = epath.Path(WORKDIR)
  text = (workdir / pretrain.METRICS_FILE).read_text()
  assert [json.loads(line) for line in text.splitlines()] == [
    {"split": "train", "step": 2, "loss": 1.5},
    {"split": "train", "step": 4, "loss": 1.25},
    {"split": "train", "step": 6, "loss": 0.5},
    {"split": "test", "step": 6, "probe_top1": 0.25},
  ]
  _log_two_sessions(tmp_path / "local")  # appended to: the same bytes
  assert (tmp_path / "local" / pretrain.METRICS_FILE).read_text() == text
  # One events file per session, uploaded whole; the resumed one purges the steps after 4.
  events = sorted((workdir / pretrain.TENSORBOARD_DIR).iterdir())
  assert len(events) == 2
  first, resumed = (_scalars(path.read_bytes()) for path in events)
  assert first == {"train/loss": [(2, 1.5), (4, 1.25), (6, 1.0)]}
  assert resumed == {"train/loss": [(6, 0.5)], "test/probe_top1": [(6, 0.25)]}
  _assert_nothing_local(gcs)


def test_main_writes_config_evaluation_and_report_under_a_uri(gcs, local_checkpoint, monkeypatch):
  config, directory = local_checkpoint
  config = config.copy_and_resolve_references()
  config.stages = ("evaluate", "report")
  # Stands in for the remote checkpoints, which orbax would read through TensorStore's GCS.
  monkeypatch.setattr(umm_stage, "encoders", lambda workdir: {"baseline": directory})
  main.run(config, WORKDIR)
  workdir = epath.Path(WORKDIR)
  assert json.loads((workdir / "config.json").read_text()) == json.loads(
    json.dumps(config.to_dict(), default=str)
  )
  result = json.loads((workdir / evaluate.RESULTS_FILE).read_text())
  assert result["baseline"]["step"] == 4
  assert set(result["baseline"]["layers"]["embedding"]) == {"knn_k5"}
  assert "knn_k5" in (workdir / report.REPORT_FILE).read_text()
  _assert_nothing_local(gcs)


def test_monitor_writes_and_resumes_its_json_under_a_uri(gcs, local_checkpoint, monkeypatch):
  config, directory = local_checkpoint
  train_set, test_set = data.load(config.data, "train"), data.load(config.data, "test")
  settings = monitor.Settings(layers=("layer1",), signals=("knn",), batch_size=32)
  args = (directory, pretrain.create_model(config), train_set, test_set)
  output = f"{WORKDIR}/{monitor.MONITOR_FILE}"
  first = monitor.run(*args, image_size=16, settings=settings, output=output)
  assert json.loads(epath.Path(output).read_text()) == first
  assert list(first["checkpoints"]) == ["4"]

  def measure(*args, **kwargs):
    raise AssertionError("step 4 is in the remote monitor.json: nothing to measure")

  monkeypatch.setattr(monitor, "measure", measure)
  assert monitor.run(*args, image_size=16, settings=settings, output=output) == first
  _assert_nothing_local(gcs)
