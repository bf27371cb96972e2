"""Shared overrides of the experiment configs `configs/<method>_<dataset>.py`.

`config(method, dataset)` is `default.get_config()` with `dataset(c, ...)` (source, input size,
backbone, epochs, batch) and `method(c, ...)` (the method's pre-training recipe for that data set)
applied; each experiment file returns it and documents its run command and expected result.

Where the values come from. Learning rates are per 256 images, scaled by global batch / 256 (as
`umm_jax.optim` and solo-learn do); every recipe warms up for 10 epochs, then decays to 0 on a
cosine, stepped every optimiser step.
- CIFAR-10/100 ("cifar"): vturrisi/solo-learn `scripts/pretrain/cifar/<method>.yaml` (ResNet-18,
  batch 256, 1000 epochs), with solo-learn's scheduler defaults (`solo/methods/base.py`: warm-up
  from 3e-5, `min_lr` 0). solo-learn spares biases and norms from LARS's adaptation and weight
  decay (`exclude_bias_n_norm`) but not from SGD's or Adam's weight decay
  (`exclude_bias_n_norm_wd` defaults to False): hence `exclude_bias_and_norm=False` for those.
- STL-10 and Tiny-ImageNet: solo-learn publishes no recipe, so each method keeps its CIFAR one;
  the data protocol is W-MSE's (htdt/self-supervised README and `datasets/`: 64-px crops, STL-10's
  train+unlabelled for 2000 epochs, Tiny-ImageNet's train for 1000; W-MSE itself with a 128-d
  embedding and whitening sub-batches of 256), whose table has the linear / 5-NN columns on the
  four data sets of the UMM paper's Table 1. W-MSE's ResNet-18 keeps the max-pool after a 3x3
  stride-1 first convolution on these sets; the CIFAR stem here drops it.
- ImageNet-100 ("imagenet100"): solo-learn `scripts/pretrain/imagenet-100/<method>.yaml` (400
  epochs, 2 GPUs x 128 = 256 per step), tuned there for ResNet-18, run here on the paper's
  ResNet-50.
- ImageNet ("imagenet"): SimCLR v1's README pre-training command (google-research/simclr:
  batch 4096, LARS, lr 0.3 x 4096/256, weight decay 1e-6, tau 0.1, 10 warm-up epochs from 0) and
  `lars_optimizer.py` (eta 0.001, no lr clipping), run for 1000 epochs (the README command shows
  100; 1000 is the SimCLR paper's longest schedule and the UMM paper's Table 3); BYOL's 1000-epoch
  preset (google-deepmind/deepmind-research `byol/configs/byol.py`: base lr 0.2, weight decay
  1.5e-6, eta 1e-3, 10 warm-up epochs, batch 4096).
- RELIC v2 and VICRegL have no published recipe at these scales: they take BYOL's and VICReg's
  optimiser settings (`ALIASES`) with their own module defaults for the heads.
- CIFAR-10-LT / CIFAR-100-LT ("cifar_lt", the UMM paper's Table 8): the long-tail subsets of Cao
  et al. 2019 with imbalance ratio 100 (`umm_jax.data.long_tail`; 12,406 and 10,847 images) and
  the recipe of SDCLR's and BCL's CIFAR-LT scripts (VITA-Group/SDCLR
  `cmds/shell_scrips/cifar-10-LT.sh`, MediaBrain-SJTU/BCL `bash_scripts/cifar-LT-BCL.sh`):
  ResNet-18, batch 512, 2000 epochs, SGD with lr 0.5 at batch 512, 10 warm-up epochs then cosine,
  weight decay 1e-4 (SimCLR, SDCLR) or 5e-4 (BCL), τ = 0.2, a 512 → 128 projector. Those
  scripts read fixed index files of their subsets; here the subset is a seeded draw per class.
"""

import dataclasses
from typing import Any

import ml_collections

from configs import default
from umm_jax import data


@dataclasses.dataclass(frozen=True)
class DataSet:
  """How a data set is read, which backbone sees it, and the recipe family its methods follow."""

  source: str  # umm_jax.data.SOURCES name
  image_size: int
  model: str
  stem: str
  epochs: int
  batch_size: int
  train_images: int  # images per pre-training epoch (SwAV's step schedules depend on it)
  family: str  # key of RECIPES
  train_split: str = "train"  # the split pre-training reads
  long_tail_ratio: float = 0.0  # > 0: the long-tail subset of the train split (data.long_tail)


LONG_TAIL_RATIO = 100.0
_LT = dict(long_tail_ratio=LONG_TAIL_RATIO)


def _lt_size(per_class: int, num_classes: int) -> int:
  """Images in the long-tail subset of a balanced set with `per_class` images in each class."""
  return int(data.long_tail_counts(per_class, num_classes, LONG_TAIL_RATIO).sum())


DATASETS = {
  "cifar10": DataSet("cifar10", 32, "resnet18", "cifar", 1000, 256, 50_000, "cifar"),
  "cifar100": DataSet("cifar100", 32, "resnet18", "cifar", 1000, 256, 50_000, "cifar"),
  # 5,000 labelled + 100,000 unlabelled images.
  "stl10": DataSet(
    "stl10", 64, "resnet18", "cifar", 2000, 256, 105_000, "cifar", "train+unlabelled"
  ),
  "tiny_imagenet": DataSet("tiny_imagenet", 64, "resnet18", "cifar", 1000, 256, 100_000, "cifar"),
  "imagenet100": DataSet(
    "imagenet100", 224, "resnet50", "imagenet", 400, 256, 126_689, "imagenet100"
  ),
  "imagenet": DataSet(
    "imagenet2012", 224, "resnet50", "imagenet", 1000, 4096, 1_281_167, "imagenet"
  ),
  # Imbalance ratio 100: class c keeps 5000 · 100^(−c/9) (CIFAR-10) or 500 · 100^(−c/99) images.
  "cifar10_lt": DataSet(
    "cifar10", 32, "resnet18", "cifar", 2000, 512, _lt_size(5000, 10), "cifar_lt", **_LT
  ),
  "cifar100_lt": DataSet(
    "cifar100", 32, "resnet18", "cifar", 2000, 512, _lt_size(500, 100), "cifar_lt", **_LT
  ),
}

# SwAV's queue and prototype freezing, in epochs (solo-learn's epoch_queue_starts and
# freeze_prototypes_epochs); `method` converts them to the steps `umm_jax.methods.swav` counts.
SWAV_QUEUE_START_EPOCHS = 50
SWAV_FREEZE_PROTOTYPES_EPOCHS = 2

# Methods without a published recipe take another method's optimiser settings.
ALIASES = {"relic_v2": "byol", "vicregl": "vicreg"}


def _lars(base_lr: float, weight_decay: float) -> dict[str, Any]:
  """solo-learn's LARS: eta 0.02, lr clipping, biases and norms excluded; warm-up from 3e-5."""
  return dict(
    name="lars",
    base_lr=base_lr,
    weight_decay=weight_decay,
    lars_eta=0.02,
    lars_clip=True,
    exclude_bias_and_norm=True,
    warmup_epochs=10,
    warmup_start_lr=3e-5,
  )


def _sgd(base_lr: float, weight_decay: float) -> dict[str, Any]:
  """solo-learn's SGD (momentum 0.9): weight decay on every parameter; warm-up from 3e-5."""
  return dict(
    name="sgd",
    base_lr=base_lr,
    weight_decay=weight_decay,
    momentum=0.9,
    exclude_bias_and_norm=False,
    warmup_epochs=10,
    warmup_start_lr=3e-5,
  )


def _adam(base_lr: float, weight_decay: float) -> dict[str, Any]:
  """solo-learn's W-MSE optimiser: Adam, L2 weight decay on every parameter; warm-up from 0."""
  return dict(
    name="adam",
    base_lr=base_lr,
    weight_decay=weight_decay,
    exclude_bias_and_norm=False,
    warmup_epochs=10,
    warmup_start_lr=0.0,
  )


def _large_batch_lars(base_lr: float, weight_decay: float) -> dict[str, Any]:
  """SimCLR's and BYOL's ImageNet LARS: eta 0.001, no lr clipping; warm-up from 0."""
  return dict(
    name="lars",
    base_lr=base_lr,
    weight_decay=weight_decay,
    lars_eta=0.001,
    lars_clip=False,
    exclude_bias_and_norm=True,
    warmup_epochs=10,
    warmup_start_lr=0.0,
  )


# SimCLR's heads and temperature in SDCLR's and BCL's CIFAR-LT scripts.
_LT_SIMCLR = dict(proj_hidden_dim=512, proj_output_dim=128, temperature=0.2)

# family -> method -> {"optim": ..., "method": ..., "train": ...} overrides of the config blocks.
RECIPES: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
  "cifar": {
    "simclr": dict(
      optim=_lars(0.4, 1e-4),
      method=dict(proj_hidden_dim=2048, proj_output_dim=256, temperature=0.2),
    ),
    "byol": dict(
      optim=_lars(1.0, 1e-5),
      method=dict(proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096),
    ),
    "barlow_twins": dict(
      optim=_lars(0.3, 1e-4),
      method=dict(proj_hidden_dim=2048, proj_output_dim=2048, scale_loss=0.1),
    ),
    "mocov2": dict(
      optim=_sgd(0.3, 1e-4),
      method=dict(proj_hidden_dim=2048, proj_output_dim=256, queue_size=32768, temperature=0.2),
      train=dict(probe_lr=0.3),  # solo-learn's classifier_lr; its probe is SGD, as here
    ),
    "mocov3": dict(
      optim=_lars(0.3, 1e-6),
      method=dict(proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096, temperature=0.2),
    ),
    "simsiam": dict(
      optim=_sgd(0.5, 1e-5),
      method=dict(proj_hidden_dim=2048, proj_output_dim=2048, pred_hidden_dim=512),
    ),
    "swav": dict(
      optim=_lars(0.6, 1e-6),
      method=dict(
        proj_hidden_dim=2048,
        proj_output_dim=128,
        num_prototypes=3000,
        queue_size=3840,
        temperature=0.1,
      ),
    ),
    "vicreg": dict(
      optim=_lars(0.3, 1e-4),
      method=dict(
        proj_hidden_dim=2048, proj_output_dim=2048, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0
      ),
    ),
    "wmse": dict(
      optim=_adam(2e-3, 1e-6),
      method=dict(proj_hidden_dim=1024, proj_output_dim=64, w_size=128),
    ),
  },
  "imagenet100": {
    "simclr": dict(
      optim=_lars(0.3, 1e-4),
      method=dict(proj_hidden_dim=4096, proj_output_dim=512, temperature=0.2),
    ),
    "byol": dict(
      optim=_lars(0.5, 1e-6),
      method=dict(proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=8192),
    ),
    "barlow_twins": dict(
      optim=_lars(0.3, 1e-4),
      method=dict(proj_hidden_dim=2048, proj_output_dim=2048, scale_loss=0.1),
    ),
    "mocov2": dict(
      optim=_sgd(0.3, 1e-4),
      method=dict(proj_hidden_dim=2048, proj_output_dim=256, queue_size=65536, temperature=0.2),
      train=dict(probe_lr=0.3),
    ),
    "mocov3": dict(
      optim=_lars(0.3, 1e-6),
      method=dict(proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096, temperature=0.2),
    ),
    "simsiam": dict(
      optim=_sgd(0.5, 1e-5),
      method=dict(proj_hidden_dim=2048, proj_output_dim=2048, pred_hidden_dim=512),
    ),
    "swav": dict(
      optim=_lars(0.6, 1e-6),
      method=dict(
        proj_hidden_dim=2048,
        proj_output_dim=128,
        num_prototypes=3000,
        queue_size=3840,
        temperature=0.1,
      ),
    ),
    "vicreg": dict(
      optim=_lars(0.3, 1e-4),
      method=dict(
        proj_hidden_dim=2048, proj_output_dim=2048, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0
      ),
    ),
    "wmse": dict(
      optim=_adam(2e-3, 1e-6),
      method=dict(proj_hidden_dim=1024, proj_output_dim=64, w_size=128),
    ),
  },
  "cifar_lt": {
    "simclr": dict(optim=_sgd(0.25, 1e-4), method=dict(_LT_SIMCLR)),
    "sdclr": dict(optim=_sgd(0.25, 1e-4), method=dict(_LT_SIMCLR, prune_ratio=0.9)),
    "bcl_i": dict(optim=_sgd(0.25, 5e-4), method=dict(_LT_SIMCLR, momentum=0.95)),
  },
  "imagenet": {
    "simclr": dict(
      optim=_large_batch_lars(0.3, 1e-6),
      method=dict(proj_hidden_dim=2048, proj_output_dim=128, temperature=0.1),
    ),
    "byol": dict(
      optim=_large_batch_lars(0.2, 1.5e-6),
      method=dict(proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096),
    ),
  },
}

# (method, data set) -> overrides beyond the family recipe: W-MSE's README settings for STL-10
# and Tiny-ImageNet (lr 2e-3 as in the CIFAR recipe).
DATASET_OVERRIDES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
  ("wmse", "stl10"): dict(method=dict(proj_output_dim=128, w_size=256)),
  ("wmse", "tiny_imagenet"): dict(method=dict(proj_output_dim=128, w_size=256)),
}


def _get(table: dict, key, what: str):
  if key not in table:
    raise ValueError(f"No {what} {key!r}; valid: {sorted(table)}")
  return table[key]


def dataset(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets the data source, input size, backbone, epochs and global batch of data set `name`."""
  spec = _get(DATASETS, name, "data set")
  c.data.name = spec.source
  c.data.image_size = spec.image_size
  c.model.name = spec.model
  c.model.stem = spec.stem
  c.train.epochs = spec.epochs
  c.train.batch_size = spec.batch_size
  c.train.split = spec.train_split
  c.data.long_tail_ratio = spec.long_tail_ratio


def _apply(block: ml_collections.ConfigDict, overrides: dict[str, Any], where: str) -> None:
  """Overrides existing keys only: a key default.py does not declare is a typo here."""
  for key, value in overrides.items():
    if key not in block:
      raise KeyError(f"config.{where} has no key {key!r}; declared: {sorted(block)}")
    block[key] = value


def method(c: ml_collections.ConfigDict, name: str, dataset_name: str) -> None:
  """Sets method `name` and its recipe for `dataset_name` (the batch must already be set)."""
  spec = _get(DATASETS, dataset_name, "data set")
  family = RECIPES[spec.family]
  recipe = _get(family, ALIASES.get(name, name), f"{spec.family} recipe for")
  c.method.name = name
  _apply(c.optim, recipe["optim"], "optim")
  _apply(c.train, recipe.get("train", {}), "train")
  if name not in ALIASES:  # an alias lends its optimiser, not its heads
    _apply(c.method[name], recipe.get("method", {}), f"method.{name}")
  extra = DATASET_OVERRIDES.get((name, dataset_name), {})
  _apply(c.method[name], extra.get("method", {}), f"method.{name}")
  steps_per_epoch = spec.train_images // c.train.batch_size
  if name == "swav":
    c.method.swav.queue_start_step = SWAV_QUEUE_START_EPOCHS * steps_per_epoch
    c.method.swav.freeze_prototypes_steps = SWAV_FREEZE_PROTOTYPES_EPOCHS * steps_per_epoch
  if name in ("sdclr", "bcl_i"):  # the pruning mask and the memorization weights are per epoch
    c.method[name].steps_per_epoch = steps_per_epoch
  if name == "bcl_i":  # one memorization score per training image
    c.method.bcl_i.num_samples = spec.train_images


def with_umm(stages: tuple[str, ...]) -> tuple[str, ...]:
  """`stages` with 'umm' after pre-training and the monitor, so that the evaluate and report
  stages compare the pre-trained encoder with the UMM one (the paper's "X" and "X + UMM")."""
  first = tuple(s for s in stages if s in ("pretrain", "monitor"))
  return (*first, "umm", *(s for s in stages if s not in first and s != "umm"))


def config(method_name: str, dataset_name: str) -> ml_collections.ConfigDict:
  """`default.get_config()` with `dataset` and `method` applied; stages as default.py's."""
  c = default.get_config()
  dataset(c, dataset_name)
  method(c, method_name, dataset_name)
  return c
