"""Paper-style tables and curves over many work dirs: seeds averaged, settings side by side.

`write` reads the work dirs and groups their runs by method, data set and setting
(`umm_jax.run_groups`, which computes every number of a group) and lays the groups out as the
paper's tables (Table 1: baseline, `*`, `**`, `+UMM`; Table 10: `& UMM`, `+ +`; Table 11:
Pearson's r of accuracy and ΔR; a sweep table over the grouping keys) and curves (Figures 1, 2, 5
and 6, one line per group with a ±1 std band, drawn by `umm_jax.plots`) in `summary.md`,
`summary.json` and `plots/`. Work dirs and the output dir may be local or URIs such as
`gs://bucket/summary` (through `etils.epath`).

Every cell is the mean over the runs (seeds) of a group with the sample standard deviation
(ddof = 1) and their number n; n = 1 has no std. In `summary.json` accuracies are fractions
(0.8125 = 81.25%).

  python -m umm_jax.aggregate --out=runs/summary [--keys=umm.alpha] WORKDIR_OR_ROOT...

Each argument is a work dir (it holds `config.json`) or a root searched for them recursively.
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from etils import epath

from umm_jax import evaluate, plots, report, run_groups, umm

SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"
TABLE1 = ("baseline", *(umm.VARIANT_LABELS[v] for v in ("no_rate", "no_js", "umm")))
TABLE10 = ("baseline", *(umm.VARIANT_LABELS[v] for v in ("interleaved", "joint", "umm")))
ENCODERS = ("baseline", *umm.VARIANT_LABELS.values())
PAPER_PROTOCOLS = {"linear": "linear", "knn_k5": "5-NN"}  # evaluation.json name: paper's name
PLOTS = ("accuracy.png", "rate_reduction.png", "umm.png", report.CORRELATION_PNG)
CONVENTION = (
  "Every cell is `mean ± std (n = k)`: the mean over the k runs (seeds) of its group and their "
  "sample standard deviation (ddof = 1); n = 1 shows the single value, without ±. Runs lacking a "
  "value are left out of its n."
)


# ----------------------------------------------------------------------------- work dirs


def find(paths: Sequence[str | os.PathLike]) -> list[epath.Path]:
  """Work dirs: each path with `config.json`, else those below it (a `ValueError` if none)."""
  found = []
  for path in map(epath.Path, paths):
    if (path / report.CONFIG_FILE).is_file():
      found.append(path)
      continue
    below = _workdirs_below(path)
    if not below:
      raise ValueError(f"{path}: no {report.CONFIG_FILE} in it or below it (no work dir)")
    found += below
  return found


def _workdirs_below(path: epath.Path) -> list[epath.Path]:
  """The dirs below `path` that hold `config.json`, in path order.

  Listed dir by dir: epath's `rglob` takes no `**` and its `walk` loses a URI's scheme.
  """
  found = []
  for child in sorted(path.iterdir()) if path.is_dir() else []:
    if child.is_dir():
      if (child / report.CONFIG_FILE).is_file():
        found.append(child)
      found += _workdirs_below(child)
  return found


# ----------------------------------------------------------------------------- tables

_EMPTY = dict(evaluation={}, change={}, pearson={})


def _rows(groups: Sequence[run_groups.Group], summaries: Sequence[dict]):
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
      line = [method, *(run_groups.value_text(v) for _, v in setting), encoder]
      for s in found:
        for name in PAPER_PROTOCOLS:
          line.append(s["evaluation"].get(encoder, {}).get(name, run_groups.MISSING).cell())
          change = s["change"].get(encoder, {}).get(name, run_groups.MISSING).cell(sign="+")
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
    line = [method, *(run_groups.value_text(v) for _, v in setting)]
    for s in found:
      line += [
        s["pearson"].get(acc, run_groups.MISSING).cell(scale=1.0, digits=3)
        for acc in plots.ACCURACY_LABELS
      ]
    lines.append(line)
  header = ["method", *keys]
  header += [
    f"{d}: r({name} top-1, ΔR)" for d in datasets for name in plots.ACCURACY_LABELS.values()
  ]
  return report.table(header, lines)


def sweep_table(groups, summaries, keys: Sequence[str]) -> str:
  """One row per group (its setting); one column per encoder and `evaluation.json` protocol."""
  found = [s["evaluation"] for s in summaries]
  protocols = dict.fromkeys(p for f in found for by_protocol in f.values() for p in by_protocol)
  columns = [(e, p) for e in ENCODERS for p in protocols if any(p in f.get(e, {}) for f in found)]
  lines = [
    [g.method, g.dataset, *(run_groups.value_text(v) for _, v in g.setting)]
    + [f.get(e, {}).get(p, run_groups.MISSING).cell() for e, p in columns]
    for g, f in zip(groups, found, strict=True)
  ]
  header = ["method", "data", *keys, *(f"{e}: {p} top-1 (%)" for e, p in columns)]
  return report.table(header, lines)


def evaluation_protocols(runs: Sequence[run_groups.Run]) -> str:
  """The layer and protocol of the `evaluation.json` numbers, as the first run records them."""
  protocols, layers = {}, set()
  for run in runs:
    for entry in (run.evaluation or {}).values():
      layers.add(list(entry["layers"])[-1])
      for name, r in run_groups.last_layer_results(entry).items():
        protocols.setdefault(name, {k: v for k, v in r["protocol"].items() if k != "layer"})
  lines = [f"- {name}: {report.items(p)}" for name, p in protocols.items()]
  layer = ", ".join(f"`{x}`" for x in sorted(layers))
  head = f"Test top-1 of each encoder's last checkpoint, layer {layer} (`{evaluate.RESULTS_FILE}`):"
  return head + "\n\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- curves


def _labels(groups: Sequence[run_groups.Group]) -> list[str]:
  """Legend labels: what tells the groups apart (method, data set, key values), and n."""
  parts = [
    [g.method, g.dataset, *(f"{k} = {run_groups.value_text(v)}" for k, v in g.setting)]
    for g in groups
  ]
  differ = [len(set(column)) > 1 for column in zip(*parts, strict=True)]
  named = [", ".join(p for p, d in zip(ps, differ, strict=True) if d) for ps in parts]
  return [
    f"{name or 'all runs'} (n = {len(g.runs)})" for name, g in zip(named, groups, strict=True)
  ]


def plot_curves(groups, summaries, plots_dir: epath.Path) -> dict[str, str]:
  """Figures 1, 2, 5 and 6 over the groups; `{file name: link}` of those drawn."""
  args = (_labels(groups), summaries)
  layers = list(dict.fromkeys(la for s in summaries for la in s["curves"]["pretrain"]))
  variants = [v for v in umm.VARIANTS if any(v in s["curves"]["umm"] for s in summaries)]
  drawn = {
    "accuracy.png": plots.plot_mean_accuracy(*args, layers, plots_dir / "accuracy.png"),
    "rate_reduction.png": plots.plot_mean_rate_reduction(
      *args, layers, plots_dir / "rate_reduction.png"
    ),
    "umm.png": plots.plot_mean_umm(*args, variants, plots_dir / "umm.png"),
    report.CORRELATION_PNG: plots.plot_mean_correlation(*args, plots_dir / report.CORRELATION_PNG),
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
  ignored = " and ".join(f"`{k}`" for k in run_groups.IGNORED)
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


def markdown(runs, groups, summaries, keys: Sequence[str], detected: bool, plots_dir) -> str:
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
  drawn = plot_curves(groups, summaries, plots_dir)
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
  if isinstance(obj, run_groups.Stat):
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
    workdirs=[str(r.workdir) for r in runs], group_by=[*run_groups.BY, *keys],
    keys_detected=detected, convention=CONVENTION,
    units="accuracies and changes as fractions; Pearson's r as is", groups=entries,
  )  # fmt: skip


def write(
  workdirs: Sequence[str | os.PathLike],
  output_dir: str | os.PathLike,
  *,
  keys: Sequence[str] | None = None,
) -> epath.Path:
  """Writes `summary.md`, `summary.json` and `plots/*.png` in `output_dir`; returns `summary.md`.

  Groups by method, data set and `keys` (flattened config keys; None: those that differ between
  runs of one method and data set, `run_groups.IGNORED` aside); seeds are averaged.
  """
  runs = run_groups.collect(workdirs)
  if not runs:
    raise ValueError("aggregate.write needs at least one work dir")
  chosen = run_groups.grouping_keys(runs, keys)
  groups = run_groups.group(runs, chosen)
  summaries = [run_groups.summarize(g) for g in groups]
  out = epath.Path(output_dir)
  plots_dir = out / report.PLOTS_DIR
  plots_dir.mkdir(parents=True, exist_ok=True)
  for name in PLOTS:  # a rerun over other runs leaves no stale figure
    (plots_dir / name).unlink(missing_ok=True)
  detected = keys is None
  path = out / SUMMARY_MD
  path.write_text(markdown(runs, groups, summaries, chosen, detected, plots_dir))
  numbers = to_json(runs, groups, summaries, chosen, detected)
  (out / SUMMARY_JSON).write_text(
    json.dumps(numbers, indent=2, allow_nan=False, ensure_ascii=False)
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
