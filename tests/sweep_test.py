"""Tests for umm_jax.sweep: grid expansion, validation, dry-run commands, resume, end to end.

The dry-run commands are parsed back by absl and config_flags, as umm_jax.main would parse them,
and must give the config local mode builds for the same point.
"""

import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import warnings

import pytest
from absl import flags
from ml_collections import config_flags

from configs import default
from configs import test as test_config
from umm_jax import main, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.py"))
# Overrides as config_flags returns them; one of them (umm.beta) is also swept below.
OVERRIDES = {"train.epochs": 1, "umm.beta": 0.25, "stages": ("pretrain", "umm")}


def _base():
  config = test_config.get_config()
  config.lock()
  return sweep.point_config(config, OVERRIDES)


def _parse(argv: list[str]):
  """The config and work dir umm_jax.main's flags would get from `argv` (argv[0]: program)."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  with warnings.catch_warnings():  # config_flags loads the file with SourceLoader.load_module
    warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
    values(argv)
  return values.config, values.workdir


def test_points_are_the_product_of_the_grid_with_seeds_innermost():
  grid = {
    "umm.alpha": (0.0, 0.5),
    "optim.schedule": ("cosine", "constant", "exponential"),
    "train.epochs": (3,),
  }
  points = sweep.points(grid, seeds=2, base_seed=7)
  expected = [
    {"umm.alpha": a, "optim.schedule": s, "train.epochs": e, "seed": seed}
    for a, s, e, seed in itertools.product(*grid.values(), (7, 8))
  ]
  assert [p.values for p in points] == expected
  assert [list(p.values) for p in points] == [[*grid, "seed"]] * len(expected)
  # Names carry the keys that vary (a single value names no point apart), in the grid's order.
  assert points[0].name == "umm.alpha=0.0,optim.schedule=cosine"
  assert [p.workdir for p in points[:2]] == [f"{points[0].name}/seed_{s}" for s in (7, 8)]
  assert len({p.name for p in points}) == 6 and len({p.workdir for p in points}) == 12
  assert [p.workdir for p in sweep.points({}, seeds=3, base_seed=0)] == [
    f"base/seed_{s}" for s in range(3)
  ]


def test_point_names_are_filesystem_safe(tmp_path):
  grid = {
    "data.data_dir": ("/data/my set", "a,b=c's"),
    "umm.variants": (("umm",), ("no_rate", "no_js")),
    "umm.eps2": (1e-6, 0.5),
    "umm.keep_inner_step": (True, False),
  }
  points = sweep.points(grid, seeds=1, base_seed=0)
  names = {p.name for p in points}
  assert len(names) == 16
  assert "data.data_dir=_data_my_set,umm.variants=umm,umm.eps2=1e-06,umm.keep_inner_step=true" in (
    names
  )
  for name in names:
    assert re.fullmatch(r"[A-Za-z0-9._+=,-]+", name) and shlex.quote(name) == name
    (tmp_path / name).mkdir()  # one directory per name, no nesting
  assert len(list(tmp_path.iterdir())) == 16


def test_points_refuse_names_that_collide():
  with pytest.raises(ValueError, match="share the name 'data.data_dir=a_b'"):
    sweep.points({"data.data_dir": ("a/b", "a_b")}, seeds=1, base_seed=0)
  with pytest.raises(ValueError, match="share the name"):
    sweep.points({"umm.alpha": (0.5, 0.5)}, seeds=1, base_seed=0)


@pytest.mark.parametrize(
  "grid,match",
  [
    ({"umm.alpah": (1.0,)}, r"'umm.alpah'.*did you mean \['umm.alpha'"),
    ({"umm.nothing_like_this": (1,)}, r"valid keys under 'umm': \['umm.alpha', 'umm.beta'"),
    ({"zzz": (1,)}, r"'zzz'.*valid blocks and keys: \['data', 'evaluate'"),
    ({"umm": (1,)}, r"'umm', a block of the config; its keys: \['umm.alpha'"),
    ({"umm.alpha": ()}, "gives 'umm.alpha' no values"),
    ({"umm.alpha": 0.5}, "values of 'umm.alpha' must be a list or tuple"),
    ({"umm.split": "layer2"}, "values of 'umm.split' must be a list or tuple"),
    ({"umm.alpha": (0.5, "big")}, "umm.alpha='big': cannot set umm.alpha to 'big'"),
    ({"train.epochs": (2, 2.5)}, "train.epochs=2.5"),
    ({"train.epochs": (True,)}, "train.epochs=True"),
    ({"umm.keep_inner_step": (1,)}, "umm.keep_inner_step=1"),
    ({"seed": (1, 2)}, "--seeds"),
  ],
)
def test_check_grid_names_the_bad_key_or_value(grid, match):
  with pytest.raises(ValueError, match=match):
    sweep.check_grid(grid, _base())


def test_check_grid_returns_values_as_the_config_stores_them():
  grid = sweep.check_grid({"umm.alpha": [1, 0.5], "umm.variants": [["umm", "no_js"]]}, _base())
  assert grid == {"umm.alpha": (1.0, 0.5), "umm.variants": (("umm", "no_js"),)}
  assert isinstance(grid["umm.alpha"][0], float)


def test_check_points_names_the_point_main_would_reject():
  base = _base()
  points = sweep.points(sweep.check_grid({"umm.split": ("layer2", "layer9")}, base), 1, 0)
  with pytest.raises(ValueError, match="umm.split=layer9/seed_0: .*layer9"):
    sweep.check_points(base, points)


def _dry_run_points():
  base = _base()
  grid = {
    "umm.alpha": (0.0, 0.5),
    "umm.variants": (("umm",), ("no_rate", "no_js")),
    "umm.keep_inner_step": (True,),
    "umm.beta": (1e-6,),
    "data.data_dir": ("/tmp/it's a dir",),
    "optim.schedule": ("exponential",),
  }
  return base, sweep.points(sweep.check_grid(grid, base), seeds=2, base_seed=base.seed)


def test_dry_run_commands_parse_back_to_the_local_config(monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths are relative to the repository root, as in the README
  base, points = _dry_run_points()
  assert len(points) == 8
  for point in points:
    argv = shlex.split(sweep.command("configs/test.py", "runs/s", point, OVERRIDES))
    assert argv[:3] == ["python", "-m", "umm_jax.main"]
    config, workdir = _parse(["umm_jax.main", *argv[3:]])
    assert workdir == f"runs/s/{point.workdir}"
    assert config.to_dict() == sweep.point_config(base, point.values).to_dict()
    assert config.umm.beta == 1e-6 and config.train.epochs == 1  # the point beats the override


def test_dry_run_commands_with_a_launcher_pass_the_config_flags_after_the_separator(monkeypatch):
  monkeypatch.chdir(ROOT)
  base, points = _dry_run_points()
  launcher = "launch/local.sh --dry-run --python='my python'"
  for point in points[:3]:
    line = sweep.command("configs/test.py", "runs/s", point, OVERRIDES, launcher=launcher)
    argv = shlex.split(line)
    assert argv[:3] == ["launch/local.sh", "--dry-run", "--python=my python"]
    separator = argv.index("--")
    assert argv[3:separator] == ["--config=configs/test.py", f"--workdir=runs/s/{point.workdir}"]
    config, _ = _parse(["umm_jax.main", *argv[3:separator], *argv[separator + 1 :]])
    assert config.to_dict() == sweep.point_config(base, point.values).to_dict()
    # The launch script itself turns the line into the umm_jax.main command it would run.
    printed = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True)
    run = shlex.split(printed.stdout)
    assert run[:4] == ["env", "my python", "-m", "umm_jax.main"]
    config, workdir = _parse(["umm_jax.main", *run[4:]])
    assert workdir == f"runs/s/{point.workdir}"
    assert config.to_dict() == sweep.point_config(base, point.values).to_dict()


def test_a_rerun_skips_done_points_retries_failed_ones_and_refuses_another_grid(
  tmp_path, monkeypatch
):
  calls = []

  def fake_run(config, workdir):
    calls.append(pathlib.Path(workdir).relative_to(tmp_path).as_posix())
    assert config.is_locked and config.train.epochs == 1
    point = (f"umm.alpha={config.umm.alpha}", f"seed_{config.seed}")
    assert pathlib.Path(workdir).parts[-2:] == point  # the point's own values
    if config.umm.alpha == 0.5:
      raise RuntimeError("boom")

  monkeypatch.setattr(main, "run", fake_run)
  base = _base()

  def record(alphas):
    points = sweep.points({"umm.alpha": alphas}, seeds=1, base_seed=base.seed)
    return points, sweep.describe("configs/test.py", "s.py", OVERRIDES, points)

  points, first = record((0.0, 0.5, 1.0))
  first["points"][0]["status"] = "done"  # as an interrupted run would have left it
  sweep.write_record(tmp_path, first)
  failed = sweep.run_local(base, points, tmp_path, sweep.resume(tmp_path, first))
  assert calls == ["umm.alpha=0.5/seed_0", "umm.alpha=1.0/seed_0"]
  assert failed == ["umm.alpha=0.5/seed_0"]
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert set(saved) == {"config", "sweep", "overrides", "keys", "points"}
  assert saved["keys"] == ["umm.alpha", "seed"]
  assert saved["overrides"] == {"train.epochs": 1, "umm.beta": 0.25, "stages": ["pretrain", "umm"]}
  assert [p["status"] for p in saved["points"]] == ["done", "failed", "done"]
  assert saved["points"][0]["seconds"] is None and saved["points"][2]["seconds"] >= 0
  assert saved["points"][1]["values"] == {"umm.alpha": 0.5, "seed": 0}
  assert not list(tmp_path.glob("*.tmp"))

  calls.clear()
  sweep.run_local(base, points, tmp_path, sweep.resume(tmp_path, record((0.0, 0.5, 1.0))[1]))
  assert calls == ["umm.alpha=0.5/seed_0"]
  with pytest.raises(ValueError, match=r"describes another sweep \(points differ\)"):
    sweep.resume(tmp_path, record((0.0, 0.5))[1])
  other = sweep.describe("configs/demo.py", "s.py", OVERRIDES, points)
  with pytest.raises(ValueError, match=r"\(config differ\)"):
    sweep.resume(tmp_path, other)


def test_every_sweep_file_loads_and_sweeps_keys_of_the_default_config():
  assert {p.stem for p in SWEEPS} == {
    "umm_alpha",
    "umm_beta",
    "umm_eps",
    "umm_split",
    "lr_schedule",
  }
  config = default.get_config()
  config.lock()
  for path in SWEEPS:
    grid = sweep.check_grid(sweep.load_sweep(path), config)
    assert grid and all(len(values) > 1 for values in grid.values()), path.name
    sweep.check_points(config, sweep.points(grid, seeds=1, base_seed=0))
    doc = path.read_text()
    assert f"--sweep=configs/sweeps/{path.name}" in doc, path.name
    assert re.search(r"Table \d+|Figure \d+|no table", doc), path.name


def test_load_sweep_requires_get_sweep(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("SWEEP = {'umm.alpha': (1.0,)}\n")
  with pytest.raises(ValueError, match="defines no get_sweep"):
    sweep.load_sweep(path)


def _sweep_command(tmp_path, *args):
  # JAX's persistent compilation cache: the second point runs the first one's programs (umm.alpha
  # is read by the umm stage only, which configs/test.py leaves out) and compiles nothing.
  env = {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
  return subprocess.run(
    [sys.executable, "-m", "umm_jax.sweep", "--config=configs/test.py", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, **env},
  )


def _first_table(markdown: str) -> list[str]:
  """The body rows of the first Markdown table in `markdown` (header and rule left out)."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("|"))
  table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
  return table[2:]


def test_two_point_sweep_runs_end_to_end(tmp_path):
  sweep_file = tmp_path / "alpha.py"
  sweep_file.write_text("def get_sweep():\n  return {'umm.alpha': [0.0, 1.0]}\n")
  workdir = tmp_path / "runs"
  args = (f"--workdir={workdir}", f"--sweep={sweep_file}", "--config.train.log_every_steps=4")
  dry = _sweep_command(tmp_path, *args, "--dry_run")
  assert dry.returncode == 0, dry.stderr[-3000:]
  lines = dry.stdout.splitlines()
  assert len(lines) == 2 and all("--config.train.log_every_steps=4" in line for line in lines)
  assert not workdir.exists()  # a dry run writes nothing

  proc = _sweep_command(tmp_path, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads((workdir / "sweep.json").read_text())
  assert record["overrides"] == {"train.log_every_steps": 4}
  assert [p["status"] for p in record["points"]] == ["done", "done"]
  for point, alpha in zip(record["points"], (0.0, 1.0), strict=True):
    assert point["workdir"] == f"umm.alpha={alpha}/seed_0" and point["seconds"] > 0
    run = workdir / point["workdir"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]
    assert (run / "report.md").exists() and (run / "evaluation.json").exists()
    config = json.loads((run / "config.json").read_text())
    assert (config["umm"]["alpha"], config["train"]["log_every_steps"]) == (alpha, 4)
  assert f"summary: {workdir / 'summary.md'}" in proc.stdout
  rows = _first_table((workdir / "summary.md").read_text())
  assert len(rows) == 2  # one row per point: a single seed each
  for row, alpha in zip(rows, ("0", "1"), strict=True):
    assert re.search(rf"(?<![\d.]){alpha}(\.0+)?(?![\d.])", row), row

  again = _sweep_command(tmp_path, *args)  # everything done: nothing runs again
  assert again.returncode == 0 and "2 of 2 points already done" in again.stderr
