"""Where the time of one SimCLR pre-training or UMM step goes: XLA's own per-operation profile.

Run (from the repository root):
  python -m benchmarks.step_profile --batch=256 --width=64 --repeats=3
  python -m benchmarks.step_profile --umm=implicit --hessian=full --batch=32 --width=8 --repeats=1

With `--umm=MODE` the step is the `umm` stage's (`benchmarks.umm_bench.umm_step`, the config's
UMM defaults with `umm.hypergrad=MODE`, `umm.hessian=--hessian`, or the single-level variant for
`--umm=joint`), and its parts are the UMM terms, found through the named scopes `umm.py` and
`implicit.py` put on them: the CG solve's Hessian-vector products (everything they call), the
JS term (sketch VJPs and log-volumes), ΔR, `L_SSL` (f_late and the heads), f_early.

Compiles the step the `pretrain` stage runs (`benchmarks.train_bench.pretrain_step`: on-device
augmentation of two views, ResNet-18 with the CIFAR stem on each, SimCLR's projector and NT-Xent,
the optimiser, the online probe), runs it once untimed, then traces `--repeats` steps with
`jax.profiler.trace` and reads the trace back with `jax.profiler.ProfileData`. Each executed HLO
operation of the step's module is attributed, through the `op_name` metadata of the compiled HLO
(JAX's name stack: `jvp(ResNet)/layer2/block0/conv1/...`, `transpose(...)` for the backward
pass), to a part of the step and to an operation kind. Prints the wall time per step and each
part's and kind's share of the summed operation time (operations of one step may overlap on
several threads, so the sum can exceed the wall time).
"""

import argparse
import collections
import pathlib
import re
import tempfile
import time

import jax
from jax import profiler

from benchmarks import train_bench, umm_bench

_OP_NAME = re.compile(r'op_name="([^"]*)"')
# (part, pattern on the op_name), first match wins.
PARTS = (
  ("augmentation (two views)", r"_views_of_batch"),
  ("backbone backward", r"transpose\(jvp\(ResNet\)\)"),
  ("backbone forward", r"jvp\(ResNet\)"),
  ("heads backward", r"transpose\(jvp\((ProjectionHeads|MLP)"),
  ("heads forward", r"jvp\((ProjectionHeads|MLP)"),
  ("probe", r"LinearClassifier|probe_loss"),
)
OTHER = "loss, optimiser, other"
UMM_PARTS = (
  ("augmentation (two views)", r"_views_of_batch"),
  ("CG solve: Hessian-vector products", r"implicit_cg"),
  ("JS term (sketch VJPs, log-volumes)", r"umm_js"),
  ("ΔR (soft membership, factorisations)", r"umm_delta_r"),
  ("L_SSL (f_late and heads, train mode)", r"umm_ssl"),
  ("f_early forward (frozen)", r"umm_early"),
  ("probe", r"LinearClassifier|probe_loss"),
)


_OPCODES = (
  "fusion", "convolution", "dot", "custom-call", "copy", "transpose", "reduce", "sort", "while",
  "conditional", "call", "gather", "scatter", "concatenate", "pad", "slice", "reduce-window",
  "select-and-scatter", "dynamic-slice", "dynamic-update-slice", "broadcast",
)  # fmt: skip
_OPCODE = re.compile(r"\b(" + "|".join(re.escape(o) for o in _OPCODES) + r")\(")


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """`{instruction name: (opcode, op_name)}` of a compiled module's HLO text.

  A fusion's opcode is 'convolution' or 'dot' when its fused computation holds one.
  """
  found, inside, current = {}, collections.defaultdict(set), ""
  for line in hlo_text.splitlines():
    if line.endswith("{") and "=" not in line.split("(")[0]:
      current = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else "ENTRY"
      continue
    match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if not match:
      continue
    opcode = _OPCODE.search(line)
    opcode = opcode.group(1) if opcode else "other"
    inside[current].add(opcode)
    op_name = _OP_NAME.search(line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    found[match.group(1)] = (opcode, op_name.group(1) if op_name else "", calls and calls.group(1))
  kinds = {}
  for name, (opcode, op_name, called) in found.items():
    if opcode == "fusion" and called:
      opcode = next((o for o in ("convolution", "dot") if o in inside[called]), opcode)
    kinds[name] = (opcode, op_name)
  return kinds


def part_of(op_name: str, parts=PARTS) -> str:
  for part, pattern in parts:
    if re.search(pattern, op_name):
      return part
  return OTHER


KINDS = (  # (kind, opcode or None, pattern on the op_name), first match wins
  ("convolution: XLA (forward, input gradient)", "convolution", ""),
  (
    "convolution: weight gradient (tap slices + matmul)",
    None,
    r"transpose\(.*/(conv\d|downsample)",
  ),
  ("BatchNorm", None, r"/(\w*_)?bn\d?/"),
  ("ReLU", None, r"relu"),
  ("augmentation", None, r"_views_of_batch"),
  ("matmul (heads, loss, probe)", "dot", ""),
)


def kind_of(opcode: str, op_name: str) -> str:
  for kind, code, pattern in KINDS:
    if (code is None or opcode == code) and (not pattern or re.search(pattern, op_name)):
      return kind
  return "other (optimiser, loss, copies)"


def profile(step, state, batch, repeats: int, parts=PARTS):
  """`(wall seconds per step, {(part, kind): summed op seconds per step})`."""
  key = jax.random.key(1)
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  names = instructions(step.lower(state, batch, key).compile().as_text())
  with tempfile.TemporaryDirectory() as directory:
    start = time.perf_counter()
    with profiler.trace(directory):
      for _ in range(repeats):
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
    wall = (time.perf_counter() - start) / repeats
    trace = next(pathlib.Path(directory).rglob("*.xplane.pb"))
    data = profiler.ProfileData.from_file(str(trace))
  seconds = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" not in stats or "step" not in str(stats.get("hlo_module", "")):
          continue
        opcode, op_name = names.get(stats["hlo_op"], ("other", ""))
        seconds[(part_of(op_name, parts), kind_of(opcode, op_name))] += (
          event.duration_ns * 1e-9 / repeats
        )
  return wall, seconds


def _table(title: str, totals: collections.Counter, total: float) -> None:
  print(f"  {title:60s} {'s/step':>8s} {'share':>7s}")
  for name, value in totals.most_common():
    print(f"  {name:60s} {value:8.3f} {100 * value / total:6.1f}%")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--umm", default="", help="a UMM hyper-gradient mode, or 'joint'")
  parser.add_argument("--hessian", default="full", help="umm.hessian, with --umm")
  args = parser.parse_args()
  config = train_bench.synthetic_config(args.batch)
  config.model.width = args.width
  what = "SimCLR step"
  if args.umm:
    what = f"UMM step ({args.umm}, H {args.hessian}, split {config.umm.split})"
  print(
    f"{what}, ResNet-18 (width {args.width}) CIFAR stem, batch {args.batch} x 2 views of "
    f"32x32x3, {args.repeats} traced steps; {train_bench.machine()}"
  )
  if args.umm:
    variant = "joint" if args.umm == "joint" else "umm"
    if variant == "umm":
      config.umm.hypergrad = args.umm
    config.umm.hessian = args.hessian
    wall, seconds = profile(*umm_bench.umm_step(config, variant), args.repeats, UMM_PARTS)
  else:
    wall, seconds = profile(*train_bench.pretrain_step(config), args.repeats)
  total = sum(seconds.values())
  print(f"  wall time {wall:.3f} s/step; summed operation time {total:.3f} s/step")
  parts, kinds = collections.Counter(), collections.Counter()
  for (part, kind), value in seconds.items():
    parts[part] += value
    kinds[kind] += value
  _table("part of the step", parts, total)
  _table("kind of operation", kinds, total)


if __name__ == "__main__":
  main()
