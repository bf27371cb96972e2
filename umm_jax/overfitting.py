"""Overfitting seen in the monitor's curves (the paper's Section 4 and Appendix B.2).

Pure NumPy on the `monitor.json` dict of `umm_jax.monitor` (no JAX, cheap to import in a
notebook): `curves` turns it into per-layer arrays in training order; `normalize` divides a curve
by its maximum (Figures 2 and 6); `pearson` correlates accuracy with ΔR across checkpoints
(Table 11); `peak` finds a curve's best checkpoint; `early_stopping` takes the ΔR peak as a
label-free choice of checkpoint and measures its accuracy gap to the best one; `analyse` does all
of it per layer.
"""

import numpy as np

ACCURACIES = ("knn", "linear")
VALUES = ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "delta", "rate", "compressed")


def curves(result: dict) -> dict:
  """`{'step': [n], 'epoch': [n], 'layers': {layer: {value: [n]}}}` in step order.

  `value` ranges over `VALUES`; NaN where a checkpoint lacks it (a signal not measured) and
  for the epoch of a checkpoint saved without one.
  """
  entries = sorted(result["checkpoints"].values(), key=lambda e: e["step"])
  epochs = [np.nan if e.get("epoch") is None else e["epoch"] for e in entries]
  layers = {
    layer: {k: np.array([e["layers"][layer].get(k, np.nan) for e in entries]) for k in VALUES}
    for layer in result["protocol"]["layers"]
  }
  return {
    "step": np.array([e["step"] for e in entries]),
    "epoch": np.array(epochs),
    "layers": layers,
  }


def normalize(values) -> np.ndarray:
  """`values / max(values)`, NaNs ignored (the paper's Figures 2 and 6).

  Raises:
    ValueError: the maximum is not positive (or every value is NaN).
  """
  v = np.asarray(values, np.float64)
  top = np.nanmax(v) if np.any(~np.isnan(v)) else np.nan
  if not top > 0:
    raise ValueError(f"normalize needs a positive maximum; got {top} for {v}")
  return v / top


def pearson(x, y) -> float:
  """Pearson's r of two curves `[n]`: `Σ(x−x̄)(y−ȳ) / sqrt(Σ(x−x̄)² · Σ(y−ȳ)²)` (Table 11).

  NaN when `n < 2`, either curve is constant or holds a NaN (r is undefined there).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"pearson expects two curves of the same length [n], got {x.shape}, {y.shape}")
  if x.size < 2:
    return float("nan")
  dx, dy = x - x.mean(), y - y.mean()
  denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
  return float(np.sum(dx * dy) / denominator) if denominator > 0 else float("nan")


def peak(values) -> int:
  """Index of the first maximum of a curve `[n]`, NaNs ignored; a `ValueError` if all are NaN."""
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or not np.any(~np.isnan(v)):
    raise ValueError(f"peak needs a curve [n] with a value that is not NaN, got {v}")
  return int(np.nanargmax(v))


def early_stopping(delta, accuracy) -> dict:
  """The ΔR peak as a label-free choice of checkpoint, and its accuracy against the best one.

  Args:
    delta: ΔR per checkpoint `[n]`, in training order.
    accuracy: test accuracy per checkpoint `[n]` (only to judge the choice).

  Returns:
    `{'chosen', 'best', 'final'}`: checkpoint indices (the ΔR peak, the accuracy peak, the last
    one) and `{'chosen_accuracy', 'best_accuracy', 'final_accuracy'}` with
    `'gap' = best_accuracy − chosen_accuracy` (>= 0; 0 when ΔR picks the best checkpoint).
  """
  delta, accuracy = np.asarray(delta, np.float64), np.asarray(accuracy, np.float64)
  if delta.shape != accuracy.shape:
    raise ValueError(f"delta {delta.shape} and accuracy {accuracy.shape} must have one shape")
  chosen, best, final = peak(delta), peak(accuracy), len(delta) - 1
  return dict(
    chosen=chosen,
    best=best,
    final=final,
    chosen_accuracy=float(accuracy[chosen]),
    best_accuracy=float(accuracy[best]),
    final_accuracy=float(accuracy[final]),
    gap=float(accuracy[best] - accuracy[chosen]),
  )


def analyse(result: dict) -> dict:
  """Per layer: the curves' peaks, Pearson's r of each accuracy with ΔR, the ΔR stopping choice.

  Returns `{layer: {'peak': {value: index}, 'pearson': {acc: r}, 'early_stopping': {acc: ...}}}`
  over the measured `VALUES` (`'knn_top1'`, `'linear_top1'`, `'delta'`, ...); `acc` is
  `'knn'`/`'linear'` (top-1); indices are positions in `curves(result)`.
  """
  out = {}
  for layer, values in curves(result)["layers"].items():
    measured = {k: v for k, v in values.items() if np.any(~np.isnan(v))}
    info = {"peak": {k: peak(v) for k, v in measured.items()}, "pearson": {}, "early_stopping": {}}
    for acc in ACCURACIES:
      if f"{acc}_top1" in measured and "delta" in measured:
        info["pearson"][acc] = pearson(measured[f"{acc}_top1"], measured["delta"])
        info["early_stopping"][acc] = early_stopping(measured["delta"], measured[f"{acc}_top1"])
    out[layer] = info
  return out
