"""Writes the embedded Fashion-MNIST subset shipped in `umm_jax/assets/`.

The subset is deterministic and class-balanced: the first `--train_per_class` images of each
class in the official training split (in file order) and the first `--test_per_class` of each
class in the test split. Rerun it from the IDX files of Debian's `dataset-fashion-mnist`:

  sudo apt-get install dataset-fashion-mnist
  python scripts/make_embedded_dataset.py --idx_dir=/usr/share/datasets/fashion-mnist

Fashion-MNIST is (c) 2017 Zalando SE, MIT licence; the notice travels with the subset.
"""

import argparse
import hashlib
import pathlib

import numpy as np

from umm_jax import data

OUT = pathlib.Path(__file__).resolve().parents[1] / "umm_jax" / "assets" / data.EMBEDDED_FILE


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Indices of the first `per_class` examples of every class, in file order."""
  picks = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
  if any(len(p) < per_class for p in picks):
    raise ValueError(f"some class has fewer than {per_class} examples")
  return np.sort(np.concatenate(picks))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--idx_dir", default="/usr/share/datasets/fashion-mnist")
  parser.add_argument("--train_per_class", type=int, default=800)
  parser.add_argument("--test_per_class", type=int, default=150)
  args = parser.parse_args()
  arrays = {}
  for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
    images, labels = data.load_idx_split(args.idx_dir, split)
    keep = first_per_class(labels, per_class)
    arrays[f"{split}_images"] = images[keep]
    arrays[f"{split}_labels"] = labels[keep]
  np.savez_compressed(OUT, **arrays)
  # The zip container stores timestamps, so compare reruns by the arrays' content hash.
  digest = hashlib.sha256(b"".join(arrays[k].tobytes() for k in sorted(arrays))).hexdigest()
  print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, content sha256 {digest})")
  for name, value in arrays.items():
    print(f"  {name}: {value.shape} {value.dtype}")


if __name__ == "__main__":
  main()
