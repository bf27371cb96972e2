"""Tests for umm_jax.data: IDX parsing, the embedded subset, the synthetic source, errors."""

import gzip
import pathlib
import struct

import numpy as np
import pytest

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
