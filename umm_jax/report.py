"""The `report` stage: `report.md` and PNG plots in the work dir, from what earlier stages wrote.

Reads `config.json` (`umm_jax.main`), `metrics.jsonl` (`umm_jax.pretrain`), `monitor.json`
and `umm/<variant>/monitor.json` (`umm_jax.monitor`) and `evaluation.json` (`umm_jax.evaluate`);
a missing file is said so in the report (or, for the UMM monitor and `evaluation.json`, its
section left out), not an error. Writes `report.md` and `plots/*.png` (drawn by `umm_jax.plots`)
in the work dir, local or a URI such as `gs://bucket/run` (through `etils.epath`). Every number
stands beside its protocol.

Figures, one per finding:
- `pretrain.png`: train loss and test top-1 of the online probe per epoch.
- `accuracy.png`: kNN and linear test top-1 of each layer across checkpoints (paper Fig. 1).
- `rate_reduction.png`: ΔR of each layer divided by its maximum (Fig. 2).
- `accuracy_vs_rate_reduction.png`: per layer, accuracy and ΔR divided by their maxima, with
  Pearson's r (Fig. 6).
- `pearson.png`: Pearson's r of accuracy and ΔR per layer (Table 11).
- `cost.png`: seconds per checkpoint of each signal (Table 9).
- `umm.png`: accuracy and ΔR of the last layer against UMM epoch, per variant (Fig. 5).

`umm_jax.aggregate` lays out the same findings over many work dirs with this module's tables and
readers (`table`, `items`, `protocol_lines`, `read_monitor`, `umm_curves`).
"""

import json
import math
import os

import jax
import ml_collections
import numpy as np
from etils import epath

from umm_jax import evaluate, monitor, overfitting, plots, pretrain, umm, umm_stage

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
CONFIG_FILE = "config.json"
# Table 9 of the paper: one V100, CIFAR-10, linear 500 epochs, kNN k = 5.
PAPER_COST = {"linear + features": 92.76, "knn + features": 13.63, "rate_reduction": 4.03}
COST_ROWS = {
  "features": "forward pass of the train and test images (shared by kNN and linear)",
  "knn": "kNN classification of the test set, every layer",
  "linear": "linear-probe training and test, every layer",
  "rate_reduction": "forward pass of the two views and ΔR, every layer",
}
CORRELATION_PNG = "accuracy_vs_rate_reduction.png"
# Every plot the report may draw; a rerun removes them first, so none outlives its data.
PLOTS = ("pretrain.png", "accuracy.png", "rate_reduction.png", CORRELATION_PNG, "pearson.png")
UMM_PNG = "umm.png"
PLOTS += ("cost.png", UMM_PNG)
_BOLD = ("knn_top1", "linear_top1", "delta")  # the curves whose peaks the tables mark


def _pct(value) -> str:
  return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _num(value, digits: int = 4) -> str:
  return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def items(protocol: dict) -> str:
  return "; ".join(f"{k} = {v}" for k, v in protocol.items())


# ----------------------------------------------------------------------------- pre-training


def read_metrics(path: epath.Path) -> tuple[list[dict], list[dict]]:
  """The `train` and `test` records of a `metrics.jsonl`, in file order."""
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "test"]


def pretrain_section(workdir: epath.Path, config: dict | None, plots_dir: epath.Path) -> str:
  path = workdir / pretrain.METRICS_FILE
  if not path.exists():
    return f"## Pre-training\n\nNo `{pretrain.METRICS_FILE}` in the work dir (no pre-training)."
  train, test = read_metrics(path)
  if not test or not train:
    return f"## Pre-training\n\n`{pretrain.METRICS_FILE}` holds no complete epoch yet."
  probe_lr = config["train"]["probe_lr"] if config else "see config"
  dataset = config["data"]["name"] if config else "the"
  rows = []
  for r in test:
    loss = [t["loss"] for t in train if t["step"] <= r["step"]]
    rows.append([r["epoch"], r["step"], _num(loss[-1] if loss else None)])
    rows[-1] += [_pct(r["probe_top1"]), _pct(r.get("probe_top5"))]
  header = ["epoch", "step", "train loss", "probe top-1 (%)", "probe top-5 (%)"]
  return "\n\n".join(
    [
      "## Pre-training",
      f"Protocol: the online linear probe is trained during pre-training on the stop-gradient "
      f"pooled `layer4` embedding of the augmented views (SGD momentum 0.9, lr {probe_lr}) and "
      f"tested on the whole {dataset} test split (non-augmented images). Train loss: the SSL loss "
      "averaged over the last log interval before the epoch's end.",
      f"![pre-training]({plots.plot_pretrain(train, test, plots_dir / 'pretrain.png')})",
      table(header, rows),
    ]
  )


# ----------------------------------------------------------------------------- monitor tables


def protocol_lines(protocol: dict) -> str:
  names = {"knn": "kNN", "linear": "Linear probe", "rate_reduction": "ΔR (label-free)"}
  lines = [f"- Layers: {', '.join(protocol['layers'])}."]
  for key, name in names.items():
    if key in protocol:
      lines.append(f"- {name}: {items(protocol[key])}")
  return "\n".join(lines)


def layer_tables(curves: dict, analysis: dict) -> str:
  """One table per layer: step, epoch, kNN and linear top-1, ΔR; each column's peak in bold."""
  columns = {"knn_top1": ("kNN top-1 (%)", _pct), "linear_top1": ("linear top-1 (%)", _pct)}
  columns.update(delta=("ΔR", _num), rate=("R", _num), compressed=("R^c", _num))
  parts = []
  for layer, values in curves["layers"].items():
    shown = {k: c for k, c in columns.items() if k in analysis[layer]["peak"]}
    rows = []
    for i, (step, epoch) in enumerate(zip(curves["step"], curves["epoch"], strict=True)):
      row = [int(step), f"{epoch:g}"]
      for k, (_, fmt) in shown.items():
        cell = fmt(values[k][i])
        row.append(f"**{cell}**" if k in _BOLD and analysis[layer]["peak"][k] == i else cell)
      rows.append(row)
    header = ["step", "epoch", *(name for name, _ in shown.values())]
    parts.append(f"### {layer}\n\n" + table(header, rows))
  return "\n\n".join(parts)


def correlation_table(analysis: dict, accuracies, count: int) -> str:
  rows = [
    [layer] + [_num(info["pearson"][a], 3) for a in accuracies] for layer, info in analysis.items()
  ]
  header = ["layer", *(f"r({plots.ACCURACY_LABELS[a]} top-1, ΔR)" for a in accuracies)]
  return (
    table(header, rows) + f"\n\nPearson's r over the {count} checkpoints' curves "
    "(n/a: fewer than 2 checkpoints or a constant curve). The paper's Table 11 reports 0.92-0.98 "
    "(every 5 epochs, 5 methods, 5 data sets)."
    + (" With 2 checkpoints r is ±1 by construction." if count == 2 else "")
  )


def early_stopping_section(curves: dict, analysis: dict, accuracies) -> str:
  x, unit = plots.x_axis(curves)
  at = lambda i: f"{unit} {x[i]:g}, step {curves['step'][i]}"
  rows, headline, label = [], [], plots.ACCURACY_LABELS
  for layer, info in analysis.items():
    for acc in accuracies:
      e = info["early_stopping"][acc]
      best = f"{_pct(e['best_accuracy'])} at {at(e['best'])}"
      rows.append([layer, label[acc], at(e["chosen"]), _pct(e["chosen_accuracy"]), best])
      rows[-1] += [_pct(e["gap"]), _pct(e["final_accuracy"])]
  last = list(analysis)[-1]
  for acc in accuracies:
    e = analysis[last]["early_stopping"][acc]
    headline.append(
      f"{label[acc]} top-1 {_pct(e['chosen_accuracy'])}% there, {_pct(e['gap'])} points below "
      f"the best checkpoint ({_pct(e['best_accuracy'])}% at {at(e['best'])}); the last "
      f"checkpoint scores {_pct(e['final_accuracy'])}%"
    )
  chosen = at(analysis[last]["early_stopping"][accuracies[0]]["chosen"]) if accuracies else ""
  header = ["layer", "accuracy", "ΔR peak (kept)", "its top-1 (%)", "best top-1 (%)"]
  header += ["gap (points)", "last checkpoint (%)"]
  suggestion = (
    f"Label-free suggestion: keep the checkpoint at {chosen}, the ΔR peak of the last "
    f"monitored layer ({last}), chosen without labels. " + "; ".join(headline) + "."
  )
  return f"{suggestion}\n\n{table(header, rows)}"


def peak_table(curves: dict, analysis: dict) -> str:
  x, unit = plots.x_axis(curves)
  names = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1", "delta": "ΔR"}
  names = {k: n for k, n in names.items() if any(k in info["peak"] for info in analysis.values())}
  rows = []
  for layer, info in analysis.items():
    row = [layer]
    for k in names:
      values, i = curves["layers"][layer][k], info["peak"][k]
      drop = values[i] - values[-1]
      text = _pct(drop) + " points" if k != "delta" else _num(drop)
      row.append(f"{x[i]:g} " + ("(the last)" if i == len(x) - 1 else f"(last: {text} lower)"))
    rows.append(row)
  header = ["layer", *(f"{name} peak {unit}" for name in names.values())]
  return table(header, rows) + (
    "\n\nAn early layer whose curves stay at their peak while the last layer's fall after it is "
    "the paper's overfitting pattern (Section 4)."
  )


def cost_summary(result: dict) -> dict:
  """`{part: {'median', 'first'}}` of the seconds per checkpoint in `result`.

  Parts: the measured ones of `COST_ROWS`, plus 'knn + features' and 'linear + features' (the
  paper's Table 9 times each evaluation with its features). The median skips the first
  checkpoint (its time includes compilation) unless it is the only one.
  """
  entries = sorted(result["checkpoints"].values(), key=lambda e: e["step"])
  seconds = [dict(e["seconds"]) for e in entries]
  for s in seconds:
    if "features" in s:
      s.update({f"{a} + features": s[a] + s["features"] for a in overfitting.ACCURACIES if a in s})
  cost = {}
  for part in [*COST_ROWS, *(f"{a} + features" for a in overfitting.ACCURACIES)]:
    values = [s[part] for s in seconds if part in s]
    if values:
      cost[part] = {"median": float(np.median(values[1:] or values)), "first": values[0]}
  return cost


def cost_table(cost: dict) -> str:
  rows = []
  for k, c in cost.items():
    what = COST_ROWS.get(k, f"{k.split()[0]} and the forward pass of its train and test images")
    rows.append([k, f"{c['median']:.3g}", f"{c['first']:.3g}", PAPER_COST.get(k, "-"), what])
  header = ["signal", "median s / checkpoint", "first checkpoint s", "paper s", "what it times"]
  return table(header, rows) + (
    "\n\nMedian over the checkpoints after the first, whose time includes compilation. Paper: "
    "Table 9, one V100, CIFAR-10, linear 500 epochs, kNN k = 5 (each with its features: compare "
    "the paper's kNN and linear with the '+ features' rows)."
  )


def monitor_section(workdir: epath.Path, plots_dir: epath.Path) -> str:
  path = workdir / monitor.MONITOR_FILE
  if not path.exists():
    return f"## Layer-wise monitor\n\nNo `{path.name}` in the work dir (stage `monitor`)."
  result = json.loads(path.read_text())
  if not result.get("checkpoints"):
    return f"## Layer-wise monitor\n\n`{path}` holds no measured checkpoint."
  curves, analysis = overfitting.curves(result), overfitting.analyse(result)
  protocol, count = result["protocol"], len(result["checkpoints"])
  accuracies = [a for a in overfitting.ACCURACIES if a in protocol["signals"]]
  has_delta = "rate_reduction" in protocol["signals"]
  parts = [
    "## Layer-wise monitor",
    f"Encoder: {result['encoder']} ({count} checkpoints"
    + (f" of `{result['checkpoint_dir']}`" if result.get("checkpoint_dir") else "")
    + "). Test accuracy and ΔR of each layer's pooled features at each checkpoint (Section 4 of "
    "the paper). Protocol of every number below:",
    protocol_lines(protocol),
    layer_tables(curves, analysis),
  ]
  if accuracies:
    parts.append(
      f"![accuracy]({plots.plot_accuracy(curves, accuracies, plots_dir / 'accuracy.png')})"
    )
  if has_delta:
    parts.append(f"![ΔR]({plots.plot_rate_reduction(curves, plots_dir / 'rate_reduction.png')})")
  parts += ["### Peaks", peak_table(curves, analysis)]
  if accuracies and has_delta:
    drawn = plots.plot_correlation(curves, analysis, accuracies, plots_dir / CORRELATION_PNG)
    parts += ["### Correlation of accuracy and ΔR (Table 11)", f"![accuracy and ΔR]({drawn})"]
    parts += [correlation_table(analysis, accuracies, count)]
    parts += [f"![Pearson]({plots.plot_pearson(analysis, accuracies, plots_dir / 'pearson.png')})"]
    parts += ["### Early stopping by ΔR", early_stopping_section(curves, analysis, accuracies)]
  cost = cost_summary(result)
  parts += ["### Cost of each signal (Table 9)", cost_table(cost)]
  parts += [f"![cost]({plots.plot_cost(cost, plots_dir / 'cost.png')})"]
  return "\n\n".join(parts)


# ----------------------------------------------------------------------------- UMM curves


def read_monitor(path: epath.Path) -> dict | None:
  """The `monitor.json` dict at `path`; None if absent or without a measured checkpoint."""
  result = json.loads(path.read_text()) if path.exists() else None
  return result if result and result.get("checkpoints") else None


def umm_curves(workdir: str | os.PathLike) -> dict[str, dict]:
  """The last layer's curves against UMM epoch of each variant with a `umm/<variant>/monitor.json`.

  Returns `{variant: {'layer', 'protocol', 'step': [n], 'epoch': [n], 'values': {value: [n]},
  'start': bool}}` in `umm.VARIANTS` order, `value` over `overfitting.VALUES`. Where the variant
  fine-tunes the pre-trained encoder (all but 'interleaved', which pre-trains from the initial
  state) and has no epoch 0 of its own, epoch 0 is the newest checkpoint of the work dir's
  `monitor.json` (`start` True; its step is the pre-training step).
  """
  workdir = epath.Path(workdir)
  pretrained = read_monitor(workdir / monitor.MONITOR_FILE)
  out = {}
  for variant in umm.VARIANTS:
    result = read_monitor(umm_stage.variant_dir(workdir, variant) / monitor.MONITOR_FILE)
    if result is None:
      continue
    curves, layer = overfitting.curves(result), result["protocol"]["layers"][-1]
    step, epoch, values = curves["step"], curves["epoch"], curves["layers"][layer]
    start = variant != "interleaved" and 0 not in epoch and pretrained is not None
    start = start and layer in pretrained["protocol"]["layers"]
    if start:
      first = overfitting.curves(pretrained)
      step, epoch = np.append(first["step"][-1], step), np.append(0.0, epoch)
      values = {k: np.append(first["layers"][layer][k][-1], v) for k, v in values.items()}
    out[variant] = dict(layer=layer, protocol=result["protocol"], step=step, epoch=epoch)
    out[variant].update(values=values, start=start)
  return out


def umm_section(workdir: epath.Path, plots_dir: epath.Path) -> str | None:
  """Figure 5: accuracy and ΔR of the last layer along each UMM variant; None without data."""
  curves = umm_curves(workdir)
  if not curves:
    return None
  rows = []
  for variant, c in curves.items():
    for i, (step, epoch) in enumerate(zip(c["step"], c["epoch"], strict=True)):
      where = f"{int(step)} (pre-training)" if c["start"] and i == 0 else int(step)
      v = {k: values[i] for k, values in c["values"].items()}
      cells = [_pct(v["knn_top1"]), _pct(v["linear_top1"]), _num(v["delta"])]
      rows.append([umm.VARIANT_LABELS[variant], f"{epoch:g}", where, *cells])
  header = ["encoder", "UMM epoch", "step", "kNN top-1 (%)", "linear top-1 (%)", "ΔR"]
  first = next(iter(curves.values()))
  return "\n\n".join(
    [
      "## Along UMM fine-tuning (Figure 5)",
      f"Layer `{first['layer']}` at each checkpoint of each UMM variant "
      "(`umm/<variant>/monitor.json`), against UMM epoch. Epoch 0 is the pre-trained encoder UMM "
      "starts from (the newest checkpoint in `monitor.json`), where measured; `& UMM` pre-trains "
      "from the initial state, so its epochs are its own. Protocol:",
      protocol_lines(first["protocol"]),
      f"![UMM curves]({plots.plot_umm(curves, plots_dir / UMM_PNG)})",
      table(header, rows),
    ]
  )


def evaluation_section(workdir: epath.Path) -> str | None:
  """Top-1/top-5 of the `evaluate` stage's `evaluation.json` with each protocol; None if absent."""
  path = workdir / evaluate.RESULTS_FILE
  if not path.exists():
    return None
  results, rows, protocols = json.loads(path.read_text()), [], {}
  for encoder, entry in results.items():
    for layer, by_protocol in entry["layers"].items():
      for name, r in by_protocol.items():
        rows.append([encoder, entry["step"], layer, name, _pct(r["top1"]), _pct(r["top5"])])
        protocols.setdefault(name, {k: v for k, v in r["protocol"].items() if k != "layer"})
  header = ["encoder", "step", "layer", "protocol", "top-1 (%)", "top-5 (%)"]
  lines = "\n".join(f"- {name}: {items(p)}" for name, p in protocols.items())
  intro = f"From `{evaluate.RESULTS_FILE}` (stage `evaluate`): frozen pooled features, test split."
  parts = ["## Evaluation of the last checkpoints", intro]
  if len(results) > 1:
    parts += ["### Baseline and UMM variants (Table 1 layout)", comparison_table(results)]
  parts += ["### Every layer and protocol", table(header, rows), lines]
  return "\n\n".join(parts)


def comparison_table(results: dict) -> str:
  """One row per encoder (baseline, `*`, `**`, `+UMM`, ...), one column per protocol of the
  baseline's last evaluated layer: top-1 and the change from the baseline in points (Table 1)."""
  if "baseline" not in results:
    return "No baseline encoder in the results: nothing to compare against."
  layer = list(results["baseline"]["layers"])[-1]
  baseline = results["baseline"]["layers"][layer]
  rows = []
  for encoder, entry in results.items():
    row = [encoder, entry["step"]]
    for name, base in baseline.items():
      top1 = entry["layers"].get(layer, {}).get(name, {}).get("top1")
      change = (
        "" if top1 is None or encoder == "baseline" else f" ({100 * (top1 - base['top1']):+.2f})"
      )
      row.append(_pct(top1) + change)
    rows.append(row)
  header = ["encoder", "step", *(f"{name} top-1 (%)" for name in baseline)]
  return table(header, rows) + (
    f"\n\nLayer `{layer}`; in brackets, the change from the baseline in points. `*`: UMM without "
    "the rate term (α = 0); `**`: without the JS term (β = 0); each variant fine-tunes the "
    "baseline's last checkpoint with the `umm` block of the config. Protocols below."
  )


def write(workdir: str | os.PathLike) -> epath.Path:
  """Writes `report.md` and `plots/*.png` in `workdir` from its files; returns the report path."""
  workdir = epath.Path(workdir)
  plots_dir = workdir / PLOTS_DIR
  plots_dir.mkdir(parents=True, exist_ok=True)
  for name in PLOTS:
    (plots_dir / name).unlink(missing_ok=True)
  config_path = workdir / CONFIG_FILE
  config = json.loads(config_path.read_text()) if config_path.exists() else None
  run = "unknown (no config.json)"
  if config:
    run = (
      f"method `{config['method']['name']}`, data `{config['data']['name']}`, model "
      f"`{config['model']['name']}` (width {config['model']['width']}), seed {config['seed']}"
    )
  sections = [
    f"# Report: {workdir.name}",
    f"Run: {run}. Work dir: `{workdir}`.",
    pretrain_section(workdir, config, plots_dir),
    monitor_section(workdir, plots_dir),
    umm_section(workdir, plots_dir),
    evaluation_section(workdir),
  ]
  path = workdir / REPORT_FILE
  path.write_text("\n\n".join(s for s in sections if s) + "\n")
  return path


def run_stage(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """The `report` stage of `umm_jax.main`: `report.md` and its plots from the work dir's files."""
  del config  # the report reads the work dir's config.json, as a notebook would
  if jax.process_index() == 0:
    print(f"report written to {write(workdir)}")
