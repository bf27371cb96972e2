"""Every figure the report and the aggregate draw: PNGs of `FIGSIZE` inches at `DPI`.

Figures are matplotlib `Figure`s on the Agg canvas (no display; pyplot's global state is left
alone), rendered into memory and written with `etils.epath`, so a work dir on a bucket
(`gs://...`) takes them as a local one does. Each `plot_*` function writes one PNG and returns
its link from the markdown file beside the PNG's folder (`plots/<name>.png`).

One run (`umm_jax.report`, whose docstring lists its figures): `plot_pretrain`, `plot_accuracy`
(paper Fig. 1), `plot_rate_reduction` (Fig. 2), `plot_correlation` (Fig. 6), `plot_pearson`
(Table 11), `plot_cost` (Table 9) and `plot_umm` (Fig. 5).

Groups of runs (`umm_jax.aggregate`), one line per group: the mean over its runs with a ±1 std
band, from the curves of `run_groups.summarize`: `plot_mean_accuracy` (Fig. 1),
`plot_mean_rate_reduction` (Fig. 2), `plot_mean_umm` (Fig. 5), `plot_mean_correlation` (Fig. 6).
"""

import io
import math
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np
from etils import epath
from matplotlib.figure import Figure

from umm_jax import overfitting, umm

FIGSIZE = (10, 6)  # inches; at DPI, every PNG is 1000 x 600 pixels
DPI = 100
ACCURACY_LABELS = {"knn": "kNN", "linear": "linear"}  # how figures and tables name each accuracy


def figure(title: str, nrows: int = 1, ncols: int = 1):
  fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
  fig.suptitle(title, fontsize=13)
  return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def save(fig: Figure, path: epath.Path) -> str:
  """Writes `fig` as a PNG at `path` (local or a URI); returns its link from the folder above."""
  buffer = io.BytesIO()  # matplotlib opens local files only: render here, write through epath
  fig.savefig(buffer, format="png", dpi=DPI)  # no bbox_inches='tight': the size stays FIGSIZE x DPI
  path.write_bytes(buffer.getvalue())
  return f"{path.parent.name}/{path.name}"


def normalized(values: np.ndarray) -> np.ndarray:
  """`values` divided by their maximum (`overfitting.normalize`); NaN where nothing is measured."""
  try:
    return overfitting.normalize(values)
  except ValueError:  # nothing measured, or no positive value: nothing to draw
    return np.full(values.shape, np.nan)


def x_axis(curves: dict) -> tuple[np.ndarray, str]:
  """The checkpoints' epochs and 'epoch' of `overfitting.curves`; steps and 'step' if one lacks
  its epoch."""
  epochs = curves["epoch"]
  return (epochs, "epoch") if not np.any(np.isnan(epochs)) else (curves["step"], "step")


def _style(ax, x: np.ndarray) -> None:
  ax.grid(alpha=0.3)
  if len(x) <= 12:  # few checkpoints: a tick at each, not at fractional epochs
    ax.set_xticks(x)


def _layer_colors(n: int):
  """Early to late layers: dark purple to green along viridis (its light yellow end left out)."""
  return [matplotlib.colormaps["viridis"](0.85 * i / max(n - 1, 1)) for i in range(n)]


def _r_text(value) -> str:
  return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


# ----------------------------------------------------------------------------- one run


def plot_pretrain(train: list[dict], test: list[dict], path: epath.Path) -> str:
  fig, (loss_ax, acc_ax) = figure("Pre-training", 1, 2)
  loss_ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], color="tab:blue")
  loss_ax.set(title="SSL loss (train)", xlabel="epoch", ylabel="loss")
  epochs, top1 = [r["epoch"] for r in test], [100 * r["probe_top1"] for r in test]
  acc_ax.plot(epochs, top1, "o-", color="tab:green", label="online probe top-1")
  acc_ax.set(title="Online linear probe (test)", xlabel="epoch", ylabel="top-1 accuracy (%)")
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
  loss_ax.legend(["train loss"])
  acc_ax.legend()
  return save(fig, path)


def plot_accuracy(curves: dict, accuracies: list[str], path: epath.Path) -> str:
  x, xlabel = x_axis(curves)
  fig, axes = figure("Test accuracy per layer across checkpoints", 1, len(accuracies))
  colors = _layer_colors(len(curves["layers"]))
  for ax, acc in zip(axes, accuracies, strict=True):
    for color, (layer, values) in zip(colors, curves["layers"].items(), strict=True):
      ax.plot(x, 100 * values[f"{acc}_top1"], "o-", color=color, label=layer)
    title = f"{ACCURACY_LABELS[acc]} top-1"
    ax.set(title=title, xlabel=xlabel, ylabel="test top-1 accuracy (%)")
    _style(ax, x)
    ax.legend(title="layer")
  return save(fig, path)


def plot_rate_reduction(curves: dict, path: epath.Path) -> str:
  x, xlabel = x_axis(curves)
  fig, (ax,) = figure("Label-free ΔR per layer across checkpoints (divided by its maximum)")
  layers = curves["layers"]
  for color, (layer, values) in zip(_layer_colors(len(layers)), layers.items(), strict=True):
    ax.plot(x, normalized(values["delta"]), "s-", color=color, label=layer)
  ax.set(xlabel=xlabel, ylabel="ΔR / max ΔR")
  _style(ax, x)
  ax.legend(title="layer")
  return save(fig, path)


def plot_correlation(curves: dict, analysis: dict, accuracies, path: epath.Path) -> str:
  x, xlabel = x_axis(curves)
  layers = list(curves["layers"])
  title = "Accuracy and ΔR across checkpoints (each divided by its maximum)"
  fig, axes = figure(title, -(-len(layers) // 2), min(len(layers), 2))
  styles = {"knn": ("o-", "tab:blue"), "linear": ("^--", "tab:orange")}
  for ax, layer in zip(axes, layers, strict=False):
    values, pearson = curves["layers"][layer], analysis[layer]["pearson"]
    for acc in accuracies:
      marker, color = styles[acc]
      y = normalized(values[f"{acc}_top1"])
      ax.plot(x, y, marker, color=color, label=f"{ACCURACY_LABELS[acc]} top-1")
    ax.plot(x, normalized(values["delta"]), "s:", color="tab:green", label="ΔR")
    r = ", ".join(f"r({ACCURACY_LABELS[a]}, ΔR) = {_r_text(pearson[a])}" for a in accuracies)
    ax.set(title=f"{layer}: {r}", xlabel=xlabel, ylabel="value / max")
    _style(ax, x)
    ax.legend(fontsize=8)
  for ax in axes[len(layers) :]:
    ax.set_visible(False)
  return save(fig, path)


def plot_pearson(analysis: dict, accuracies, path: epath.Path) -> str:
  fig, (ax,) = figure("Pearson's r of test accuracy and ΔR across checkpoints (cf. Table 11)")
  layers, width = list(analysis), 0.8 / len(accuracies)
  for i, acc in enumerate(accuracies):
    r = np.array([analysis[layer]["pearson"][acc] for layer in layers])
    offset = (i - (len(accuracies) - 1) / 2) * width
    label = f"{ACCURACY_LABELS[acc]} top-1 vs ΔR"
    bars = ax.bar(np.arange(len(layers)) + offset, np.nan_to_num(r), width, label=label)
    ax.bar_label(bars, labels=[_r_text(v) for v in r], padding=2)
  ax.axhline(0, color="black", linewidth=0.8)
  ax.set(xticks=range(len(layers)), xticklabels=layers, ylim=(-1.1, 1.15))
  ax.set(xlabel="layer", ylabel="Pearson's r")
  ax.legend()
  return save(fig, path)


def plot_cost(cost: dict, path: epath.Path) -> str:
  fig, (ax,) = figure("Wall-clock cost per checkpoint of each signal (cf. Table 9)")
  names = list(cost)
  bars = ax.barh(names, [cost[n]["median"] for n in names], color="tab:purple")
  ax.bar_label(bars, labels=[f"{cost[n]['median']:.3g} s" for n in names], padding=3)
  ax.set(xlabel="seconds per checkpoint (median over checkpoints)", ylabel="signal")
  ax.invert_yaxis()
  ax.grid(alpha=0.3, axis="x")
  return save(fig, path)


def plot_umm(curves: dict[str, dict], path: epath.Path) -> str:
  """The last layer against UMM epoch per variant, from `report.umm_curves`."""
  title = "Last layer along UMM fine-tuning, per variant (cf. Fig. 5)"
  fig, (acc_ax, delta_ax) = figure(title, 1, 2)
  for color, (variant, c) in zip(_layer_colors(len(curves)), curves.items(), strict=True):
    label, values = umm.VARIANT_LABELS[variant], c["values"]
    for acc, marker in (("knn", "o-"), ("linear", "^--")):
      if np.any(~np.isnan(values[f"{acc}_top1"])):
        y = 100 * values[f"{acc}_top1"]
        name = f"{label}: {ACCURACY_LABELS[acc]}"
        acc_ax.plot(c["epoch"], y, marker, color=color, label=name)
    delta_ax.plot(c["epoch"], values["delta"], "s-", color=color, label=label)
  layer = next(iter(curves.values()))["layer"]
  acc_ax.set(title=f"{layer}: test top-1", xlabel="UMM epoch", ylabel="test top-1 accuracy (%)")
  delta_ax.set(title=f"{layer}: label-free ΔR", xlabel="UMM epoch", ylabel="ΔR")
  epochs = np.unique(np.concatenate([c["epoch"] for c in curves.values()]))
  for ax in (acc_ax, delta_ax):
    _style(ax, epochs)
    ax.legend(fontsize=8)
  return save(fig, path)


# ----------------------------------------------------------------------------- groups of runs
# `labels` name the groups in the legends; `summaries` are their `run_groups.summarize` dicts.


def _measured(stat: dict) -> bool:
  return bool(np.any(~np.isnan(stat["mean"])))


def _draw(title: str, panels: list, path: epath.Path, ncols: int) -> str | None:
  """Panels `(title, xlabel, ylabel, lines)`, each line `(x, {'mean', 'std'}, label, color,
  scale, style)` drawn with a ±1 std band; None (nothing written) when no line is measured."""
  panels = [(*p[:3], [line for line in p[3] if _measured(line[1])]) for p in panels]
  panels = [p for p in panels if p[3]]
  if not panels:
    return None
  ncols = min(ncols, len(panels))
  fig, axes = figure(title, -(-len(panels) // ncols), ncols)
  for ax, (name, xlabel, ylabel, lines) in zip(axes, panels, strict=False):
    for x, stat, label, color, scale, style in lines:
      mean, std = scale * stat["mean"], scale * stat["std"]
      ax.plot(x, mean, style, color=color, label=label, markersize=4)
      ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
    _style(ax, np.unique(np.concatenate([line[0] for line in lines])))
    ax.legend(fontsize=7)
  for ax in axes[len(panels) :]:
    ax.set_visible(False)
  return save(fig, path)


def _lines(
  labels: Sequence[str],
  summaries: Sequence[dict],
  curves_of: Callable[[dict], dict | None],
  value: str,
  *,
  scale=1.0,
  style="o-",
  suffix="",
) -> list:
  """One line per group: `value` of the group's curves `curves_of(summary)` (None: none)."""
  out = []
  colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(labels))]
  for label, s, color in zip(labels, summaries, colors, strict=True):
    c = curves_of(s)
    if c is not None and value in c["values"]:
      out.append((c["epochs"], c["values"][value], label + suffix, color, scale, style))
  return out


def _pretrain(layer: str | None = None) -> Callable[[dict], dict | None]:
  """The pre-training curves of `layer` (None: the last monitored layer) of a summary."""

  def get(s: dict) -> dict | None:
    curves = s["curves"]["pretrain"]
    if layer is None:
      return list(curves.values())[-1] if curves else None
    return curves.get(layer)

  return get


def plot_mean_accuracy(labels, summaries, layers: list[str], path: epath.Path) -> str | None:
  panels = [
    (f"{layer}: {name} top-1", "pre-training epoch", "test top-1 (%)", lines)
    for acc, name in ACCURACY_LABELS.items()
    for layer in layers
    for lines in [_lines(labels, summaries, _pretrain(layer), f"{acc}_top1", scale=100.0)]
  ]
  title = "Test accuracy per layer across pre-training (cf. Fig. 1)"
  return _draw(title, panels, path, len(layers))


def plot_mean_rate_reduction(labels, summaries, layers: list[str], path: epath.Path) -> str | None:
  panels = [
    (layer, "pre-training epoch", "ΔR / max ΔR", lines)
    for layer in layers
    for lines in [_lines(labels, summaries, _pretrain(layer), "delta/max")]
  ]
  return _draw("Label-free ΔR per layer divided by its maximum (cf. Fig. 2)", panels, path, 2)


def plot_mean_umm(labels, summaries, variants: list[str], path: epath.Path) -> str | None:
  values = {"knn_top1": ("kNN top-1", "test top-1 (%)", 100.0), "delta": ("ΔR", "ΔR", 1.0)}
  values["linear_top1"] = ("linear top-1", "test top-1 (%)", 100.0)
  panels = [
    (f"{umm.VARIANT_LABELS[v]}: {what}", "UMM epoch", ylabel, lines)
    for value, (what, ylabel, scale) in values.items()
    for v in variants
    for lines in [
      _lines(labels, summaries, lambda s, v=v: s["curves"]["umm"].get(v), value, scale=scale)
    ]
  ]
  return _draw("Last layer along UMM fine-tuning (cf. Fig. 5)", panels, path, len(variants))


def plot_mean_correlation(labels, summaries, path: epath.Path) -> str | None:
  last, panels = _pretrain(), []
  for acc, name in ACCURACY_LABELS.items():
    lines = _lines(labels, summaries, last, f"{acc}_top1/max", suffix=f": {name}")
    lines += _lines(labels, summaries, last, "delta/max", style="s--", suffix=": ΔR")
    panels.append((f"last layer: {name} top-1 and ΔR", "pre-training epoch", "value / max", lines))
  return _draw("Accuracy and ΔR, each divided by its maximum (cf. Fig. 6)", panels, path, 2)
