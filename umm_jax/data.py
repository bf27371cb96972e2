"""Image sources as uint8 arrays, long-tail subsets, and per-process slices of the global batch.

Every source returns a `Dataset`: `images` `[N, H, W, C]` uint8 and `labels` `[N]` int32 (-1 where
a split has no labels, as STL-10's `unlabelled`). Small sets (Fashion-MNIST, CIFAR, STL-10) are
read into memory at their native size; ImageNet-scale sets and image folders hold `LazyImages`,
which read and decode on the host, in a thread pool, only the rows that are indexed.
Augmentation and normalisation happen later, on device (`umm_jax.augment`, `umm_jax.train`).

tfds sets are read with `tfds.data_source` (ArrayRecord files, random access, no TensorFlow);
preparing them once needs TensorFlow (`_how_to_prepare` says how). Decoding images needs Pillow.
"""

import concurrent.futures
import gzip
import io
import pathlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
EMBEDDED_FILE = "fashion_mnist_subset.npz"
IMAGENET100_FILE = "imagenet100_classes.txt"
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
STATS_SAMPLE = 4096  # evenly spaced images that estimate a lazy source's channel statistics
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


class LazyImages:
  """`[N, S, S, C]` uint8 images read on demand, indexed like an array.

  `read(i)` returns image `i` of the underlying source at its final `[S, S, C]` shape. Indexing
  with an int, a slice or an index array reads those rows (in `workers` threads) and returns a
  NumPy array; `subset` returns another `LazyImages` over some rows without reading anything.
  """

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(
    self,
    read: Callable[[int], np.ndarray],
    count: int,
    *,
    shape: Sequence[int],
    workers: int = 16,
    rows: np.ndarray | None = None,
  ):
    self._read = read
    self._rows = np.arange(count) if rows is None else np.asarray(rows, np.int64)
    self.shape = (len(self._rows), *shape)
    self.workers = workers

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    rows = self._rows[key]
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      images = list(pool.map(self._read, np.atleast_1d(rows).tolist()))
    out = np.stack(images) if images else np.zeros((0, *self.shape[1:]), np.uint8)
    if out.shape[1:] != self.shape[1:] or out.dtype != np.uint8:
      raise ValueError(f"read gave {out.dtype} images {out.shape[1:]}, not uint8 {self.shape[1:]}")
    return out[0] if np.ndim(rows) == 0 else out

  def subset(self, key) -> "LazyImages":
    return LazyImages(
      self._read, 0, shape=self.shape[1:], workers=self.workers, rows=self._rows[key]
    )


class Dataset(NamedTuple):
  """One split of a data set.

  Attributes:
    images: `[N, H, W, C]` uint8, in memory (`np.ndarray`) or read on demand (`LazyImages`).
    labels: `[N]` int32 class indices, -1 for unlabelled images.
    num_classes: number of classes.
  """

  images: np.ndarray | LazyImages
  labels: np.ndarray
  num_classes: int

  def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std `[C]` of the images scaled to [0, 1].

    Exact for in-memory images; estimated on `STATS_SAMPLE` evenly spaced images of lazy ones.
    """
    images = self.images
    if isinstance(images, LazyImages):
      images = images[np.unique(np.linspace(0, len(images) - 1, STATS_SAMPLE).astype(np.int64))]
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(axis=0).astype(np.float32), x.std(axis=0).astype(np.float32)


def _subset(dataset: Dataset, rows: np.ndarray) -> Dataset:
  images = dataset.images
  images = images.subset(rows) if isinstance(images, LazyImages) else images[rows]
  return Dataset(images, dataset.labels[rows], dataset.num_classes)


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


# ---------------------------------------------------------------------------------------------
# Decoding (Pillow) and tfds sources.


def _pil():
  try:
    from PIL import Image
  except ImportError as error:
    raise ImportError("Decoding images needs Pillow: `pip install pillow`.") from error
  return Image


def fit_image(image, size: int) -> np.ndarray:
  """A PIL image or `[H, W, C]` array as `[size, size, C]` uint8.

  The shorter side is resized to `size` (bilinear, antialiased when shrinking, as PIL and
  torchvision's `Resize` do), then the centre `size x size` square is cropped.
  """
  pil = _pil()
  if isinstance(image, np.ndarray):
    image = pil.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  width, height = image.size
  if (width, height) != (size, size):
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new, pil.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
  array = np.asarray(image, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def decode_image(data: bytes, *, size: int, channels: int = 3) -> np.ndarray:
  """PNG/JPEG bytes as `[size, size, channels]` uint8 (`fit_image`).

  JPEGs are decoded at the smallest DCT scale that keeps both sides `>= size` (PIL's `draft`),
  which is several times faster for ImageNet photos and changes pixels only slightly.
  """
  mode = "RGB" if channels == 3 else "L"
  with _pil().open(io.BytesIO(data)) as image:
    image.draft(mode, (size, size))
    return fit_image(image.convert(mode), size)


class _Tfds(NamedTuple):
  name: str  # the tfds builder
  splits: dict[str, str]  # our split name -> the tfds split
  lazy: bool  # ImageNet-scale: decode on demand instead of reading the split into memory


_TRAIN_TEST = {"train": "train", "test": "test"}
_TRAIN_VAL = {"train": "train", "test": "validation"}
_STL10 = {**_TRAIN_TEST, "unlabelled": "unlabelled", "train+unlabelled": "train+unlabelled"}
TFDS_SOURCES = {
  "cifar10": _Tfds("cifar10", _TRAIN_TEST, lazy=False),
  "cifar100": _Tfds("cifar100", _TRAIN_TEST, lazy=False),
  "fashion_mnist": _Tfds("fashion_mnist", _TRAIN_TEST, lazy=False),
  "stl10": _Tfds("stl10", _STL10, lazy=False),
  "imagenette": _Tfds("imagenette", _TRAIN_VAL, lazy=True),
  "imagenet2012": _Tfds("imagenet2012", _TRAIN_VAL, lazy=True),
}


def _how_to_prepare(name: str, data_dir: str) -> str:
  text = (
    f"tfds data set {name!r} is not prepared as ArrayRecord files under {data_dir}. Prepare it "
    f"once (TensorFlow is needed for this step only): `pip install tensorflow && tfds build {name} "
    f"--file_format=array_record --data_dir={data_dir}`, then set --config.data.data_dir to "
    "that directory."
  )
  if name == "imagenet2012":
    text += (
      " ImageNet needs a manual download first: register at https://image-net.org/download-images"
      " and put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
      f"{data_dir}/downloads/manual (or pass --manual_dir=<their directory> to `tfds build`)."
    )
  return text


def _open_tfds(name: str, split: str, data_dir: str, **kwargs):
  """`tfds.data_source` of a prepared split; a `FileNotFoundError` saying how to prepare it."""
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False, **kwargs)
  except Exception as error:
    builder = tfds.builder(name, data_dir=data_dir or None)
    formats = (
      {f.value for f in builder.info.available_file_formats()} if builder.is_prepared() else ()
    )
    if "array_record" in formats:
      raise
    raise FileNotFoundError(_how_to_prepare(name, str(builder.data_dir_root))) from error


def _read_in_memory(source, what: str, workers: int) -> tuple[np.ndarray, np.ndarray]:
  """Every image and label of a data source, filled into preallocated arrays."""
  shape = source[0]["image"].shape
  images = np.empty((len(source), *shape), np.uint8)
  labels = np.empty(len(source), np.int32)

  def fill(i):
    example = source[i]
    if example["image"].shape != shape:
      raise ValueError(f"{what} images differ in size ({example['image'].shape} and {shape})")
    images[i], labels[i] = example["image"], example["label"]

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(fill, range(len(source))))
  return images, labels


def _scan_labels(source, split: str, workers: int) -> np.ndarray:
  """All labels of a tfds data source, cached beside its files (a scan of ImageNet is minutes)."""
  cache = pathlib.Path(source.dataset_info.data_dir) / f"umm_jax_labels.{split}.npy"
  if cache.is_file():
    labels = np.load(cache)
    if len(labels) == len(source):
      return labels
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    labels = np.fromiter(
      pool.map(lambda i: source[i]["label"], range(len(source))), np.int32, len(source)
    )
  try:
    np.save(cache, labels)
  except OSError:
    pass  # read-only data directory: scan again next time
  return labels


def from_tfds(
  name: str, split: str, *, data_dir: str = "", size: int = 0, workers: int = 16
) -> Dataset:
  """A split of a data set in `TFDS_SOURCES` (`split` "test" is ImageNet's "validation").

  Small sets are read into memory at their native size (`size` unused); lazy ones (ImageNet,
  Imagenette) are `LazyImages` of `[size, size, 3]` (`decode_image`), with labels scanned once.
  `data_dir` "" is tfds's default (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
  """
  if name not in TFDS_SOURCES:
    raise ValueError(f"Unknown tfds source {name!r}; valid: {sorted(TFDS_SOURCES)}")
  spec = TFDS_SOURCES[name]
  if split not in spec.splits:
    raise ValueError(f"Unknown split {split!r} of {name}; valid splits: {sorted(spec.splits)}")
  if not spec.lazy:
    source = _open_tfds(spec.name, spec.splits[split], data_dir)
    images, labels = _read_in_memory(source, f"{name} {split}", workers)
    return _as_dataset(images, labels, source.dataset_info.features["label"].num_classes)
  if size <= 0:
    raise ValueError(f"{name} is decoded on demand and needs an image size > 0, got {size}")
  import tensorflow_datasets as tfds

  source = _open_tfds(
    spec.name, spec.splits[split], data_dir, decoders={"image": tfds.decode.SkipDecoding()}
  )
  images = LazyImages(
    lambda i: decode_image(source[i]["image"], size=size),
    len(source),
    shape=(size, size, 3),
    workers=workers,
  )
  labels = _scan_labels(source, spec.splits[split], workers)
  return Dataset(images, labels, source.dataset_info.features["label"].num_classes)


def imagenet100_classes() -> list[str]:
  """The 100 WordNet ids of ImageNet-100 (Tian et al. 2020, CMC; as in solo-learn)."""
  return (ASSETS / IMAGENET100_FILE).read_text().split()


def imagenet100(split: str, *, data_dir: str = "", size: int, workers: int = 16) -> Dataset:
  """ImageNet-1k restricted to `imagenet100_classes()`, labels 0..99 in that list's order."""
  import tensorflow_datasets as tfds

  full = from_tfds("imagenet2012", split, data_dir=data_dir, size=size, workers=workers)
  names = tfds.builder("imagenet2012", data_dir=data_dir or None).info.features["label"].names
  lookup = np.full(len(names), -1, np.int32)
  lookup[[names.index(wnid) for wnid in imagenet100_classes()]] = np.arange(100)
  keep = np.flatnonzero(lookup[full.labels] >= 0)
  return Dataset(_subset(full, keep).images, lookup[full.labels[keep]], 100)


# ---------------------------------------------------------------------------------------------
# Image folders.


def _class_dirs(directory: pathlib.Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if p.is_dir())


def _files_dataset(
  paths: Sequence[pathlib.Path], labels, num_classes: int, *, size: int, channels: int, workers: int
) -> Dataset:
  if size <= 0:
    raise ValueError(f"Image folders are decoded on demand and need an image size > 0, got {size}")
  paths = list(paths)
  images = LazyImages(
    lambda i: decode_image(paths[i].read_bytes(), size=size, channels=channels),
    len(paths),
    shape=(size, size, channels),
    workers=workers,
  )
  return Dataset(images, np.asarray(labels, np.int32).reshape(-1), num_classes)


def image_folder(
  root: str | pathlib.Path, split: str, *, size: int, channels: int = 3, workers: int = 16
) -> Dataset:
  """Images under `root/<split>/<class>/` (any depth; png, jpg, jpeg), decoded on demand.

  Labels index the sorted class folders of `root/train` (of `root/<split>` when there is no
  `train`), so every split shares one label map. Split "test" falls back to `root/val`.
  """
  root = pathlib.Path(root)
  candidates = [split, "val", "validation"] if split == "test" else [split]
  split_dir = next((root / s for s in candidates if (root / s).is_dir()), None)
  if split_dir is None:
    raise FileNotFoundError(f"No folder {candidates} in {str(root)!r} (--config.data.data_dir)")
  classes = _class_dirs(root / "train" if (root / "train").is_dir() else split_dir)
  unknown = sorted(set(_class_dirs(split_dir)) - set(classes))
  if unknown:
    raise ValueError(f"{split_dir} has class folders {unknown[:5]} that {root / 'train'} lacks")
  paths, labels = [], []
  for label, name in enumerate(classes):
    directory = split_dir / name
    files = sorted(directory.rglob("*")) if directory.is_dir() else []
    files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    paths += files
    labels += [label] * len(files)
  if not paths:
    raise FileNotFoundError(f"No {IMAGE_SUFFIXES} images in class folders of {split_dir}")
  return _files_dataset(paths, labels, len(classes), size=size, channels=channels, workers=workers)


def tiny_imagenet(split: str, *, data_dir: str, size: int, workers: int = 16) -> Dataset:
  """Tiny-ImageNet (200 classes, 64 px) from its unzipped `tiny-imagenet-200` folder.

  "train" is `train/<wnid>/images/*.JPEG`; "test" is the labelled validation set,
  `val/images` with `val/val_annotations.txt` (or `val/<wnid>/` folders, if reorganised).
  """
  root = pathlib.Path(data_dir)
  if not (root / "train").is_dir():
    raise FileNotFoundError(
      f"No Tiny-ImageNet in {str(root)!r}: download and unzip "
      "http://cs231n.stanford.edu/tiny-imagenet-200.zip and set --config.data.data_dir to "
      "its tiny-imagenet-200 folder."
    )
  annotations = root / "val" / "val_annotations.txt"
  if split != "test" or not (root / "val" / "images").is_dir() or not annotations.is_file():
    return image_folder(root, split, size=size, workers=workers)
  label_of = {name: i for i, name in enumerate(_class_dirs(root / "train"))}
  rows = [line.split("\t")[:2] for line in annotations.read_text().splitlines() if line.strip()]
  paths = [root / "val" / "images" / file for file, _ in rows]
  labels = [label_of[wnid] for _, wnid in rows]
  return _files_dataset(paths, labels, len(label_of), size=size, channels=3, workers=workers)


# ---------------------------------------------------------------------------------------------
# Long-tail subsets.


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
  """Images kept per class: `n_c = floor(n_max * (1 / ratio) ** (c / (C - 1)))`, `c = 0..C-1`.

  The exponential profile of Cao et al. 2019 (LDAM-DRW, `get_img_num_per_cls` with
  `imb_factor = 1 / ratio`): class 0 keeps `n_max`, class C-1 keeps `n_max / ratio`.
  CIFAR-10-LT with ratio 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50.
  """
  if num_classes < 2 or imbalance_ratio < 1:
    raise ValueError(f"Need >= 2 classes and ratio >= 1, got {num_classes}, {imbalance_ratio}")
  factor = 1.0 / imbalance_ratio
  return np.array([int(n_max * factor ** (c / (num_classes - 1.0))) for c in range(num_classes)])


def long_tail(dataset: Dataset, *, imbalance_ratio: float, seed: int) -> Dataset:
  """A long-tailed subset: class `c` keeps `long_tail_counts(...)[c]` images (or all it has).

  `n_max` is the largest class's size; which images a class keeps is a uniform draw fixed by
  `seed`; kept images stay in their original order.
  """
  labels = dataset.labels
  if labels.size == 0 or labels.min() < 0:
    raise ValueError("long_tail needs every image labelled (this split has labels -1 or none)")
  counts = np.bincount(labels, minlength=dataset.num_classes)
  keep_counts = np.minimum(
    long_tail_counts(int(counts.max()), dataset.num_classes, imbalance_ratio), counts
  )
  rng = np.random.default_rng(seed)
  keep = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(keep_counts)]
  return _subset(dataset, np.sort(np.concatenate(keep)))


# ---------------------------------------------------------------------------------------------
# Batches for the training loop.


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Full global batches in one pass over `num_examples` (the remainder is dropped)."""
  if global_batch <= 0 or num_examples < global_batch:
    raise ValueError(f"{num_examples} examples do not fill one global batch of {global_batch}")
  return num_examples // global_batch


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The example order of `epoch`: a permutation fixed by `(seed, epoch)`, equal on every host."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(
  dataset: Dataset,
  *,
  global_batch: int,
  seed: int,
  epoch: int,
  process_index: int = 0,
  process_count: int = 1,
  start_step: int = 0,
  with_index: bool = False,
) -> Iterator[tuple[np.ndarray, ...]]:
  """This process's share of each global batch of `epoch`, from step `start_step` on.

  Global batch `s` is rows `[s * B, (s + 1) * B)` of `epoch_order`; process `p` of `P` gets its
  contiguous slice `[p * B / P, (p + 1) * B / P)` as `(images [B/P, H, W, C] uint8, labels
  [B/P] int32)`, and reads only those images; `with_index` appends the images' rows in `dataset`
  (`[B/P]` int32, the sample identities BCL-I tracks). Resuming at `start_step` skips earlier
  batches without reading them.
  """
  steps = steps_per_epoch(len(dataset.labels), global_batch)
  if global_batch % process_count or not 0 <= process_index < process_count:
    raise ValueError(
      f"global batch {global_batch} must split evenly over {process_count} processes, "
      f"and process index {process_index} must be in [0, {process_count})"
    )
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step {start_step} outside the epoch's [0, {steps}] steps")
  order = epoch_order(len(dataset.labels), seed=seed, epoch=epoch)
  local = global_batch // process_count

  def generate():
    for step in range(start_step, steps):
      rows = order[step * global_batch + process_index * local :][:local]
      batch = (np.asarray(dataset.images[rows]), dataset.labels[rows])
      yield (*batch, rows.astype(np.int32)) if with_index else batch

  return generate()


def prefetch(iterable: Iterable, *, buffer_size: int = 2) -> Iterator:
  """Runs `iterable` in a background thread, up to `buffer_size` items ahead.

  So host decoding of lazy images overlaps device compute. An exception in the producer is
  raised in the consumer. Abandoning the iterator early leaves the producer thread (a daemon)
  blocked with at most `buffer_size` items.
  """
  items: queue.Queue = queue.Queue(buffer_size)
  done = object()

  def produce():
    try:
      for item in iterable:
        items.put((item, None))
    except BaseException as error:  # re-raised in the consumer
      items.put((done, error))
      return
    items.put((done, None))

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item, error = items.get()
    if error is not None:
      raise error
    if item is done:
      return
    yield item


# ---------------------------------------------------------------------------------------------
# The registry read by `load`.


def _size(config) -> int:
  return config.decode_size or config.image_size


def _tfds_entry(name: str):
  return lambda split, config: from_tfds(
    name, split, data_dir=config.data_dir, size=_size(config), workers=config.workers
  )


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
  **{name: _tfds_entry(name) for name in TFDS_SOURCES},
  "imagenet100": lambda split, config: imagenet100(
    split, data_dir=config.data_dir, size=_size(config), workers=config.workers
  ),
  "tiny_imagenet": lambda split, config: tiny_imagenet(
    split, data_dir=config.data_dir, size=_size(config), workers=config.workers
  ),
  "image_folder": lambda split, config: image_folder(
    config.data_dir, split, size=_size(config), workers=config.workers
  ),
}


def check_source(name: str) -> None:
  """Raises a `ValueError` listing the valid sources when `name` is not one."""
  if name not in SOURCES:
    raise ValueError(f"Unknown dataset {name!r}; valid datasets: {sorted(SOURCES)}")


def load(data_config, split: str) -> Dataset:
  """The `split` of the source named by `data_config.name` (the `data` block of the config).

  With `data_config.long_tail_ratio > 0` the "train" split becomes its `long_tail` subset
  (seed `data_config.long_tail_seed`); other splits stay whole, as in Cao et al.'s evaluation.
  """
  check_source(data_config.name)
  dataset = SOURCES[data_config.name](split, data_config)
  if data_config.long_tail_ratio and split == "train":
    dataset = long_tail(
      dataset, imbalance_ratio=data_config.long_tail_ratio, seed=data_config.long_tail_seed
    )
  return dataset
