"""The config schema: every key the project reads, with its default.

Experiment configs (`configs/<method>_<dataset>.py`) start from `get_config()` here and
override values; `umm_jax.main` locks the result, so a mistyped `--config.x=...` fails.
"""

import ml_collections

from umm_jax import methods


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of every random key: the run is a deterministic function of it
  # Stages run in order by `python -m umm_jax.main` (valid names: umm_jax.main.STAGES).
  c.stages = ("monitor",)

  # Data: source name (umm_jax.data.SOURCES), model input size, IDX directory for the full set.
  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist_embedded"
  c.data.image_size = 32
  c.data.data_dir = ""
  # Synthetic source: class-structured random images (tests, quick runs).
  c.data.synthetic = ml_collections.ConfigDict(
    dict(num_examples=256, image_size=32, channels=3, num_classes=10, seed=0)
  )

  # Backbone: umm_jax.models.resnet names, stem 'cifar' or 'imagenet', base width, compute dtype.
  c.model = ml_collections.ConfigDict(
    dict(name="resnet18", stem="cifar", width=64, dtype="float32")
  )

  # SSL method: `name` picks one; one block of hyper-parameters per registered method, with
  # the defaults its module declares (e.g. --config.method.simclr.temperature=0.2).
  c.method = ml_collections.ConfigDict()
  c.method.name = "simclr"
  for name, method in methods.REGISTRY.items():
    c.method[name] = ml_collections.ConfigDict(dict(method.defaults))

  # Layer-wise monitor: label-free ΔR (umm_jax.crr) of the pooled features of each layer on two
  # augmented views of `num_images` training images, in chunks of `chunk_size` views.
  c.monitor = ml_collections.ConfigDict(
    dict(
      layers=("layer1", "layer2", "layer3", "layer4"),
      num_images=1024,
      chunk_size=512,
      eps2=0.5,  # ε² of the coding rate
      membership="soft",  # umm_jax.crr membership kind for label-free ΔR
      temperature=0.1,  # τ of the soft membership
      batch_size=256,  # images per forward pass when extracting features
    )
  )

  # UMM: the encoder is split after `split` (f_early frozen, the later stages tuned).
  c.umm = ml_collections.ConfigDict(dict(split="layer2"))
  return c
