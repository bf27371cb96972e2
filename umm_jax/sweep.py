"""Seeds and grid sweeps of one config, run here in sequence or printed as one command per point.

    python -m umm_jax.sweep --config=configs/demo.py --workdir=runs/demo_alpha \
      --sweep=configs/sweeps/umm_alpha.py [--seeds=3] [--dry_run] \
      [--launcher='launch/slurm.sh --nodes=2 --gpus-per-node=8'] [--config.train.epochs=2 ...]

`--config` and its `--config.x=...` overrides make the base config as in `umm_jax.main`, whose
flags this module shares. `--sweep` names a file whose `get_sweep()` maps flattened config keys
(`"umm.alpha"`) to the values to try: the grid is their Cartesian product in the dict's order,
with the seeds `config.seed + 0 .. N-1` of `--seeds=N` innermost (no `--sweep`: N seeds of one
config). Point `<name>` runs in `<workdir>/<name>/seed_<s>/`, `<name>` being `key=value,...` over
the keys given more than one value, filesystem-safe (`umm.alpha=0.5`; `base` if none).

Local mode (the default) calls `umm_jax.main.run` on each point in turn and rewrites
`<workdir>/sweep.json` (config, sweep file, overrides, keys; per point its values, status
`pending` / `done` / `failed` and seconds) after every point. Rerunning the command skips the
points done; a `sweep.json` of another config or grid is refused. A failing point is logged and
marked `failed`, the sweep goes on and exits non-zero at the end; then `<workdir>/summary.md`
(`umm_jax.aggregate`) averages the done points over seeds. Multi-host: every process
runs the same command; process 0 alone writes `sweep.json` and `summary.md`.

`--dry_run` prints each point's `python -m umm_jax.main` command, one per line, and does nothing
else; with `--launcher=PREFIX`, `PREFIX --config=... --workdir=... -- <config flags>` (the
interface of launch/*.sh). Values are written so that config_flags reads back what local mode sets.
"""

import copy
import difflib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath

# Importing main defines --config (locked, with its --config.x overrides) and --workdir, shared
# here so that a sweep builds its base config exactly as main does.
from umm_jax import aggregate, parallel, run_groups
from umm_jax import main as umm_main

SWEEP_FILE = "sweep.json"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file: get_sweep() -> {config key: values}.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds config.seed + 0 .. N-1 per point.", lower_bound=1)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print one command per point; run nothing.")
_LAUNCHER = flags.DEFINE_string(
  "launcher", None, "With --dry_run: a launch command (e.g. 'launch/slurm.sh --nodes=2') to use."
)


class Point(NamedTuple):
  """One run of a sweep.

  Attributes:
    name: `key=value,...` of the keys the grid varies, or `base`.
    workdir: its work dir relative to the sweep's, `<name>/seed_<s>`.
    values: every swept key (in the grid's order), then `seed`, to its value.
  """

  name: str
  workdir: str
  values: dict[str, Any]


def load_sweep(path: str | os.PathLike) -> dict[str, tuple]:
  """The grid of the sweep file `path`: its `get_sweep()` with each key's values as a tuple."""
  spec = importlib.util.spec_from_file_location(f"_sweep_{pathlib.Path(path).stem}", path)
  if spec is None:
    raise ValueError(f"Cannot load sweep file {str(path)!r}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_sweep", None)):
    raise ValueError(f"Sweep file {str(path)!r} defines no get_sweep()")
  grid = module.get_sweep()
  if not isinstance(grid, Mapping):
    raise ValueError(f"get_sweep() of {str(path)!r} must return a dict, got {type(grid).__name__}")
  return {key: _values(key, values) for key, values in grid.items()}


def _values(key: str, values: Any) -> tuple:
  if isinstance(values, str | bytes) or not isinstance(values, Sequence):
    raise ValueError(f"The sweep's values of {key!r} must be a list or tuple, got {values!r}")
  if not values:
    raise ValueError(f"The sweep gives {key!r} no values")
  return tuple(values)


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *blocks, field = key.split(".")
  for block in blocks:
    config = config[block]
  config[field] = value


def _check_key(key: Any, keys: Sequence[str]) -> None:
  if key == "seed":
    raise ValueError("The sweep sets 'seed'; use --seeds=N (seeds config.seed + 0 .. N-1)")
  if key in keys:
    return
  block = str(key)
  while block and not any(k.startswith(f"{block}.") for k in keys):
    block = block.rpartition(".")[0]
  inside = [k for k in keys if k.startswith(f"{block}.")]
  if block == key:
    raise ValueError(f"The sweep sets {key!r}, a block of the config; its keys: {inside}")
  close = difflib.get_close_matches(str(key), keys, n=5, cutoff=0.6)
  hint = f"did you mean {close}?" if close else f"valid keys under {block!r}: {inside}"
  if not close and not block:
    hint = f"valid blocks and keys: {sorted({k.split('.')[0] for k in keys})}"
  raise ValueError(f"Unknown config key {key!r} in the sweep; {hint}")


def check_grid(grid: Mapping[str, Sequence], config: ml_collections.ConfigDict) -> dict:
  """Checks `grid` against `config`; returns it with each value as the config stores it.

  Every key must be a value of `config`, never `seed` (`--seeds` sweeps it); every list of
  values non-empty; every value of the field's type (ml_collections' rules, e.g. an int for a
  float field becomes a float, a list for a tuple field a tuple; a bool only for a bool field).

  Raises:
    ValueError: naming the bad key (and the close valid ones) or the bad value and its key.
  """
  keys = list(run_groups.flatten(config.to_dict()))  # every value's dotted path
  scratch = copy.deepcopy(config)
  checked = {}
  for key, values in grid.items():
    _check_key(key, keys)
    checked[key] = []
    for value in _values(key, values):
      field = config[key]  # ConfigDict reads flattened keys (not writes: see _set)
      try:
        if isinstance(value, bool) != isinstance(field, bool):
          raise TypeError(f"{value!r} is {type(value).__name__}, the field {type(field).__name__}")
        _set(scratch, key, value)
      except TypeError as e:
        raise ValueError(f"Sweep point {key}={value!r}: cannot set {key} to {value!r}: {e}") from e
      checked[key].append(scratch[key])
  return {key: tuple(values) for key, values in checked.items()}


def _name_value(value: Any) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, tuple | list):
    return "+".join(_name_value(v) for v in value) or "none"
  return _SAFE.sub("_", repr(value) if isinstance(value, float) else str(value))


def point_name(values: Mapping[str, Any]) -> str:
  """`key=value,key=value` in a filesystem-safe form (tuples joined by `+`); `base` if empty."""
  return ",".join(f"{k}={_name_value(v)}" for k, v in values.items()) or "base"


def points(grid: Mapping[str, Sequence], seeds: int, base_seed: int) -> list[Point]:
  """The Cartesian product of `grid` (its order; the last key fastest), then seeds innermost.

  Raises:
    ValueError: when two points get the same name (repeated or indistinguishable values).
  """
  if seeds < 1:
    raise ValueError(f"seeds must be a positive integer, got {seeds}")
  varying = [key for key, values in grid.items() if len(values) > 1]
  result, seen = [], {}
  for combo in itertools.product(*grid.values()):
    values = dict(zip(grid, combo, strict=True))
    name = point_name({key: values[key] for key in varying})
    if name in seen:  # repeated values, or values that differ only in unsafe characters
      raise ValueError(f"Sweep points {seen[name]} and {values} share the name {name!r}")
    seen[name] = values
    for seed in range(base_seed, base_seed + seeds):
      result.append(Point(name, f"{name}/seed_{seed}", {**values, "seed": seed}))
  return result


def point_config(
  base: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of `base` (still locked) with each flattened key of `values` set."""
  config = copy.deepcopy(base)
  for key, value in values.items():
    _set(config, key, value)
  return config


def check_points(base: ml_collections.ConfigDict, sweep_points: Sequence[Point]) -> None:
  """Fails before anything runs when a point's config fails `umm_jax.main.validate`."""
  for point in sweep_points:
    try:
      umm_main.validate(point_config(base, point.values))
    except ValueError as e:
      raise ValueError(f"Sweep point {point.workdir}: {e}") from e


def _literal(value: Any) -> str:
  """A Python literal of `value` that `ast.literal_eval` reads back; strings double-quoted."""
  if isinstance(value, str):
    return json.dumps(value)  # JSON's escapes are Python's too, and "x" shell-quotes cleanly
  if isinstance(value, tuple):
    inner = ", ".join(_literal(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  if isinstance(value, list):
    return f"[{', '.join(_literal(v) for v in value)}]"
  return repr(value)


def flag_value(value: Any) -> str:
  """`value` as `--config.key=<this>`: what config_flags parses back to `value`."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, tuple | list):
    return _literal(tuple(value))
  if isinstance(value, int | float | str):
    return repr(value) if isinstance(value, float) else str(value)
  raise ValueError(f"No command-line form for {value!r} ({type(value).__name__})")


def command(
  config_path: str,
  workdir: str | os.PathLike,
  point: Point,
  overrides: Mapping[str, Any],
  *,
  launcher: str | None = None,
) -> str:
  """The shell command that runs `point` of the sweep in `workdir` (shlex-quoted words).

  `python -m umm_jax.main --config=... --workdir=... <flags>`, or with `launcher`
  `<launcher words> --config=... --workdir=... -- <flags>`; the flags are `overrides` (the base
  config's `--config.x`, less those the point sets) then the point's values, seed last.
  """
  base = {key: value for key, value in overrides.items() if key not in point.values}
  point_flags = [f"--config.{k}={flag_value(v)}" for k, v in {**base, **point.values}.items()]
  paths = [f"--config={config_path}", f"--workdir={os.path.join(workdir, point.workdir)}"]
  if launcher is None:
    words = ["python", "-m", "umm_jax.main", *paths, *point_flags]
  else:
    words = [*shlex.split(launcher), *paths, "--", *point_flags]
  return shlex.join(words)


def describe(
  config_path: str,
  sweep_path: str | None,
  overrides: Mapping[str, Any],
  sweep_points: Sequence[Point],
) -> dict[str, Any]:
  """The content of `sweep.json` for a sweep not yet run (every point `pending`), JSON types."""
  record = {
    "config": config_path,
    "sweep": sweep_path,
    "overrides": dict(overrides),
    "keys": list(sweep_points[0].values),
    "points": [{**p._asdict(), "status": "pending", "seconds": None} for p in sweep_points],
  }
  return json.loads(json.dumps(record))  # tuples as lists, as they read back from the file


def _plan(record: Mapping[str, Any]) -> dict[str, Any]:
  """`record` without what running changes (statuses and seconds)."""
  points_ = [{k: p[k] for k in ("name", "workdir", "values")} for p in record["points"]]
  return {**record, "points": points_}


def resume(workdir: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
  """`record`, or the `sweep.json` already in `workdir` when it describes the same sweep.

  Raises:
    ValueError: when `workdir/sweep.json` is another config, sweep file, overrides or grid.
  """
  path = epath.Path(workdir) / SWEEP_FILE
  if not path.exists():
    return record
  existing = json.loads(path.read_text())
  old, new = _plan(existing), _plan(record)
  if old != new:
    differ = [key for key in {**old, **new} if old.get(key) != new.get(key)]
    raise ValueError(
      f"{path} describes another sweep ({', '.join(differ)} differ); use a new --workdir, or "
      "delete it to start this sweep over there"
    )
  return existing


def write_record(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
  """Writes `workdir/sweep.json` (process 0 only) as a new file renamed over the old one.

  An interrupted sweep thus leaves the old file or the new one, never part of one.
  """
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / SWEEP_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(record, indent=2))
  tmp.replace(path)


def _clock(seconds: float) -> str:
  minutes, seconds = divmod(round(seconds), 60)
  return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def run_local(
  base: ml_collections.ConfigDict,
  sweep_points: Sequence[Point],
  workdir: str | os.PathLike,
  record: dict[str, Any],
) -> list[str]:
  """Runs every point of `record` not yet `done`, in order; returns the failed ones' work dirs.

  `record` (from `describe` / `resume`, its points those of `sweep_points`) gets each point's
  status and seconds and is written to `workdir/sweep.json` after every point.
  """
  workdir = epath.Path(workdir)
  entries = record["points"]
  todo = [i for i, entry in enumerate(entries) if entry["status"] != "done"]
  if len(todo) < len(entries):
    logging.info("%d of %d points already done: skipped", len(entries) - len(todo), len(entries))
  write_record(workdir, record)
  start = time.monotonic()
  for count, i in enumerate(todo, 1):
    point, entry = sweep_points[i], entries[i]
    label = f"point {i + 1}/{len(entries)} {point.workdir}"
    logging.info("%s: starting", label)
    began = time.monotonic()
    try:
      umm_main.run(point_config(base, point.values), workdir / point.workdir)
      entry["status"] = "done"
    except Exception:  # one failing point must not end the sweep
      logging.exception("%s failed", label)
      entry["status"] = "failed"
    entry["seconds"] = time.monotonic() - began
    write_record(workdir, record)
    elapsed = time.monotonic() - start
    times = map(_clock, (entry["seconds"], elapsed, elapsed / count * (len(todo) - count)))
    logging.info("%s %s in %s; elapsed %s, ETA %s", label, entry["status"], *times)
  return [entry["workdir"] for entry in entries if entry["status"] == "failed"]


def summarize(workdir: str | os.PathLike, record: Mapping[str, Any]) -> epath.Path | None:
  """`umm_jax.aggregate.write` over the done points, grouped by the swept keys (seeds averaged).

  Returns the summary's path, or None when no point is done.
  """
  done = [epath.Path(workdir) / p["workdir"] for p in record["points"] if p["status"] == "done"]
  if not done:
    return None
  return aggregate.write(done, workdir, keys=[k for k in record["keys"] if k != "seed"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  if workdir is None:
    raise app.UsageError("--workdir is required")
  if flags.FLAGS.config is None:
    raise app.UsageError("--config is required")
  if _LAUNCHER.value is not None and not _DRY_RUN.value:
    raise app.UsageError("--launcher applies to --dry_run only")
  if not _DRY_RUN.value:  # as main: join the other processes before anything touches a device
    logging.get_absl_handler().addFilter(umm_main.quiet_orbax)
    parallel.initialize_distributed(
      coordinator_address=flags.FLAGS.coordinator_address,
      num_processes=flags.FLAGS.num_processes,
      process_id=flags.FLAGS.process_id,
    )
  config = flags.FLAGS.config
  config_path = flags.FLAGS["config"].config_filename
  overrides = dict(flags.FLAGS["config"].override_values)
  grid = check_grid(load_sweep(_SWEEP.value) if _SWEEP.value else {}, config)
  sweep_points = points(grid, _SEEDS.value, config.seed)
  check_points(config, sweep_points)
  if _DRY_RUN.value:
    for point in sweep_points:
      print(command(config_path, workdir, point, overrides, launcher=_LAUNCHER.value))
    return
  record = resume(workdir, describe(config_path, _SWEEP.value, overrides, sweep_points))
  failed = run_local(config, sweep_points, workdir, record)
  if jax.process_index() == 0 and (summary := summarize(workdir, record)) is not None:
    print(f"summary: {summary}")
  if failed:
    raise SystemExit(f"{len(failed)} of {len(sweep_points)} points failed: {', '.join(failed)}")


if __name__ == "__main__":
  app.run(main)
