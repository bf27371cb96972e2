"""Image sources as uint8 arrays: the embedded Fashion-MNIST subset, IDX files, synthetic data.

Every source returns a `Dataset` of `images` `[N, H, W, C]` uint8 and `labels` `[N]` int32.
Augmentation and normalisation happen later, on device (`umm_jax.augment`, `umm_jax.train`).
"""

import gzip
import pathlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
EMBEDDED_FILE = "fashion_mnist_subset.npz"
SPLITS = ("train", "test")
FASHION_MNIST_CLASSES = (
  "t-shirt/top",
  "trouser",
  "pullover",
  "dress",
  "coat",
  "sandal",
  "shirt",
  "sneaker",
  "bag",
  "ankle boot",
)
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_HOW_TO_GET_IDX = (
  "Get the Fashion-MNIST IDX files with `sudo apt-get install dataset-fashion-mnist` "
  "(Debian/Ubuntu; files in /usr/share/datasets/fashion-mnist) or from "
  "https://github.com/zalandoresearch/fashion-mnist (data/fashion), and set "
  "--config.data.data_dir to their directory."
)


class Dataset(NamedTuple):
  """One split of a data set.

  Attributes:
    images: `[N, H, W, C]` uint8.
    labels: `[N]` int32 class indices.
    num_classes: number of classes.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int

  def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std `[C]` of the images scaled to [0, 1]."""
    x = self.images.reshape(-1, self.images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(axis=0).astype(np.float32), x.std(axis=0).astype(np.float32)


def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """Reads an IDX file (optionally gzipped): the format of the MNIST-family data sets."""
  path = pathlib.Path(path)
  raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (header {raw[:4]!r})")
  ndim = raw[3]
  shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
  values = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
  if values.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says shape {shape} but holds {values.size} values")
  return values.reshape(shape)


def _find_idx(idx_dir: pathlib.Path, stem: str) -> pathlib.Path:
  for name in (f"{stem}.gz", stem):
    if (idx_dir / name).is_file():
      return idx_dir / name
  raise FileNotFoundError(f"{idx_dir} has no {stem}(.gz). {_HOW_TO_GET_IDX}")


def load_idx_split(idx_dir: str | pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Images `[N, 28, 28]` uint8 and labels `[N]` uint8 of one split from IDX files in `idx_dir`."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits: {SPLITS}")
  idx_dir = pathlib.Path(idx_dir)
  if not idx_dir.is_dir():
    raise FileNotFoundError(f"IDX directory {str(idx_dir)!r} does not exist. {_HOW_TO_GET_IDX}")
  prefix = _IDX_PREFIX[split]
  images = read_idx(_find_idx(idx_dir, f"{prefix}-images-idx3-ubyte"))
  labels = read_idx(_find_idx(idx_dir, f"{prefix}-labels-idx1-ubyte"))
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{idx_dir}: {images.shape[0]} images but {labels.shape[0]} labels")
  return images, labels


def _as_dataset(images: np.ndarray, labels: np.ndarray, num_classes: int) -> Dataset:
  if images.ndim == 3:
    images = images[..., None]
  return Dataset(np.ascontiguousarray(images, np.uint8), labels.astype(np.int32), num_classes)


def embedded(split: str) -> Dataset:
  """The class-balanced Fashion-MNIST subset shipped with the package (800 + 150 per class)."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits: {SPLITS}")
  with np.load(ASSETS / EMBEDDED_FILE) as arrays:
    return _as_dataset(arrays[f"{split}_images"], arrays[f"{split}_labels"], 10)


def fashion_mnist_idx(split: str, *, data_dir: str) -> Dataset:
  """The full Fashion-MNIST split from a directory of IDX files."""
  return _as_dataset(*load_idx_split(data_dir, split), 10)


def synthetic(
  split: str, *, num_examples: int, image_size: int, channels: int, num_classes: int, seed: int
) -> Dataset:
  """Class-structured random images: a smooth per-class template plus per-image noise.

  Deterministic given `seed`; train and test draw different images around the same templates,
  so features that separate the templates generalise. For tests and quick runs.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits: {SPLITS}")
  templates = np.random.default_rng(seed).uniform(
    0, 255, (num_classes, 4, 4, channels)
  )  # upsampled below so each class has a smooth, distinct layout
  reps = -(-image_size // 4)
  templates = templates.repeat(reps, 1).repeat(reps, 2)[:, :image_size, :image_size]
  rng = np.random.default_rng([seed, SPLITS.index(split) + 1])
  labels = np.arange(num_examples) % num_classes
  noise = rng.normal(0, 40, (num_examples, image_size, image_size, channels))
  images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
  return _as_dataset(images, labels, num_classes)


SOURCES: dict[str, Callable[..., Dataset]] = {
  "fashion_mnist_embedded": lambda split, config: embedded(split),
  "fashion_mnist_idx": lambda split, config: fashion_mnist_idx(split, data_dir=config.data_dir),
  "synthetic": lambda split, config: synthetic(
    split,
    num_examples=config.synthetic.num_examples,
    image_size=config.synthetic.image_size,
    channels=config.synthetic.channels,
    num_classes=config.synthetic.num_classes,
    seed=config.synthetic.seed,
  ),
}


def check_source(name: str) -> None:
  """Raises a `ValueError` listing the valid sources when `name` is not one."""
  if name not in SOURCES:
    raise ValueError(f"Unknown dataset {name!r}; valid datasets: {sorted(SOURCES)}")


def load(data_config, split: str) -> Dataset:
  """The `split` of the source named by `data_config.name` (the `data` block of the config)."""
  check_source(data_config.name)
  return SOURCES[data_config.name](split, data_config)
