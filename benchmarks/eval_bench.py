"""Times the paper's three signals on cached features (its Table 9): ΔR, kNN, linear probe.

Run (from the repository root; the paper's CIFAR-10 sizes):
  python benchmarks/eval_bench.py --n=50000 --n_test=10000 --d=512 --classes=10 --epochs=500

On a CPU, cut the sizes and the probe's epochs, e.g.
  python benchmarks/eval_bench.py --n=10000 --n_test=2000 --epochs=20

Features are clustered (class centres + a shared low-rank part + noise), float32, already on the
host: feature extraction is common to all three signals and not timed here. Each signal is
timed once after it has been compiled (compilation time printed beside it):
1. ΔR, `crr.dataset_rate_reduction` with the soft membership (τ = 0.1, ε² = 0.5) on two views
   of `n / 2` images (the `n` training features split in halves, the second half standing for
   the second view), chunks of `--chunk` views: label-free, as the monitor computes it;
2. kNN, `evaluate.knn_accuracy` of the `n_test` test features against the `n` training
   features: `k = 5` majority vote (the paper) and `k = 200`, `T = 0.1` weighted vote;
3. linear probe, `evaluate.linear_probe` (SGD momentum 0.9, batch 256, lr 1e-2 → 1e-6) for
   `--epochs` epochs. Its cost is linear in the epochs (a fixed number of identical steps per
   epoch), so with `--epochs` below 500 the time for 500 is also printed, scaled and marked so.
The paper's figures (V100, CIFAR-10): linear 92.76 s, kNN 13.63 s, ΔR 4.03 s.
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from umm_jax import crr, evaluate

PAPER_EPOCHS = 500


def clustered_features(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`[n, d]` float32 features and `[n]` labels: class centres, a rank-32 part and noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  centres = rng.normal(size=(classes, d))
  shared = rng.normal(size=(n, 32)) @ rng.normal(size=(32, d)) / np.sqrt(32)
  z = centres[labels] + shared + 5.0 * rng.normal(size=(n, d))  # kNN and probe below 100%
  return z.astype(np.float32), labels


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def bench_rate_reduction(train: np.ndarray, chunk: int) -> None:
  half = train.shape[0] // 2
  views = jnp.asarray(train[: 2 * half].reshape(2, half, -1))
  run = jax.jit(
    lambda z: crr.dataset_rate_reduction(z, chunk_size=chunk, membership="soft", eps2=0.5).delta
  )
  compile_s = time.perf_counter()
  run.lower(views).compile()
  compile_s = time.perf_counter() - compile_s
  seconds, delta = timed(lambda: run(views))
  print(
    f"ΔR soft, 2 x {half} views, m={chunk} ({half * 2 // chunk} chunks) "
    f"{seconds:9.2f} s  (compile {compile_s:.1f} s)  ΔR {float(delta):.4f}"
  )


def bench_knn(train, labels, test, test_labels, classes: int, k: int, temperature) -> None:
  kw = dict(k=k, temperature=temperature, num_classes=classes)
  compile_s, _ = timed(lambda: evaluate.knn_classify(train, labels, test, **kw))
  seconds, result = timed(lambda: evaluate.knn_accuracy(train, labels, test, test_labels, **kw))
  name = f"kNN k={k} " + ("majority" if temperature is None else f"T={temperature}")
  print(
    f"{name:42s} {seconds:9.2f} s  (first call incl. compile {compile_s:.1f} s)  "
    f"top-1 {result['top1']:.4f}"
  )


def bench_linear(train, labels, test, test_labels, classes: int, epochs: int) -> None:
  kw = dict(num_classes=classes, **{**evaluate.PROTOCOLS["linear"], "epochs": epochs})
  fit_kw = {k: v for k, v in kw.items() if k not in ("num_classes", "epochs")}
  start = time.perf_counter()
  evaluate.fit_linear_classifier.lower(
    jnp.asarray(train),
    jnp.asarray(labels),
    jax.random.key(0),
    num_classes=classes,
    epochs=epochs,
    **fit_kw,
  ).compile()
  compile_s = time.perf_counter() - start
  # Warms the eager standardisation and scoring ops (a one-epoch fit is a separate compile).
  evaluate.linear_probe(train, labels, test, test_labels, **{**kw, "epochs": 1})
  seconds, result = timed(lambda: evaluate.linear_probe(train, labels, test, test_labels, **kw))
  steps = -(-train.shape[0] // kw["batch_size"]) * epochs
  line = f"linear probe {epochs} epochs ({steps} steps of {kw['batch_size']})"
  print(f"{line:42s} {seconds:9.2f} s  (compile {compile_s:.1f} s)  top-1 {result['top1']:.4f}")
  if epochs != PAPER_EPOCHS:
    scaled = seconds * PAPER_EPOCHS / epochs
    note = f"  -> scaled to {PAPER_EPOCHS} epochs (x{PAPER_EPOCHS / epochs:g}, not run)"
    print(f"{note:42s} {scaled:9.2f} s")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=50_000, help="training features (and ΔR views)")
  parser.add_argument("--n_test", type=int, default=10_000, help="test features (kNN, probe)")
  parser.add_argument("--d", type=int, default=512, help="feature dimension")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--chunk", type=int, default=512, help="ΔR views per chunk")
  parser.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help="linear-probe epochs")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(
    f"train {args.n} x {args.d}, test {args.n_test}, {args.classes} classes (clustered, "
    f"float32); jax {jax.__version__}, {jax.device_count()} x {device.device_kind} "
    f"({jax.default_backend()}), {platform.processor() or platform.machine()}"
  )
  z, y = clustered_features(args.n + args.n_test, args.d, args.classes, seed=0)
  train, labels, test, test_labels = z[: args.n], y[: args.n], z[args.n :], y[args.n :]
  bench_rate_reduction(train, args.chunk)
  bench_knn(train, labels, test, test_labels, args.classes, 5, None)
  bench_knn(train, labels, test, test_labels, args.classes, 200, 0.1)
  bench_linear(train, labels, test, test_labels, args.classes, args.epochs)


if __name__ == "__main__":
  main()
