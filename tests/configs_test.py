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
from umm_jax import main

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
NAMES = sorted(
  p.stem
  for p in CONFIG_DIR.glob("*.py")
  if re.search(r"^def get_config\(", p.read_text(), flags=re.MULTILINE)
)
NON_EXPERIMENTS = {"default", "test", "demo"}
EXPERIMENTS = [name for name in NAMES if name not in NON_EXPERIMENTS]


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
  assert config.stages == default.get_config().stages


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
