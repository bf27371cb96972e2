"""Work dirs read, grouped by setting, and each group's numbers averaged over its runs (seeds).

`collect` reads work dirs written by `python -m umm_jax.main` (local or URIs such as
`gs://bucket/run`, through `etils.epath`): `config.json` and, where present, `monitor.json`,
`evaluation.json` and `umm/<variant>/monitor.json`. `group` puts together the runs of one method
(`method.name`), data set (`data.name`) and setting: the values of the grouping keys, flattened
config keys such as `umm.alpha` (`grouping_keys`: by default every key whose value differs between
runs of one method and data set, `IGNORED` aside). `summarize` gives every aggregated number of a
group, which `umm_jax.aggregate` lays out as tables, curves and `summary.json`.

Every aggregated number is a `Stat`: the mean over the runs of a group, the sample standard
deviation (ddof = 1) and their number n; n = 1 has no std. A run without a value (a stage not
run, an undefined Pearson's r) is left out of that number's n. A group's curves use the epochs
every run of it measured.
"""

import collections
import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from umm_jax import evaluate, monitor, overfitting, plots, report, umm

BY = ("method.name", "data.name")  # every group is one method on one data set
# Never detected as grouping keys: runs that differ only there are averaged. `stages` says what
# ran, not how (a rerun of some stages rewrites config.json with its own list).
IGNORED = ("seed", "stages")


@dataclasses.dataclass(frozen=True)
class Run:
  """One work dir: its flattened config and what its stages measured."""

  workdir: epath.Path
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
    values = ", ".join(f"{k} = {value_text(v)}" for k, v in self.setting)
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


MISSING = Stat(math.nan, math.nan, 0, [])  # a number no run of the group has


def value_text(value) -> str:
  """A config value as text; lists and tuples as JSON."""
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
  for workdir in map(epath.Path, workdirs):
    path = workdir / report.CONFIG_FILE
    if not path.is_file():
      raise ValueError(f"{workdir} holds no {report.CONFIG_FILE}: not a work dir of umm_jax.main")
    config = json.loads(path.read_text())
    results = workdir / evaluate.RESULTS_FILE
    evaluation = json.loads(results.read_text()) if results.exists() else None
    mon = report.read_monitor(workdir / monitor.MONITOR_FILE)
    runs.append(Run(workdir, flatten(config), mon, evaluation, report.umm_curves(workdir)))
  return runs


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
      if key not in IGNORED + BY and len({value_text(f.get(key)) for f in flats}) > 1:
        found[key] = None
  return list(found)


def _order(value) -> tuple:
  number = isinstance(value, int | float) and not isinstance(value, bool)
  return (0, value, "") if number else (1, 0, value_text(value))


def group(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
  """Runs by method, data set and the values of `keys`; sorted, numbers in numeric order."""
  groups = collections.defaultdict(list)
  for run in runs:
    setting = tuple((k, run.flat.get(k)) for k in keys)
    groups[(*(run.flat[k] for k in BY), setting)].append(run)
  order = lambda key: (key[0], key[1], tuple(_order(v) for _, v in key[2]))
  return [Group(*key, tuple(groups[key])) for key in sorted(groups, key=order)]


# ----------------------------------------------------------------------------- numbers


def last_layer_results(entry: dict) -> dict:
  """`{protocol: result}` of an `evaluation.json` encoder at its last evaluated layer, with its
  semi-supervised fine-tuning protocols."""
  return {**list(entry["layers"].values())[-1], **entry.get("semi_supervised", {})}


def evaluation_stats(group: Group) -> tuple[dict, dict]:
  """`{encoder: {protocol: Stat}}` of top-1, and of its change from the same run's baseline."""
  values, change = collections.defaultdict(dict), collections.defaultdict(dict)
  for run in group.runs:
    results = {e: last_layer_results(entry) for e, entry in (run.evaluation or {}).items()}
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
  for name in sorted({"knn_top1", "linear_top1", "delta"} & names):  # summary.json key order
    stacked[f"{name}/max"] = np.array([plots.normalized(row) for row in stacked[name]])
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
