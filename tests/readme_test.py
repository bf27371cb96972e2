"""The README's first two commands stay true: CI runs the test command verbatim."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
  return [
    line.strip()
    for line in (ROOT / "README.md").read_text().splitlines()
    if line.startswith("    ")
  ]


def test_ci_runs_the_readme_test_command():
  demo_cmd, test_cmd = _readme_commands()[:2]
  assert "umm_jax.main --config=configs/demo.py" in demo_cmd
  assert "pytest" in test_cmd
  assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()
