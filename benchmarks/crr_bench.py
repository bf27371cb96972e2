"""Times `umm_jax.crr` rate reduction with the soft membership against a plain NumPy loop.

Run (from the repository root):
  python benchmarks/crr_bench.py --m=512 --d=512 --n=50000 --repeats=3 --numpy_chunks=3

Two cases, both with the soft membership (one group per sample, spec section 2):
1. one batch: ΔR of `[m, d]` features, `crr.rate_reduction(z, crr.soft_membership(z))` jitted,
   after compilation, median of `--repeats` calls;
2. a data set: the mean ΔR over chunks of `m` rows of `[n, d]` features,
   `crr.dataset_rate_reduction` jitted, one timed call after compilation.
The reference is the formula as most code writes it: a Python loop over the groups, each with
a `d × d` matrix `Zᵀ diag(P[:, j]) Z` and `np.linalg.slogdet` (float64, NumPy's BLAS on every
core). For the data set, NumPy runs `--numpy_chunks` chunks and its time is scaled to all
chunks (the chunks cost the same); the printout says so. Both sides' ΔR are printed, so the
timed code is seen to compute the same value.
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from umm_jax import crr

EPS2 = 0.5
TEMPERATURE = 0.1


def numpy_rate_reduction(z: np.ndarray) -> float:
  """ΔR with the soft membership, one `d × d` log-determinant per group in a Python loop."""
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  m, d = z.shape
  logits = z @ z.T / TEMPERATURE
  np.fill_diagonal(logits, -np.inf)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  eye = np.eye(d)
  rate = 0.5 * np.linalg.slogdet(eye + d / (m * EPS2) * z.T @ z)[1]
  compressed = 0.0
  for j in range(p.shape[1]):
    t = p[:, j].sum()
    if t > 0:
      cov = (z.T * p[:, j]) @ z
      compressed += t / (2 * m) * np.linalg.slogdet(eye + d / (t * EPS2) * cov)[1]
  return rate - compressed


def median_seconds(fn, repeats: int) -> tuple[float, object]:
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times)), out


def bench_batch(z: np.ndarray, repeats: int) -> None:
  """Case 1: one `[m, d]` batch."""

  @jax.jit
  def delta(z):
    return crr.rate_reduction(z, crr.soft_membership(z, temperature=TEMPERATURE), eps2=EPS2).delta

  zj = jnp.asarray(z)
  delta(zj).block_until_ready()  # compiles
  t_jax, d_jax = median_seconds(lambda: delta(zj), repeats)
  t_np, d_np = median_seconds(lambda: numpy_rate_reduction(z.astype(np.float64)), repeats)
  print(
    f"batch   m={z.shape[0]} d={z.shape[1]}: jax {t_jax * 1e3:8.1f} ms (ΔR {float(d_jax):.4f})"
    f" | numpy loop {t_np * 1e3:8.1f} ms (ΔR {d_np:.4f}) | speed-up {t_np / t_jax:5.1f}x"
  )


def bench_dataset(z: np.ndarray, m: int, numpy_chunks: int) -> None:
  """Case 2: mean ΔR over the chunks of `m` rows of `[n, d]` features."""
  run = jax.jit(
    lambda z: (
      crr.dataset_rate_reduction(
        z, chunk_size=m, membership="soft", eps2=EPS2, temperature=TEMPERATURE
      ).delta
    )
  )
  zj = jnp.asarray(z)
  run(zj).block_until_ready()  # compiles
  t_jax, d_jax = median_seconds(lambda: run(zj), 1)
  chunks = z.shape[0] // m
  start = time.perf_counter()
  d_np = [
    numpy_rate_reduction(z[i * m : (i + 1) * m].astype(np.float64)) for i in range(numpy_chunks)
  ]
  t_np = (time.perf_counter() - start) / numpy_chunks * chunks
  print(
    f"dataset n={z.shape[0]} d={z.shape[1]}, {chunks} chunks of {m}: jax {t_jax:7.2f} s "
    f"(mean ΔR {float(d_jax):.4f}) | numpy loop {t_np:7.2f} s, scaled from {numpy_chunks} "
    f"chunks (their mean ΔR {np.mean(d_np):.4f}) | speed-up {t_np / t_jax:5.1f}x"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--m", type=int, default=512, help="samples per batch / chunk")
  parser.add_argument("--d", type=int, default=512, help="feature dimension")
  parser.add_argument("--n", type=int, default=50_000, help="data set size; 0 skips case 2")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--numpy_chunks", type=int, default=3)
  args = parser.parse_args()
  print(
    f"soft membership τ={TEMPERATURE}, ε²={EPS2}, float32 jax / float64 numpy; jax "
    f"{jax.__version__}, backend {jax.default_backend()}, numpy {np.__version__}, "
    f"{platform.processor() or platform.machine()}"
  )
  rng = np.random.default_rng(0)
  # Low-rank structure plus noise, like real features: clusters make the soft groups uneven.
  basis = rng.normal(size=(32, args.d))
  codes = rng.normal(size=(max(args.m, args.n), 32))
  z = (codes @ basis + 0.5 * rng.normal(size=(codes.shape[0], args.d))).astype(np.float32)
  bench_batch(z[: args.m], args.repeats)
  if args.n:
    bench_dataset(z[: args.n], args.m, args.numpy_chunks)


if __name__ == "__main__":
  main()
