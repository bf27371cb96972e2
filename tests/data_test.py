"""Tests for umm_jax.data: every source (offline), long-tail subsets, per-process batches."""

import gzip
import io
import pathlib
import re
import struct
import types

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from scripts import make_embedded_dataset
from umm_jax import data

DEBIAN_IDX = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: pathlib.Path, array: np.ndarray, type_code: int, gz: bool) -> None:
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
  raw = header + array.tobytes()
  path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_matches_hand_built_file(tmp_path, gz):
  images = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
  path = tmp_path / ("x.idx.gz" if gz else "x.idx")
  _write_idx(path, images, 0x08, gz)
  np.testing.assert_array_equal(data.read_idx(path), images)
  values = np.arange(6, dtype=">i4").reshape(2, 3)
  _write_idx(tmp_path / "y", values, 0x0C, False)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "y"), values)


def test_read_idx_rejects_other_files(tmp_path):
  (tmp_path / "bad").write_bytes(b"PK\x03\x04 not idx")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "bad")
  (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\x00" * 3)
  with pytest.raises(ValueError, match="holds 3 values"):
    data.read_idx(tmp_path / "short")


def test_idx_directory_source(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, (7,), dtype=np.uint8)
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x08, True)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, 0x08, False)
  ds = data.fashion_mnist_idx("test", data_dir=str(tmp_path))
  assert ds.images.shape == (7, 28, 28, 1) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.images[..., 0], images)
  np.testing.assert_array_equal(ds.labels, labels.astype(np.int32))


def test_missing_idx_directory_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.fashion_mnist_idx("train", data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    data.fashion_mnist_idx("train", data_dir=str(tmp_path))


@pytest.mark.parametrize("split,per_class", [("train", 800), ("test", 150)])
def test_embedded_subset_is_class_balanced(split, per_class):
  ds = data.embedded(split)
  assert ds.images.shape == (10 * per_class, 28, 28, 1) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, per_class))
  assert ds.images.std() > 50  # real images, not a blank array


@pytest.mark.skipif(not DEBIAN_IDX.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_subset_is_first_per_class_of_the_idx_files(split):
  images, labels = data.load_idx_split(DEBIAN_IDX, split)
  ds = data.embedded(split)
  per_class = len(ds.labels) // 10
  keep = [i for c in range(10) for i in np.flatnonzero(labels == c)[:per_class]]
  keep = np.sort(keep)
  np.testing.assert_array_equal(ds.images[..., 0], images[keep])
  np.testing.assert_array_equal(ds.labels, labels[keep])


def test_first_per_class_is_deterministic_and_balanced():
  labels = np.array([2, 0, 1, 0, 2, 1, 0, 2, 1])
  np.testing.assert_array_equal(
    make_embedded_dataset.first_per_class(labels, 2), [0, 1, 2, 3, 4, 5]
  )
  with pytest.raises(ValueError, match="fewer than 4"):
    make_embedded_dataset.first_per_class(labels, 4)


def test_synthetic_is_deterministic_with_distinct_splits():
  kw = dict(num_examples=20, image_size=9, channels=3, num_classes=4, seed=3)
  a, b = data.synthetic("train", **kw), data.synthetic("train", **kw)
  np.testing.assert_array_equal(a.images, b.images)
  assert a.images.shape == (20, 9, 9, 3) and a.images.dtype == np.uint8
  np.testing.assert_array_equal(a.labels, np.arange(20) % 4)
  assert not np.array_equal(a.images, data.synthetic("test", **kw).images)
  # Class templates separate the classes: per-class means differ far more than noise allows.
  means = np.stack([a.images[a.labels == c].mean(0) for c in range(4)]).astype(float)
  assert np.abs(means[0] - means[1]).mean() > 20


def test_channel_stats_match_numpy():
  ds = data.synthetic("train", num_examples=8, image_size=5, channels=3, num_classes=2, seed=0)
  mean, std = ds.channel_stats()
  x = ds.images / 255.0
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-5)


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError, match="valid datasets:.*synthetic"):
    data.check_source("cifar11")
  with pytest.raises(ValueError, match="valid splits"):
    data.embedded("validation")


# ---------------------------------------------------------------------------------------------
# tfds sources, lazy images, image folders, long-tail subsets, batches.


def _data_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    dict(
      name="synthetic",
      image_size=8,
      data_dir="",
      decode_size=0,
      workers=2,
      long_tail_ratio=0.0,
      long_tail_seed=0,
      synthetic=dict(num_examples=200, image_size=8, channels=3, num_classes=4, seed=0),
    )
  )
  config.update(overrides)
  return config


def _indexed(n: int, num_classes: int) -> data.Dataset:
  """`[n, 2, 2, 2]` images that encode their row (`_rows`), balanced labels."""
  rows = np.arange(n)
  images = np.stack([rows % 256, rows // 256], -1).astype(np.uint8)[:, None, None, :]
  images = np.ascontiguousarray(np.broadcast_to(images, (n, 2, 2, 2)))
  return data.Dataset(images, (rows % num_classes).astype(np.int32), num_classes)


def _rows(images: np.ndarray) -> np.ndarray:
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def _png(array: np.ndarray) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def test_tfds_sources_read_mock_data_into_memory(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    ds = data.from_tfds("cifar10", "train", data_dir=str(tmp_path), workers=2)
    source = tfds.data_source("cifar10", split="train", data_dir=str(tmp_path))
    expected = np.stack([source[i]["image"] for i in range(6)])
    loaded = data.load(_data_config(name="cifar10", data_dir=str(tmp_path)), "test")
    fashion = data.from_tfds("fashion_mnist", "test", data_dir=str(tmp_path))
    cifar100 = data.from_tfds("cifar100", "train", data_dir=str(tmp_path))
  assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.images, expected)
  assert ds.labels.dtype == np.int32 and ds.num_classes == 10
  assert ((ds.labels >= 0) & (ds.labels < 10)).all()
  assert loaded.images.shape == (6, 32, 32, 3)
  assert fashion.images.shape == (6, 28, 28, 1) and cifar100.num_classes == 100


class UmmJaxTestImages(tfds.core.GeneratorBasedBuilder):
  """A real tfds builder of PNG images, pixels 10 * i and label i % 3; no TensorFlow needed.

  "train": 7 images of 6 x 5; "validation": 4 images of 6 x (5 + i).
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    image = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
    features = tfds.features.FeaturesDict(
      {"image": image, "label": tfds.features.ClassLabel(num_classes=3)}
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(7, 0), "validation": self._generate_examples(4, 1)}

  def _generate_examples(self, n, grow):
    for i in range(n):  # PNG bytes: tfds would need TensorFlow to encode arrays
      image = np.full((6, 5 + grow * i, 3), 10 * i, np.uint8)
      yield i, {"image": _png(image), "label": i % 3}


def test_tfds_reader_on_real_array_record_files(monkeypatch, tmp_path):
  pytest.importorskip("PIL")
  UmmJaxTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  name = "umm_jax_test_images"
  monkeypatch.setitem(data.TFDS_SOURCES, name, data._Tfds(name, data._TRAIN_VAL, lazy=True))
  ds = data.from_tfds(name, "test", data_dir=str(tmp_path), size=4, workers=2)
  assert ds.images.shape == (4, 4, 4, 3) and ds.num_classes == 3
  values = ds.images[:][:, 0, 0, 0]
  np.testing.assert_array_equal(np.sort(values), [0, 10, 20, 30])
  np.testing.assert_array_equal(ds.labels, values // 10 % 3)
  assert list(tmp_path.glob("umm_jax_test_images/1.0.0/umm_jax_labels.validation.npy"))
  monkeypatch.setitem(data.TFDS_SOURCES, name, data._Tfds(name, data._TRAIN_VAL, lazy=False))
  train = data.from_tfds(name, "train", data_dir=str(tmp_path))
  assert train.images.shape == (7, 6, 5, 3) and train.images.dtype == np.uint8
  values = train.images[:, 0, 0, 0]
  np.testing.assert_array_equal(np.sort(values), np.arange(7) * 10)
  np.testing.assert_array_equal(train.labels, values // 10 % 3)
  assert (train.images == values[:, None, None, None]).all()
  with pytest.raises(ValueError, match="differ in size"):  # in memory needs one image size
    data.from_tfds(name, "test", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f"tfds build {name} --file_format=array_record"):
    data.from_tfds(name, "train", data_dir=str(tmp_path / "elsewhere"))


def test_unprepared_tfds_data_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    data.from_tfds("cifar10", "train", data_dir=str(tmp_path))
  assert "pip install tensorflow && tfds build cifar10 --file_format=array_record" in str(
    error.value
  )
  assert f"--data_dir={tmp_path}" in str(error.value)
  with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_train\.tar.*downloads/manual"):
    data.from_tfds("imagenet2012", "train", data_dir=str(tmp_path), size=8)


def test_tfds_splits_and_sizes_are_checked():
  with pytest.raises(ValueError, match="valid splits: .*'train\\+unlabelled'"):
    data.from_tfds("stl10", "validation")
  with pytest.raises(ValueError, match="valid: .*'imagenet2012'"):
    data.from_tfds("imagenet", "train")
  with pytest.raises(ValueError, match="image size > 0"):
    data.from_tfds("imagenet2012", "train", size=0)


class _FakeSource:
  """What `tfds.data_source` returns: random access to example dicts, and the set's info."""

  def __init__(self, examples, data_dir, names):
    self.examples, self.reads = examples, 0
    label = types.SimpleNamespace(names=names, num_classes=len(names))
    self.dataset_info = types.SimpleNamespace(data_dir=str(data_dir), features={"label": label})

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.reads += 1
    return self.examples[i]


def _fake_tfds(monkeypatch, tmp_path, labels, images=None):
  """Replaces `tfds.data_source` by a `_FakeSource` whose image `i` is `bytes([i])` by default."""
  names = tfds.builder("imagenet2012").info.features["label"].names
  images = images or [bytes([i]) for i in range(len(labels))]
  examples = [{"image": im, "label": np.int64(lab)} for im, lab in zip(images, labels, strict=True)]
  source = _FakeSource(examples, tmp_path, names)
  calls = []

  def data_source(name, *, split, data_dir, download, decoders=None):
    calls.append(dict(name=name, split=split, download=download, decoders=decoders))
    return source

  monkeypatch.setattr(tfds, "data_source", data_source)
  return source, calls


def _marker_decode(raw, *, size, channels=3):
  return np.full((size, size, channels), raw[0], np.uint8)


def test_lazy_tfds_source_reads_rows_on_demand_and_caches_labels(monkeypatch, tmp_path):
  source, calls = _fake_tfds(monkeypatch, tmp_path, labels=[3, 1, 4, 1, 5])
  monkeypatch.setattr(data, "decode_image", _marker_decode)
  ds = data.from_tfds("imagenet2012", "test", data_dir=str(tmp_path), size=4, workers=2)
  assert calls[0]["split"] == "validation" and calls[0]["download"] is False
  assert isinstance(calls[0]["decoders"]["image"], tfds.decode.SkipDecoding)
  assert isinstance(ds.images, data.LazyImages) and ds.images.shape == (5, 4, 4, 3)
  np.testing.assert_array_equal(ds.labels, [3, 1, 4, 1, 5])
  assert ds.num_classes == 1000 and (tmp_path / "umm_jax_labels.validation.npy").is_file()
  source.reads = 0
  again = data.from_tfds("imagenet2012", "test", data_dir=str(tmp_path), size=4)
  assert source.reads == 0  # labels came from the cache; no image read yet
  np.testing.assert_array_equal(again.images[[4, 0]][:, 0, 0, 0], [4, 0])
  assert source.reads == 2


def test_imagenet100_keeps_its_classes_relabelled_in_list_order(monkeypatch, tmp_path):
  names = tfds.builder("imagenet2012").info.features["label"].names
  wnids = data.imagenet100_classes()
  outside = next(n for n in names if n not in wnids)
  labels = [names.index(w) for w in (wnids[5], outside, wnids[0], wnids[99], outside)]
  _fake_tfds(monkeypatch, tmp_path, labels)
  monkeypatch.setattr(data, "decode_image", _marker_decode)
  ds = data.load(_data_config(name="imagenet100", data_dir=str(tmp_path)), "train")
  assert ds.num_classes == 100 and ds.images.shape == (3, 8, 8, 3)
  np.testing.assert_array_equal(ds.labels, [5, 0, 99])
  np.testing.assert_array_equal(ds.images[:][:, 0, 0, 0], [0, 2, 3])  # rows of the full set


def test_imagenet100_list_is_the_cmc_subset_of_imagenet():
  wnids = data.imagenet100_classes()
  assert len(wnids) == 100 and len(set(wnids)) == 100
  assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
  assert wnids[:3] == ["n02869837", "n01749939", "n02488291"] and wnids[-1] == "n02090622"
  names = set(tfds.builder("imagenet2012").info.features["label"].names)
  assert set(wnids) <= names


def test_lazy_images_index_like_an_array():
  base = np.random.default_rng(0).integers(0, 256, (7, 3, 3, 2), dtype=np.uint8)
  lazy = data.LazyImages(lambda i: base[i], 7, shape=(3, 3, 2), workers=2)
  assert lazy.shape == base.shape and len(lazy) == 7 and lazy.dtype == np.uint8
  np.testing.assert_array_equal(lazy[[5, 1, 1]], base[[5, 1, 1]])
  np.testing.assert_array_equal(lazy[2:6:2], base[2:6:2])
  np.testing.assert_array_equal(lazy[-1], base[-1])
  np.testing.assert_array_equal(lazy.subset([6, 0, 3])[1:], base[[0, 3]])
  np.testing.assert_array_equal(lazy.subset([6, 0, 3])[0], base[6])
  np.testing.assert_array_equal(lazy.subset(slice(2, None)).subset([1])[[0]], base[[3]])
  assert lazy[[]].shape == (0, 3, 3, 2)
  for got, want in zip(
    data.Dataset(lazy, np.zeros(7), 1).channel_stats(),
    data.Dataset(base, np.zeros(7), 1).channel_stats(),
    strict=True,
  ):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  bad = data.LazyImages(lambda i: base[i, :2], 7, shape=(3, 3, 2))
  with pytest.raises(ValueError, match="not uint8"):
    bad[[0]]


def test_fit_and_decode_images():
  pytest.importorskip("PIL")
  image = np.zeros((10, 40, 3), np.uint8)
  image[:, 20:] = 255  # left half black, right half white
  fitted = data.decode_image(_png(image), size=10)  # shorter side already 10: centre crop only
  np.testing.assert_array_equal(fitted, image[:, 15:25])
  small = data.fit_image(np.full((30, 20, 3), 77, np.uint8), 8)  # resized 20 -> 8, cropped
  np.testing.assert_array_equal(small, np.full((8, 8, 3), 77, np.uint8))
  gray = data.decode_image(_png(np.full((12, 12), 9, np.uint8)), size=6, channels=1)
  np.testing.assert_array_equal(gray, np.full((6, 6, 1), 9, np.uint8))


def test_image_folder_labels_sorted_classes_and_reads_every_image(tmp_path):
  pytest.importorskip("PIL")
  rng = np.random.default_rng(0)
  written = {}
  for split, name, count in [("train", "dog", 2), ("train", "cat", 3), ("val", "dog", 1)]:
    for i in range(count):
      path = tmp_path / split / name / ("deep" if i == 2 else "") / f"{i}.PNG"
      path.parent.mkdir(parents=True, exist_ok=True)
      written[path] = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
      path.write_bytes(_png(written[path]))
  (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
  train = data.load(
    _data_config(name="image_folder", data_dir=str(tmp_path), image_size=6), "train"
  )
  np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1])  # cat < dog
  expected = [written[p] for p in sorted(p for p in written if "train" in p.parts)]
  np.testing.assert_array_equal(train.images[:], np.stack(expected))
  test = data.image_folder(tmp_path, "test", size=6)  # no test/: falls back to val/
  assert test.num_classes == 2 and test.labels.tolist() == [1]
  (tmp_path / "val" / "bird").mkdir()
  with pytest.raises(ValueError, match="bird"):
    data.image_folder(tmp_path, "test", size=6)
  with pytest.raises(FileNotFoundError, match="No folder"):
    data.image_folder(tmp_path, "unlabelled", size=6)


def test_tiny_imagenet_reads_the_official_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip"):
    data.tiny_imagenet("train", data_dir=str(tmp_path), size=4)
  pytest.importorskip("PIL")
  for wnid in ("n02", "n01"):
    (tmp_path / "train" / wnid / "images").mkdir(parents=True)
    (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    image = np.full((4, 4, 3), int(wnid[-1]), np.uint8)
    (tmp_path / "train" / wnid / "images" / f"{wnid}_0.JPEG").write_bytes(_png(image))
  (tmp_path / "val" / "images").mkdir(parents=True)
  for i in range(3):
    (tmp_path / "val" / "images" / f"val_{i}.JPEG").write_bytes(
      _png(np.full((4, 4, 3), i, np.uint8))
    )
  (tmp_path / "val" / "val_annotations.txt").write_text(
    "val_0.JPEG\tn02\t0\t0\t4\t4\nval_1.JPEG\tn01\t0\t0\t4\t4\nval_2.JPEG\tn02\t0\t0\t4\t4\n"
  )
  train = data.tiny_imagenet("train", data_dir=str(tmp_path), size=4)
  np.testing.assert_array_equal(train.labels, [0, 1])
  np.testing.assert_array_equal(train.images[:][:, 0, 0, 0], [1, 2])
  test = data.tiny_imagenet("test", data_dir=str(tmp_path), size=4)
  assert test.num_classes == 2
  np.testing.assert_array_equal(test.labels, [1, 0, 1])
  np.testing.assert_array_equal(test.images[:][:, 0, 0, 0], [0, 1, 2])


def test_long_tail_counts_match_cao_et_al():
  np.testing.assert_array_equal(
    data.long_tail_counts(5000, 10, 100), [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  )
  assert data.long_tail_counts(500, 100, 100).sum() == 10847  # CIFAR-100-LT, ratio 100
  assert data.long_tail_counts(500, 100, 50).sum() == 12608  # CIFAR-100-LT, ratio 50
  np.testing.assert_array_equal(data.long_tail_counts(7, 3, 1), [7, 7, 7])
  with pytest.raises(ValueError, match="ratio >= 1"):
    data.long_tail_counts(10, 10, 0.5)


def test_long_tail_subset_is_deterministic_given_the_seed():
  ds = _indexed(400, 4)
  counts = data.long_tail_counts(100, 4, 10)  # 100, 46, 21, 10
  a = data.long_tail(ds, imbalance_ratio=10, seed=0)
  np.testing.assert_array_equal(np.bincount(a.labels, minlength=4), counts)
  rows = _rows(a.images)
  assert np.all(np.diff(rows) > 0)  # kept images stay in their original order
  np.testing.assert_array_equal(a.labels, ds.labels[rows])
  b = data.long_tail(ds, imbalance_ratio=10, seed=0)
  c = data.long_tail(ds, imbalance_ratio=10, seed=1)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(np.bincount(c.labels, minlength=4), counts)
  assert not np.array_equal(rows[a.labels == 1], _rows(c.images)[c.labels == 1])
  lazy = data.Dataset(data.LazyImages(lambda i: ds.images[i], 400, shape=(2, 2, 2)), ds.labels, 4)
  lazy_lt = data.long_tail(lazy, imbalance_ratio=10, seed=0)
  assert isinstance(lazy_lt.images, data.LazyImages)
  np.testing.assert_array_equal(lazy_lt.images[:], a.images)
  with pytest.raises(ValueError, match="labelled"):
    data.long_tail(ds._replace(labels=ds.labels - 1), imbalance_ratio=10, seed=0)


def test_load_makes_the_train_split_long_tailed_only():
  config = _data_config(long_tail_ratio=10, long_tail_seed=3)
  train, test = data.load(config, "train"), data.load(config, "test")
  np.testing.assert_array_equal(np.bincount(train.labels), data.long_tail_counts(50, 4, 10))
  np.testing.assert_array_equal(np.bincount(test.labels), [50, 50, 50, 50])


def _epoch(ds, **kw):
  return list(data.batches(ds, global_batch=6, seed=0, epoch=0, **kw))


def test_batches_cover_each_example_once_per_epoch_across_processes():
  ds = _indexed(23, 5)
  assert data.steps_per_epoch(23, 6) == 3
  whole = _epoch(ds)
  parts = [_epoch(ds, process_index=p, process_count=3) for p in range(3)]
  assert len(whole) == 3 and all(len(p) == 3 for p in parts)
  for step, (images, labels) in enumerate(whole):
    assert images.shape == (6, 2, 2, 2) and images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, _rows(images) % 5)
    for p in range(3):  # process p's slice is rows [2p, 2p + 2) of the global batch
      np.testing.assert_array_equal(parts[p][step][0], images[2 * p : 2 * p + 2])
  seen = np.concatenate([_rows(images) for images, _ in whole])
  assert len(set(seen.tolist())) == 18  # 23 // 6 full batches, no example twice
  np.testing.assert_array_equal(seen, data.epoch_order(23, seed=0, epoch=0)[:18])


def test_batches_are_deterministic_per_seed_and_epoch_and_resume_mid_epoch():
  ds = _indexed(40, 4)
  first = [b[0] for b in data.batches(ds, global_batch=8, seed=1, epoch=2)]
  again = [b[0] for b in data.batches(ds, global_batch=8, seed=1, epoch=2)]
  other_epoch = [b[0] for b in data.batches(ds, global_batch=8, seed=1, epoch=3)]
  other_seed = [b[0] for b in data.batches(ds, global_batch=8, seed=2, epoch=2)]
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other_epoch) and not np.array_equal(first, other_seed)
  resumed = [b[0] for b in data.batches(ds, global_batch=8, seed=1, epoch=2, start_step=3)]
  np.testing.assert_array_equal(resumed, first[3:])
  assert list(data.batches(ds, global_batch=8, seed=1, epoch=2, start_step=5)) == []


def test_batches_read_only_this_process_rows_of_lazy_images():
  ds = _indexed(24, 3)
  read = []
  lazy = data.Dataset(
    data.LazyImages(lambda i: read.append(i) or ds.images[i], 24, shape=(2, 2, 2)), ds.labels, 3
  )
  out = list(data.batches(lazy, global_batch=8, seed=0, epoch=0, process_index=1, process_count=4))
  assert len(out) == 3 and all(images.shape == (2, 2, 2, 2) for images, _ in out)
  assert len(read) == 6
  skipped = list(data.batches(lazy, global_batch=8, seed=0, epoch=0, start_step=2))
  assert len(skipped) == 1 and len(read) == 6 + 8


def test_batches_reject_bad_arguments():
  ds = _indexed(10, 2)
  with pytest.raises(ValueError, match="split evenly over 3 processes"):
    data.batches(ds, global_batch=4, seed=0, epoch=0, process_count=3)
  with pytest.raises(ValueError, match="process index 2"):
    data.batches(ds, global_batch=4, seed=0, epoch=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="do not fill one global batch of 16"):
    data.batches(ds, global_batch=16, seed=0, epoch=0)
  with pytest.raises(ValueError, match="start_step 3"):
    data.batches(ds, global_batch=4, seed=0, epoch=0, start_step=3)


def test_prefetch_yields_the_same_items_and_reraises():
  assert list(data.prefetch(iter(range(7)), buffer_size=2)) == list(range(7))

  def failing():
    yield 1
    raise RuntimeError("broken source")

  got = data.prefetch(failing())
  assert next(got) == 1
  with pytest.raises(RuntimeError, match="broken source"):
    next(got)


def test_registry_lists_every_source():
  expected = {"cifar10", "cifar100", "stl10", "fashion_mnist", "imagenette", "imagenet2012"}
  expected |= {"imagenet100", "tiny_imagenet", "image_folder", "synthetic"}
  assert expected <= set(data.SOURCES)
