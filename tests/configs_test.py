"""Every `configs/*.py` builds, locks, declares no new key, and passes `umm_jax.main.validate`.

Experiment configs (`configs/<method>_<dataset>.py`) must also document, in their docstring, the
run command with their own file name and the result they are expected to reach. No training here.
"""

import importlib
import pathlib
import re

import ml_collections
import pytest

from configs import default, recipes
from umm_jax import data, main

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
NAMES = sorted(
  p.stem
  for p in CONFIG_DIR.glob("*.py")
  if re.search(r"^def get_config\(", p.read_text(), flags=re.MULTILINE)
)
NON_EXPERIMENTS = {"default", "test", "demo"}
EXPERIMENTS = [name for name in NAMES if name not in NON_EXPERIMENTS]
# Table 8's long-tail experiments run UMM after pre-training (the paper's "X" and "X + UMM" rows).
LONG_TAIL = [f"{m}_{d}_lt" for m in ("simclr", "sdclr", "bcl_i") for d in ("cifar10", "cifar100")]


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  """Dotted paths of every leaf of `config`, recursively."""
  keys = set()
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _keys(value, f"{path}.")
    else:
      keys.add(path)
  return keys


def _load(name: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.{name}").get_config()


def test_discovers_the_configs():
  assert NON_EXPERIMENTS <= set(NAMES)
  assert "recipes" not in NAMES
  assert {"simclr_cifar10", "simclr_imagenet", "byol_imagenet100"} <= set(EXPERIMENTS)
  assert set(LONG_TAIL) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_locks_and_validates(name):
  config = _load(name)
  extra = _keys(config) - _keys(default.get_config())
  assert not extra, f"configs/{name}.py sets keys configs/default.py does not declare: {extra}"
  config.lock()
  with pytest.raises(AttributeError):
    config.train.not_a_key = 1
  main.validate(config)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_docstring_has_run_command_and_expectation(name):
  doc = importlib.import_module(f"configs.{name}").__doc__ or ""
  command = " ".join(doc.replace("\\\n", " ").split())  # shell continuations, wrapped lines
  run = f"python -m umm_jax.main --config=configs/{name}.py --workdir=runs/{name}"
  assert run in command, f"configs/{name}.py's docstring lacks its run command: {run}"
  assert "expect" in doc.lower(), f"configs/{name}.py's docstring does not say what to expect"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_name_matches_method_and_data(name):
  config = _load(name)
  method, _, dataset = name.partition("_")
  while dataset and dataset not in recipes.DATASETS:  # method names may hold "_" (barlow_twins)
    head, _, dataset = dataset.partition("_")
    method = f"{method}_{head}"
  assert config.method.name == method
  assert config.data.name == recipes.DATASETS[dataset].source
  stages = default.get_config().stages
  assert config.stages == (recipes.with_umm(stages) if name in LONG_TAIL else stages)


def test_recipes_reject_unknown_keys_and_names():
  with pytest.raises(ValueError, match="valid"):
    recipes.config("simclr", "mnist")
  with pytest.raises(ValueError, match="valid"):
    recipes.config("mocov3", "imagenet")
  c = default.get_config()
  with pytest.raises(KeyError, match="no key 'lr'"):
    recipes._apply(c.optim, {"lr": 0.1}, "optim")


def test_swav_schedules_follow_the_epochs_of_solo_learn():
  # CIFAR: 50,000 // 256 = 195 steps per epoch, the module's defaults.
  c = recipes.config("swav", "cifar10")
  assert (c.method.swav.queue_start_step, c.method.swav.freeze_prototypes_steps) == (9750, 390)
  c = recipes.config("swav", "imagenet100")
  assert c.method.swav.queue_start_step == 50 * (126_689 // 256)


@pytest.mark.parametrize("name", LONG_TAIL)
def test_long_tail_configs_follow_table_8(name):
  config = _load(name)
  assert config.data.long_tail_ratio == recipes.LONG_TAIL_RATIO == 100
  per_class, classes = (5000, 10) if "cifar10_" in name else (500, 100)
  images = int(data.long_tail_counts(per_class, classes, 100).sum())
  assert images == (12_406 if classes == 10 else 10_847)
  assert (config.train.batch_size, config.train.epochs) == (512, 2000)
  assert config.optim.name == "sgd" and config.optim.base_lr * 512 / 256 == 0.5
  assert config.stages.index("umm") < config.stages.index("evaluate")
  block = config.method[config.method.name]
  assert (block.proj_output_dim, block.temperature) == (128, 0.2)
  if config.method.name in ("sdclr", "bcl_i"):
    assert block.steps_per_epoch == images // 512
  if config.method.name == "bcl_i":
    assert block.num_samples == images


def test_with_umm_inserts_the_stage_once_after_pretraining():
  assert recipes.with_umm(("pretrain", "monitor", "evaluate", "report")) == (
    "pretrain",
    "monitor",
    "umm",
    "evaluate",
    "report",
  )
  assert recipes.with_umm(("pretrain", "umm", "evaluate")) == ("pretrain", "umm", "evaluate")
