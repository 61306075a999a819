"""Bad input through the real `distill` entry point: one line, exit code 2, before Ray starts, no MLflow run left behind."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(REPO_ROOT / "configs/digits_kd.yaml")


def distill(args: list[str], workdir: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO_ROOT, extra_path) if p)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


def assert_bad_input(result: subprocess.CompletedProcess, message: str, workdir: Path) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("distill: error: ") and message in lines[0], lines[0]
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (workdir / "ray_results").exists()
    db = workdir / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from runs").fetchone()[0] == 0


@pytest.fixture
def user_module(tmp_path) -> Path:
    """A folder with the user's own model module: a model with 5 outputs, for a 10-class dataset."""
    (tmp_path / "wrong_models.py").write_text(textwrap.dedent("""
        import torch
        class FiveWay(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(64, 5)
            def forward(self, x):
                return self.fc(x.flatten(1))
    """))
    return tmp_path


# The real entry point in a new process, as a user runs it: a few cases, each failing at a different step (the
# command line, the schema, a model the config imports from the user's own module). Every other case runs in
# this process, through the same `main`, in test_bad_input.py.
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.yaml"], "config file not found: missing.yaml"),
        (["run", DIGITS, "kd.temperature=0"], "kd.temperature: temperature must be a finite number > 0"),
        (["run", DIGITS, "kd.alpha=2"], "kd.alpha: alpha must be in [0, 1]"),
        (["run", DIGITS, "kd.temprature=2"], "kd.temprature: unknown key"),
        (["run", DIGITS, "students=[{name: five, family: 'import:wrong_models:FiveWay'}]"], "students.0: model outputs 5 classes but the dataset has 10"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, user_module):
    assert_bad_input(distill(args, user_module, extra_path=user_module), message, user_module)


def test_help_lists_commands(tmp_path):
    result = distill(["--help"], tmp_path)
    assert result.returncode == 0
    for command in ("run", "teacher", "soft-targets"):
        assert command in result.stdout
