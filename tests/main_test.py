"""End-to-end: configs/test.py through the entry point; config validation names bad values."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import default, demo
from configs import test as test_config
from umm_jax import main, methods

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_test_config_runs_end_to_end(tmp_path):
  main.run(test_config.get_config(), tmp_path)
  assert (tmp_path / "metrics.jsonl").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]
  result = json.loads((tmp_path / "monitor.json").read_text())
  assert list(result["checkpoints"]) == ["4", "8"]
  for entry in result["checkpoints"].values():
    assert set(entry["layers"]) == {"layer1", "layer2", "layer3", "layer4"}
    for r in entry["layers"].values():
      assert np.isfinite(r["delta"]) and r["rate"] > 0
      np.testing.assert_allclose(r["delta"], r["rate"] - r["compressed"], rtol=1e-5, atol=1e-6)
      assert 0 <= r["knn_top1"] <= 1 and 0 <= r["linear_top1"] <= 1
  assert set(json.loads((tmp_path / "evaluation.json").read_text())) == {"baseline"}
  assert "| layer" in (tmp_path / "report.md").read_text()
  assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "resnet10"


def test_command_line_rejects_a_mistyped_key(tmp_path):
  # The config is locked: an override of a key that does not exist fails before any stage runs.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "umm_jax.main",
      "--config=configs/test.py",
      f"--workdir={tmp_path}",
      "--config.monitor.chunksize=8",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode != 0
  assert "chunksize" in proc.stderr
  assert not (tmp_path / "monitor.json").exists()


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("stages", ("pretrian",), "Unknown stage 'pretrian'; valid stages: .*'pretrain'"),
    ("optim.name", "lamb", "valid optimizers: \\['adam', 'adamw', 'lars', 'sgd'\\]"),
    ("optim.schedule", "step", "valid schedules: .*'warmup_cosine'"),
    ("train.batch_size", 0, "train.batch_size must be a positive integer, got 0"),
    ("method.name", "simclrr", "valid methods: .*'simclr'"),
    ("data.name", "cifar11", "valid datasets: .*'synthetic'"),
    ("model.name", "resnet19", "resnet18"),
    ("model.dtype", "float8", "valid dtypes: \\['bfloat16', 'float32'\\]"),
    ("umm.split", "layer5", "layer2"),
    ("monitor.membership", "hard", "soft"),
  ],
)
def test_validate_names_the_bad_value_and_the_valid_ones(field, value, match):
  config = test_config.get_config()
  block, _, key = field.rpartition(".")
  setattr(config[block] if block else config, key, value)
  with pytest.raises(ValueError, match=match):
    main.validate(config)


def test_configs_validate_and_declare_every_method():
  for module in (default, demo, test_config):
    main.validate(module.get_config())
  config = default.get_config()
  for name, method in methods.REGISTRY.items():
    assert dict(config.method[name]) == dict(method.defaults)
