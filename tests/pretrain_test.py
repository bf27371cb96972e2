"""The pre-training loop: checkpoints and metrics in the work dir, resume, the NaN guard."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import test as test_config
from umm_jax import checkpoint, data, parallel, pretrain


def _params(state):
  return jax.tree.leaves(jax.device_get(state.online))


def _config(**train):
  config = test_config.get_config()
  config.train.update(train)
  return config


def _records(workdir):
  return [json.loads(line) for line in (workdir / pretrain.METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, pretrain.pretrain(_config(), workdir)


def test_writes_checkpoints_and_metrics(uninterrupted):
  workdir, state = uninterrupted
  config = _config()
  steps = data.steps_per_epoch(config.data.synthetic.num_examples, config.train.batch_size)
  ckpt = checkpoint.Checkpointer(workdir / pretrain.CHECKPOINT_DIR, read_only=True)
  assert ckpt.all_steps() == [steps, 2 * steps]  # one per epoch (checkpoint_every_epochs = 1)
  assert int(state.step) == 2 * steps
  assert ckpt.metadata(2 * steps)["epoch"] == 2
  records = _records(workdir)
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == list(range(2, 2 * steps + 1, 2))  # every log_every_steps = 2
  for r in records:
    assert all(np.isfinite(v) for v in r.values() if isinstance(v, float)), r
  tests = [r for r in records if r["split"] == "test"]
  assert [r["epoch"] for r in tests] == [1, 2]
  assert all(0 <= r["probe_top1"] <= r["probe_top5"] <= 1 for r in tests)
  # The learning rate follows the warm-up: 0 at the first update, the peak after one epoch.
  first = records[0]
  peak = config.optim.base_lr * config.train.batch_size / 256
  np.testing.assert_allclose(first["lr"], peak * 1 / steps, rtol=1e-5)


def test_interrupted_run_resumes_to_the_same_parameters(uninterrupted, tmp_path, monkeypatch):
  # SIGTERM while the 6th batch is put on the devices (mid-epoch 2): the loop finishes step 6,
  # saves it and stops; rerunning the same command resumes there and must end where the
  # uninterrupted run ended. (The host batches come from a prefetch thread, so the signal is
  # sent from the main thread, where the loop assembles each global batch: two calls a step.)
  _, reference = uninterrupted
  real_global_batch = parallel.global_batch
  calls = []

  def global_batch_then_sigterm(local, mesh):
    calls.append(1)
    if len(calls) == 11:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_global_batch(local, mesh)

  monkeypatch.setattr(parallel, "global_batch", global_batch_then_sigterm)
  with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
    pretrain.pretrain(_config(), tmp_path)
  monkeypatch.setattr(parallel, "global_batch", real_global_batch)
  ckpt = checkpoint.Checkpointer(tmp_path / pretrain.CHECKPOINT_DIR, read_only=True)
  assert ckpt.all_steps() == [4, 6]
  assert ckpt.metadata(6)["interrupted_by"] == "SIGTERM"
  resumed = pretrain.pretrain(_config(), tmp_path)
  for a, b in zip(_params(reference), _params(resumed), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The metrics log has each step once, as if the run had not stopped.
  records = _records(tmp_path)
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]
  assert [r["epoch"] for r in records if r["split"] == "test"] == [1, 2]


def test_nan_guard_stops_before_saving(tmp_path):
  config = _config()
  config.optim.base_lr = float("nan")
  with pytest.raises(FloatingPointError, match="non-finite .*loss.* at step 2"):
    pretrain.pretrain(config, tmp_path)
  ckpt = checkpoint.Checkpointer(tmp_path / pretrain.CHECKPOINT_DIR, read_only=True)
  assert ckpt.all_steps() == []


def test_bcl_i_reads_each_images_index_and_checks_the_data_sizes(tmp_path):
  # BCL-I tracks a memorization score per training image, so the loop must pass the images'
  # rows as `index`: after one epoch over the 64 images, every one of them has been seen once.
  config = _config(epochs=1, checkpoint_every_epochs=1)
  config.method.name = "bcl_i"
  config.method.bcl_i.update(proj_hidden_dim=32, proj_output_dim=16, num_samples=64)
  with pytest.raises(ValueError, match="bcl_i.steps_per_epoch = 195, but the training set gives 4"):
    pretrain.pretrain(config, tmp_path)
  config.method.bcl_i.steps_per_epoch = 4
  state = pretrain.pretrain(config, tmp_path)
  scores = jax.device_get(state.method_state)
  assert scores["seen"].all() and int(scores["step"]) == 4
  assert np.all(scores["momentum"] > 0)  # each image's NT-Xent loss, averaged in
