"""Paper-style tables and curves over many work dirs: seeds averaged, settings side by side.

`collect` reads work dirs written by `python -m umm_jax.main` (`config.json`; where present
`monitor.json`, `evaluation.json` and `umm/<variant>/monitor.json`). `group` puts together the
runs of one method (`method.name`), data set (`data.name`) and setting: the values of the
grouping keys, flattened config keys such as `umm.alpha` (by default every key whose value
differs between runs of one method and data set, `seed` and `stages` aside). `write` lays the
groups out as the paper's tables (Table 1: baseline, `*`, `**`, `+UMM`; Table 10: `& UMM`,
`+ +`; Table 11: Pearson's r of accuracy and ΔR; a sweep table over the grouping keys) and
curves (Figures 1, 2, 5 and 6, one line per group with a ±1 std band) in `summary.md`,
`summary.json` and `plots/`.

Every aggregated number is the mean over the runs (seeds) of a group with the sample standard
deviation (ddof = 1) and their number n; n = 1 has no std. A run without a value (a stage not
run, an undefined Pearson's r) is left out of that number's n. A group's curves use the epochs
every run of it measured. In `summary.json` accuracies are fractions (0.8125 = 81.25%).

  python -m umm_jax.aggregate --out=runs/summary [--keys=umm.alpha] WORKDIR_OR_ROOT...

Each argument is a work dir (it holds `config.json`) or a root searched for them recursively.
"""

import collections
import dataclasses
import functools
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from absl import app, flags

from umm_jax import evaluate, monitor, overfitting, report, umm

SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"
BY = ("method.name", "data.name")  # every group is one method on one data set
# Never detected as grouping keys: runs that differ only there are averaged. `stages` says what
# ran, not how (a rerun of some stages rewrites config.json with its own list).
IGNORED = ("seed", "stages")
TABLE1 = ("baseline", *(umm.VARIANT_LABELS[v] for v in ("no_rate", "no_js", "umm")))
TABLE10 = ("baseline", *(umm.VARIANT_LABELS[v] for v in ("interleaved", "joint", "umm")))
ENCODERS = ("baseline", *umm.VARIANT_LABELS.values())
PAPER_PROTOCOLS = {"linear": "linear", "knn_k5": "5-NN"}  # evaluation.json name: paper's name
ACCURACIES = {"knn": "kNN", "linear": "linear"}
PLOTS = ("accuracy.png", "rate_reduction.png", "umm.png", report.CORRELATION_PNG)
CONVENTION = (
  "Every cell is `mean ± std (n = k)`: the mean over the k runs (seeds) of its group and their "
  "sample standard deviation (ddof = 1); n = 1 shows the single value, without ±. Runs lacking a "
  "value are left out of its n."
)


@dataclasses.dataclass(frozen=True)
class Run:
  """One work dir: its flattened config and what its stages measured."""

  workdir: pathlib.Path
  flat: dict[str, Any]  # config.json, flattened
  monitor: dict | None  # monitor.json, None if absent or empty
  evaluation: dict | None  # evaluation.json
  umm: dict[str, dict]  # report.umm_curves: {variant: last layer's curves against UMM epoch}


@dataclasses.dataclass(frozen=True)
class Group:
  """The runs of one method, data set and setting (`(key, value)` of each grouping key)."""

  method: str
  dataset: str
  setting: tuple[tuple[str, Any], ...]
  runs: tuple[Run, ...]

  @property
  def name(self) -> str:
    values = ", ".join(f"{k} = {_text(v)}" for k, v in self.setting)
    return f"{self.method} / {self.dataset}" + (f", {values}" if values else "")


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean, sample std (ddof = 1; NaN for n < 2) and n of one number over runs, and their dirs."""

  mean: float
  std: float
  n: int
  workdirs: list[str]

  @classmethod
  def of(cls, values: dict[str, float]) -> "Stat":
    """From `{workdir: value}`; NaN values are left out."""
    kept = {w: v for w, v in values.items() if not math.isnan(v)}
    x = np.array(list(kept.values()), np.float64)
    mean = float(x.mean()) if x.size else math.nan
    return cls(mean, float(x.std(ddof=1)) if x.size > 1 else math.nan, x.size, list(kept))

  def cell(self, scale: float = 100.0, digits: int = 2, sign: str = "") -> str:
    if not self.n:
      return "n/a"
    text = f"{scale * self.mean:{sign}.{digits}f}"
    return text + (f" ± {scale * self.std:.{digits}f}" if self.n > 1 else "") + f" (n = {self.n})"


_NONE = Stat(math.nan, math.nan, 0, [])


def _text(value) -> str:
  return json.dumps(value, ensure_ascii=False) if isinstance(value, list | tuple) else str(value)


# ----------------------------------------------------------------------------- reading


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
  """`{'a.b.c': value}` of a nested dict; lists become tuples (values are compared and hashed)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def collect(workdirs: Sequence[str | os.PathLike]) -> list[Run]:
  """Reads each work dir; a `ValueError` names a dir without `config.json`."""
  runs = []
  for workdir in map(pathlib.Path, workdirs):
    path = workdir / report.CONFIG_FILE
    if not path.is_file():
      raise ValueError(f"{workdir} holds no {report.CONFIG_FILE}: not a work dir of umm_jax.main")
    config = json.loads(path.read_text())
    results = workdir / evaluate.RESULTS_FILE
    evaluation = json.loads(results.read_text()) if results.exists() else None
    mon = report.read_monitor(workdir / monitor.MONITOR_FILE)
    runs.append(Run(workdir, flatten(config), mon, evaluation, report.umm_curves(workdir)))
  return runs


def find(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
  """Work dirs: each path with `config.json`, else those below it (a `ValueError` if none)."""
  found = []
  for path in map(pathlib.Path, paths):
    if (path / report.CONFIG_FILE).is_file():
      found.append(path)
      continue
    below = sorted(p.parent for p in path.rglob(report.CONFIG_FILE))
    if not below:
      raise ValueError(f"{path}: no {report.CONFIG_FILE} in it or below it (no work dir)")
    found += below
  return found


# ----------------------------------------------------------------------------- grouping


def grouping_keys(runs: Sequence[Run], keys: Sequence[str] | None = None) -> list[str]:
  """`keys` (each checked to be in every config), or those whose values differ between runs of
  one method and data set, in config order, `IGNORED` and `BY` left out."""
  if keys is not None:
    for key in keys:
      for run in runs:
        if key not in run.flat:
          raise ValueError(f"grouping key {key!r} is not in {run.workdir / report.CONFIG_FILE}")
    return list(keys)
  cells = collections.defaultdict(list)
  for run in runs:
    cells[tuple(run.flat[k] for k in BY)].append(run.flat)
  found = {}
  for flats in cells.values():
    for key in dict.fromkeys(k for flat in flats for k in flat):
      if key not in IGNORED + BY and len({_text(f.get(key)) for f in flats}) > 1:
        found[key] = None
  return list(found)


def _order(value) -> tuple:
  number = isinstance(value, int | float) and not isinstance(value, bool)
  return (0, value, "") if number else (1, 0, _text(value))


def group(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
  """Runs by method, data set and the values of `keys`; sorted, numbers in numeric order."""
  groups = collections.defaultdict(list)
  for run in runs:
    setting = tuple((k, run.flat.get(k)) for k in keys)
    groups[(*(run.flat[k] for k in BY), setting)].append(run)
  order = lambda key: (key[0], key[1], tuple(_order(v) for _, v in key[2]))
  return [Group(*key, tuple(groups[key])) for key in sorted(groups, key=order)]


# ----------------------------------------------------------------------------- numbers


def _results(entry: dict) -> dict:
  """`{protocol: result}` of an `evaluation.json` encoder at its last evaluated layer, with its
  semi-supervised fine-tuning protocols."""
  return {**list(entry["layers"].values())[-1], **entry.get("semi_supervised", {})}


def evaluation_stats(group: Group) -> tuple[dict, dict]:
  """`{encoder: {protocol: Stat}}` of top-1, and of its change from the same run's baseline."""
  values, change = collections.defaultdict(dict), collections.defaultdict(dict)
  for run in group.runs:
    results = {e: _results(entry) for e, entry in (run.evaluation or {}).items()}
    base = results.get("baseline", {})
    for encoder, by_protocol in results.items():
      for name, r in by_protocol.items():
        values[(encoder, name)][str(run.workdir)] = r["top1"]
        if encoder != "baseline" and name in base:
          change[(encoder, name)][str(run.workdir)] = r["top1"] - base[name]["top1"]
  nest = lambda stats: {
    e: {p: Stat.of(stats[(e2, p)]) for e2, p in stats if e2 == e}
    for e in dict.fromkeys(e for e, _ in stats)
  }
  return nest(values), nest(change)


def pearson_stats(group: Group) -> dict:
  """`{'knn' | 'linear': Stat}` of each run's Pearson's r of accuracy and ΔR at its last
  monitored layer (`'layers'`: their names), as each run's report (`overfitting.analyse`)."""
  values, layers = collections.defaultdict(dict), set()
  for run in group.runs:
    if run.monitor is not None:
      layers.add(layer := run.monitor["protocol"]["layers"][-1])
      for acc, r in overfitting.analyse(run.monitor)[layer]["pearson"].items():
        values[acc][str(run.workdir)] = r
  return {"layers": sorted(layers), **{acc: Stat.of(v) for acc, v in values.items()}}


def mean_curves(series: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]) -> dict:
  """Mean and std over runs of curves `{workdir: (epochs [n], {value: [n]})}` at the epochs
  every run has (`'left_out_epochs'`: the others). `'knn_top1'`, `'linear_top1'` and `'delta'`
  also come divided by their maximum over those epochs, per run (`'<value>/max'`)."""
  measured = [e[~np.isnan(e)] for e, _ in series.values()]
  epochs, every = functools.reduce(np.intersect1d, measured), np.unique(np.concatenate(measured))
  names = functools.reduce(set.intersection, [set(v) for _, v in series.values()])
  stacked = {}
  for name in sorted(names):
    rows = []
    for e, values in series.values():
      index = {float(x): i for i, x in enumerate(e)}
      rows.append(values[name][[index[float(x)] for x in epochs]])
    stacked[name] = np.array(rows).reshape(len(series), len(epochs))
  for name in {"knn_top1", "linear_top1", "delta"} & names:
    stacked[f"{name}/max"] = np.array([report.normalized(row) for row in stacked[name]])
  n = len(series)
  return dict(
    epochs=epochs,
    left_out_epochs=np.setdiff1d(every, epochs),
    n=n,
    workdirs=list(series),
    values={
      name: dict(mean=v.mean(0), std=v.std(0, ddof=1) if n > 1 else np.full(v.shape[1:], np.nan))
      for name, v in stacked.items()
    },
  )


def group_curves(group: Group) -> dict:
  """`{'pretrain': {layer: mean_curves}, 'umm': {variant: mean_curves}}` of the group's runs."""
  pretrain = collections.defaultdict(dict)
  for run in group.runs:
    if run.monitor is not None:
      curves = overfitting.curves(run.monitor)
      for layer, values in curves["layers"].items():
        pretrain[layer][str(run.workdir)] = (curves["epoch"], values)
  variants = collections.defaultdict(dict)
  for run in group.runs:
    for variant, c in run.umm.items():
      variants[variant][str(run.workdir)] = (c["epoch"], c["values"])
  return dict(
    pretrain={layer: mean_curves(s) for layer, s in pretrain.items()},
    umm={v: mean_curves(variants[v]) for v in umm.VARIANTS if v in variants},
  )


def summarize(group: Group) -> dict:
  """Every aggregated number of a group."""
  values, change = evaluation_stats(group)
  return dict(
    evaluation=values, change=change, pearson=pearson_stats(group), curves=group_curves(group)
  )


# ----------------------------------------------------------------------------- tables

_EMPTY = dict(evaluation={}, change={}, pearson={})


def _rows(groups: Sequence[Group], summaries: Sequence[dict]):
  """`(method, setting, [summary or _EMPTY per data set])` rows, and the data sets (columns)."""
  datasets = list(dict.fromkeys(g.dataset for g in groups))
  cells = {(g.method, g.setting, g.dataset): s for g, s in zip(groups, summaries, strict=True)}
  keys = dict.fromkeys((g.method, g.setting) for g in groups)
  rows = [(m, st, [cells.get((m, st, d), _EMPTY) for d in datasets]) for m, st in keys]
  return rows, datasets


def encoder_table(groups, summaries, encoders: Sequence[str], keys: Sequence[str]) -> str:
  """Rows: method × setting × encoder (those some run evaluated); columns: data set × paper
  protocol (`PAPER_PROTOCOLS`), top-1 and its change from the same runs' baseline (Table 1)."""
  rows, datasets = _rows(groups, summaries)
  lines = []
  for method, setting, found in rows:
    for encoder in encoders:
      if not any(p in s["evaluation"].get(encoder, {}) for s in found for p in PAPER_PROTOCOLS):
        continue
      line = [method, *(_text(v) for _, v in setting), encoder]
      for s in found:
        for name in PAPER_PROTOCOLS:
          line.append(s["evaluation"].get(encoder, {}).get(name, _NONE).cell())
          change = s["change"].get(encoder, {}).get(name, _NONE).cell(sign="+")
          line.append("-" if encoder == "baseline" else change)
      lines.append(line)
  header = ["method", *keys, "encoder"]
  for dataset in datasets:
    for name in PAPER_PROTOCOLS.values():
      header += [f"{dataset}: {name} top-1 (%)", f"{dataset}: {name} change (points)"]
  return report.table(header, lines)


def pearson_table(groups, summaries, keys: Sequence[str]) -> str:
  """Rows: method × setting; columns: data set × accuracy: Pearson's r with ΔR (Table 11)."""
  rows, datasets = _rows(groups, summaries)
  lines = []
  for method, setting, found in rows:
    line = [method, *(_text(v) for _, v in setting)]
    for s in found:
      line += [s["pearson"].get(acc, _NONE).cell(scale=1.0, digits=3) for acc in ACCURACIES]
    lines.append(line)
  header = ["method", *keys]
  header += [f"{d}: r({name} top-1, ΔR)" for d in datasets for name in ACCURACIES.values()]
  return report.table(header, lines)


def sweep_table(groups, summaries, keys: Sequence[str]) -> str:
  """One row per group (its setting); one column per encoder and `evaluation.json` protocol."""
  found = [s["evaluation"] for s in summaries]
  protocols = dict.fromkeys(p for f in found for by_protocol in f.values() for p in by_protocol)
  columns = [(e, p) for e in ENCODERS for p in protocols if any(p in f.get(e, {}) for f in found)]
  lines = [
    [g.method, g.dataset, *(_text(v) for _, v in g.setting)]
    + [f.get(e, {}).get(p, _NONE).cell() for e, p in columns]
    for g, f in zip(groups, found, strict=True)
  ]
  header = ["method", "data", *keys, *(f"{e}: {p} top-1 (%)" for e, p in columns)]
  return report.table(header, lines)


def evaluation_protocols(runs: Sequence[Run]) -> str:
  """The layer and protocol of the `evaluation.json` numbers, as the first run records them."""
  protocols, layers = {}, set()
  for run in runs:
    for entry in (run.evaluation or {}).values():
      layers.add(list(entry["layers"])[-1])
      for name, r in _results(entry).items():
        protocols.setdefault(name, {k: v for k, v in r["protocol"].items() if k != "layer"})
  lines = [f"- {name}: {report.items(p)}" for name, p in protocols.items()]
  layer = ", ".join(f"`{x}`" for x in sorted(layers))
  head = f"Test top-1 of each encoder's last checkpoint, layer {layer} (`{evaluate.RESULTS_FILE}`):"
  return head + "\n\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- curves


def _measured(stat: dict) -> bool:
  return bool(np.any(~np.isnan(stat["mean"])))


def _draw(title: str, panels: list, path: pathlib.Path, ncols: int) -> str | None:
  """Panels `(title, xlabel, ylabel, lines)`, each line `(x, {'mean', 'std'}, label, color,
  scale, style)` drawn with a ±1 std band; None (nothing written) when no line is measured."""
  panels = [(*p[:3], [line for line in p[3] if _measured(line[1])]) for p in panels]
  panels = [p for p in panels if p[3]]
  if not panels:
    return None
  ncols = min(ncols, len(panels))
  fig, axes = report.figure(title, -(-len(panels) // ncols), ncols)
  for ax, (name, xlabel, ylabel, lines) in zip(axes, panels, strict=False):
    for x, stat, label, color, scale, style in lines:
      mean, std = scale * stat["mean"], scale * stat["std"]
      ax.plot(x, mean, style, color=color, label=label, markersize=4)
      ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    epochs = np.unique(np.concatenate([line[0] for line in lines]))
    if len(epochs) <= 12:  # few checkpoints: a tick at each, not at fractional epochs
      ax.set_xticks(epochs)
    ax.legend(fontsize=7)
  for ax in axes[len(panels) :]:
    ax.set_visible(False)
  return report.save(fig, path)


def _labels(groups: Sequence[Group]) -> list[str]:
  """Legend labels: what tells the groups apart (method, data set, key values), and n."""
  parts = [[g.method, g.dataset, *(f"{k} = {_text(v)}" for k, v in g.setting)] for g in groups]
  differ = [len(set(column)) > 1 for column in zip(*parts, strict=True)]
  named = [", ".join(p for p, d in zip(ps, differ, strict=True) if d) for ps in parts]
  return [
    f"{name or 'all runs'} (n = {len(g.runs)})" for name, g in zip(named, groups, strict=True)
  ]


def _lines(pairs, curves_of, value: str, *, scale=1.0, style="o-", suffix="") -> list:
  """One line per group: `value` of the group's curves `curves_of(summary)` (None: none)."""
  out = []
  for label, s, color in pairs:
    c = curves_of(s)
    if c is not None and value in c["values"]:
      out.append((c["epochs"], c["values"][value], label + suffix, color, scale, style))
  return out


def _pretrain(layer: str | None = None):
  """The pre-training curves of `layer` (None: the last monitored layer) of a summary."""

  def get(s: dict) -> dict | None:
    curves = s["curves"]["pretrain"]
    if layer is None:
      return list(curves.values())[-1] if curves else None
    return curves.get(layer)

  return get


def plot_accuracy(pairs, layers: list[str], path: pathlib.Path) -> str | None:
  panels = [
    (f"{layer}: {name} top-1", "pre-training epoch", "test top-1 (%)", lines)
    for acc, name in ACCURACIES.items()
    for layer in layers
    for lines in [_lines(pairs, _pretrain(layer), f"{acc}_top1", scale=100.0)]
  ]
  return _draw(
    "Test accuracy per layer across pre-training (cf. Fig. 1)", panels, path, len(layers)
  )


def plot_rate_reduction(pairs, layers: list[str], path: pathlib.Path) -> str | None:
  panels = [
    (layer, "pre-training epoch", "ΔR / max ΔR", _lines(pairs, _pretrain(layer), "delta/max"))
    for layer in layers
  ]
  return _draw("Label-free ΔR per layer divided by its maximum (cf. Fig. 2)", panels, path, 2)


def plot_umm(pairs, variants: list[str], path: pathlib.Path) -> str | None:
  values = {"knn_top1": ("kNN top-1", "test top-1 (%)", 100.0), "delta": ("ΔR", "ΔR", 1.0)}
  values["linear_top1"] = ("linear top-1", "test top-1 (%)", 100.0)
  panels = [
    (f"{umm.VARIANT_LABELS[v]}: {what}", "UMM epoch", ylabel, lines)
    for value, (what, ylabel, scale) in values.items()
    for v in variants
    for lines in [_lines(pairs, lambda s, v=v: s["curves"]["umm"].get(v), value, scale=scale)]
  ]
  return _draw("Last layer along UMM fine-tuning (cf. Fig. 5)", panels, path, len(variants))


def plot_correlation(pairs, path: pathlib.Path) -> str | None:
  last, panels = _pretrain(), []
  for acc, name in ACCURACIES.items():
    lines = _lines(pairs, last, f"{acc}_top1/max", suffix=f": {name}")
    lines += _lines(pairs, last, "delta/max", style="s--", suffix=": ΔR")
    panels.append((f"last layer: {name} top-1 and ΔR", "pre-training epoch", "value / max", lines))
  return _draw("Accuracy and ΔR, each divided by its maximum (cf. Fig. 6)", panels, path, 2)


def plot_curves(groups, summaries, plots: pathlib.Path) -> dict[str, str]:
  """Figures 1, 2, 5 and 6 over the groups; `{file name: link}` of those drawn."""
  colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(groups))]
  pairs = list(zip(_labels(groups), summaries, colors, strict=True))
  layers = list(dict.fromkeys(la for s in summaries for la in s["curves"]["pretrain"]))
  variants = [v for v in umm.VARIANTS if any(v in s["curves"]["umm"] for s in summaries)]
  drawn = {
    "accuracy.png": plot_accuracy(pairs, layers, plots / "accuracy.png"),
    "rate_reduction.png": plot_rate_reduction(pairs, layers, plots / "rate_reduction.png"),
    "umm.png": plot_umm(pairs, variants, plots / "umm.png"),
    report.CORRELATION_PNG: plot_correlation(pairs, plots / report.CORRELATION_PNG),
  }
  return {name: link for name, link in drawn.items() if link}


# ----------------------------------------------------------------------------- summary


def _epochs_note(groups, summaries) -> str:
  notes = []
  for g, s in zip(groups, summaries, strict=True):
    curves = [("pre-training", k, c) for k, c in s["curves"]["pretrain"].items()]
    curves += [("UMM", umm.VARIANT_LABELS[k], c) for k, c in s["curves"]["umm"].items()]
    for stage, name, c in curves:
      if c["left_out_epochs"].size:
        epochs, left = (", ".join(f"{x:g}" for x in c[k]) for k in ("epochs", "left_out_epochs"))
        notes.append(
          f"- {g.name}, {stage} {name}: epochs {epochs or 'none'}, the ones all its {c['n']} "
          f"runs measured; left out: {left}."
        )
  head = "Each group's curves use the epochs every run of the group measured"
  return head + (":\n\n" + "\n".join(notes) if notes else "; all of its runs measured the same.")


def _groups_section(runs, groups, keys: Sequence[str], detected: bool) -> str:
  named = ", ".join(f"`{k}`" for k in keys) or "no other key"
  ignored = " and ".join(f"`{k}`" for k in IGNORED)
  how = f"found: the keys whose values differ between runs of one method and data set, {ignored} "
  how = "given" if not detected else how + "aside"
  rows = [
    [g.name, len(g.runs), ", ".join(str(r.flat.get("seed")) for r in g.runs)]
    + [", ".join(f"`{r.workdir}`" for r in g.runs)]
    for g in groups
  ]
  return "\n\n".join(
    [
      f"# Summary of {len(runs)} work dirs",
      f"Runs are grouped by `method.name`, `data.name` and {named} ({how}). {CONVENTION}",
      report.table(["group", "n", "seeds", "work dirs"], rows),
    ]
  )


def markdown(runs, groups, summaries, keys: Sequence[str], detected: bool, plots) -> str:
  """`summary.md`: the groups, the paper's tables and the curves."""
  parts = [_groups_section(runs, groups, keys, detected)]
  evaluated = [r for r in runs if r.evaluation]
  args = (groups, summaries)
  if evaluated:
    parts += ["## Baseline, `*`, `**`, `+UMM` (paper Table 1 layout)", evaluation_protocols(runs)]
    parts += [encoder_table(*args, TABLE1, keys), _CHANGE]
    if any(e in r.evaluation for r in evaluated for e in TABLE10[1:3]):
      parts += ["## Baseline, `& UMM`, `+ +`, `+UMM` (paper Table 10 layout)"]
      parts += [encoder_table(*args, TABLE10, keys), _CHANGE]
  else:
    parts += [f"No `{evaluate.RESULTS_FILE}` in any work dir: no Table 1 or Table 10."]
  monitored = [r for r in runs if r.monitor]
  if monitored:
    layers = ", ".join(sorted({f"`{r.monitor['protocol']['layers'][-1]}`" for r in monitored}))
    parts += ["## Pearson's r of accuracy and ΔR (paper Table 11)", pearson_table(*args, keys)]
    parts += [
      f"Per run, Pearson's r across its checkpoints of the test top-1 and the label-free ΔR of "
      f"its last monitored layer ({layers}), as in each run's report; a run with fewer than 2 "
      "checkpoints or a constant curve has no r. Protocol (the first monitored run's):",
      report.protocol_lines(monitored[0].monitor["protocol"]),
    ]
  if keys and evaluated:
    parts += ["## Every protocol per setting (sweep)", sweep_table(*args, keys)]
  drawn = plot_curves(groups, summaries, plots)
  if drawn:
    parts += ["## Curves (paper Figures 1, 2, 5 and 6)", _FIGURES, _epochs_note(*args)]
    parts += [f"![{name}]({link})" for name, link in drawn.items()]
  return "\n\n".join(parts) + "\n"


_FIGURES = (
  "One line per group: the mean over its runs, shaded ±1 std (none for n = 1); protocols as in "
  "Table 11. `accuracy.png` (Fig. 1): kNN and linear test top-1 of each monitored layer against "
  "pre-training epoch. `rate_reduction.png` (Fig. 2): label-free ΔR of each layer, each run's "
  "curve divided by its maximum. `umm.png` (Fig. 5): the last monitored layer against UMM epoch, "
  "per variant; epoch 0 is the pre-trained encoder UMM starts from (the newest checkpoint of "
  "`monitor.json`; not for `& UMM`, which pre-trains from the initial state). "
  "`accuracy_vs_rate_reduction.png` (Fig. 6): accuracy and ΔR of the last layer, each run's "
  "curve divided by its maximum."
)
_CHANGE = (
  "Change: the encoder's top-1 minus the same run's baseline, in points, averaged over the runs "
  "that have both. `*`: UMM without the rate term (α = 0); `**`: without the JS term (β = 0)."
)


def _plain(obj):
  """JSON-ready: `Stat`s as dicts, arrays as lists, NaN as None."""
  if isinstance(obj, Stat):
    obj = dataclasses.asdict(obj)
  if isinstance(obj, dict):
    return {k: _plain(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple | np.ndarray):
    return [_plain(v) for v in obj]
  if isinstance(obj, float | np.floating):
    return None if math.isnan(obj) else float(obj)
  return obj.item() if isinstance(obj, np.generic) else obj


def to_json(runs, groups, summaries, keys: Sequence[str], detected: bool) -> dict:
  """`summary.json`: every aggregated number with its n and work dirs."""
  entries = [
    dict(name=g.name, method=g.method, dataset=g.dataset, setting=dict(g.setting))
    | dict(workdirs=[str(r.workdir) for r in g.runs], seeds=[r.flat.get("seed") for r in g.runs])
    | _plain(s)
    for g, s in zip(groups, summaries, strict=True)
  ]
  return dict(
    workdirs=[str(r.workdir) for r in runs], group_by=[*BY, *keys], keys_detected=detected,
    convention=CONVENTION, units="accuracies and changes as fractions; Pearson's r as is",
    groups=entries,
  )  # fmt: skip


def write(
  workdirs: Sequence[str | os.PathLike],
  output_dir: str | os.PathLike,
  *,
  keys: Sequence[str] | None = None,
) -> pathlib.Path:
  """Writes `summary.md`, `summary.json` and `plots/*.png` in `output_dir`; returns `summary.md`.

  Groups by method, data set and `keys` (flattened config keys; None: those that differ between
  runs of one method and data set, `IGNORED` aside); seeds are averaged.
  """
  runs = collect(workdirs)
  if not runs:
    raise ValueError("aggregate.write needs at least one work dir")
  chosen = grouping_keys(runs, keys)
  groups = group(runs, chosen)
  summaries = [summarize(g) for g in groups]
  out = pathlib.Path(output_dir)
  plots = out / report.PLOTS_DIR
  plots.mkdir(parents=True, exist_ok=True)
  for name in PLOTS:  # a rerun over other runs leaves no stale figure
    (plots / name).unlink(missing_ok=True)
  detected = keys is None
  path = out / SUMMARY_MD
  path.write_text(markdown(runs, groups, summaries, chosen, detected, plots))
  summary = to_json(runs, groups, summaries, chosen, detected)
  (out / SUMMARY_JSON).write_text(
    json.dumps(summary, indent=2, allow_nan=False, ensure_ascii=False)
  )
  return path


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("give the work dirs, or roots to search for them")
  out, keys = flags.FLAGS["out"].value, flags.FLAGS["keys"].value
  if not out:
    raise app.UsageError("--out is required")
  print(f"summary written to {write(find(argv[1:]), out, keys=keys)}")


if __name__ == "__main__":  # flags defined here only: importing the module (sweep) adds none
  flags.DEFINE_string("out", None, "Directory for summary.md, summary.json and plots/.")
  flags.DEFINE_list("keys", None, "Grouping config keys (default: those that differ, seed aside).")
  app.run(main)
