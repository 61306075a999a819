"""The README's results blocks are generated from benchmarks/results/*.json (benchmarks/readme_results.py).

No Ray, no MLflow: only the JSON files, the README and the renderers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import mnist_demo  # noqa: E402
import readme_results  # noqa: E402


@pytest.fixture
def copies(tmp_path) -> tuple[Path, Path]:
    """(docs/results.md copy, results folder copy), and a README copy beside them: the tests edit these, never the committed files."""
    readme = tmp_path / "results.md"
    shutil.copy(REPO / "docs" / "results.md", readme)
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    results = tmp_path / "results"
    shutil.copytree(REPO / "benchmarks" / "results", results)
    return readme, results


def documents(readme: Path) -> list[str]:
    return ["--readme", str(readme), "--readme", str(readme.parent / "README.md")]


def check(readme: Path, results: Path) -> int:
    return readme_results.main(["--check", *documents(readme), "--results", str(results)])


def block(readme: Path, name: str) -> str:
    text = readme.read_text()
    start, end = f"<!-- results:{name}:start -->\n", f"<!-- results:{name}:end -->"
    return text[text.index(start) + len(start):text.index(end)]


def test_committed_readme_matches_the_committed_json():
    """A hand edit inside a block, or a JSON rerun without `make results`, fails here."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_results.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_changed_number_in_the_json_makes_its_block_stale(copies, capsys):
    readme, results = copies
    methods = json.loads((results / "methods.json").read_text())
    methods["rows"][1]["test_errors"] = 4321  # a figure no other row has
    (results / "methods.json").write_text(json.dumps(methods))
    before = block(readme, "methods")

    assert check(readme, results) == 1
    assert "stale results block(s): results.md:methods " in capsys.readouterr().err

    outside_before = readme.read_text().replace(before, "")
    assert readme_results.main([*documents(readme), "--results", str(results)]) == 0
    after = block(readme, "methods")
    assert after != before and "| 4321 |" in after
    assert readme.read_text().replace(after, "") == outside_before  # the hand-written text is untouched
    assert check(readme, results) == 0


def test_a_hand_edit_inside_a_block_is_stale(copies, capsys):
    readme, results = copies
    readme.write_text(readme.read_text().replace("| 1x (60,000 rows) | ", "| 1x (60,000 rows) | 1", 1))
    assert check(readme, results) == 1
    assert "growth" in capsys.readouterr().err


def test_a_missing_json_renders_not_run_yet(copies):
    readme, results = copies
    for name in ("pipeline", "sweep_cost"):
        (results / f"{name}.json").unlink()
    readme_results.main([*documents(readme), "--results", str(results)])
    assert block(readme, "pipeline") == "not run yet: python benchmarks/bench_pipeline.py\n"
    assert block(readme, "sweep_cost").startswith("not run yet: python benchmarks/bench_sweep.py")
    assert "not run yet" not in block(readme, "growth")  # only the missing ones


def test_a_renderer_not_written_yet_renders_not_run_yet(tmp_path):
    (tmp_path / "later.json").write_text("{}")
    later = readme_results.Result("later", "later.json", "python benchmarks/later.py", readme_results.lazy("no_such_benchmark_module", "markdown"))
    assert readme_results.block_body(later, tmp_path) == "not run yet: python benchmarks/later.py\n"


def test_a_missing_marker_pair_fails_the_check(copies, capsys):
    readme, results = copies
    readme.write_text(readme.read_text().replace("<!-- results:storage:start -->", "<!-- storage -->"))
    assert check(readme, results) == 1
    assert "storage" in capsys.readouterr().err


def fake_demo_result() -> dict:
    row = {"test_accuracy": 0.9878, "params": 1276810, "size_mb": 5.1072, "agreement": 0.9901, "kl_to_teacher": 0.0421,
           "wall_s": 319.5, "mlflow_run_id": "r"}
    return {
        "command": "cd /tmp/kd-demo-x && distill run configs/mnist_kd.yaml --summary-json summary.json",
        "benchmark_command": "python benchmarks/mnist_demo.py", "workdir": "/tmp/kd-demo-x",
        "tracking_uri": "sqlite:////tmp/kd-demo-x/mlflow.db", "started_utc": "2026-11-30 00:20 UTC", "wall_s": 673.0,
        "machine": {"nproc": 2, "cpu_model": "Some CPU", "mem_gib": 23.5, "python": "3.11.7", "torch": "2.14.1", "ray": "2.60.0",
                    "mlflow": "3.17.2", "gpu": None},
        "load_start": [1.0, 1.0, 1.0], "load_end": [2.0, 2.0, 2.0],
        "stage_wall_s": {"teacher": 286.8, "soft_targets": 24.0, "students": 319.5},
        "rows": [{**row, "role": "teacher", "name": "cnn16x32", "test_errors": 105, "params": 71802, "agreement": 1.0, "kl_to_teacher": 0.0},
                 {**row, "role": "student", "name": "mlp800", "test_errors": 122},
                 {**row, "role": "baseline", "name": "mlp800-baseline", "test_errors": 142, "test_accuracy": 0.9858}],
    }


def test_the_demo_block_renders_a_hand_made_result(tmp_path):
    path = mnist_demo.write_result(fake_demo_result(), tmp_path)
    demo = next(r for r in readme_results.RESULTS if r.name == "mnist_demo")
    body = readme_results.block_body(demo, path.parent)
    assert "Command: `cd /tmp/kd-demo-x && distill run configs/mnist_kd.yaml --summary-json summary.json`" in body
    assert "Started 2026-11-30 00:20 UTC on 2 x Some CPU, 23.5 GiB, no GPU" in body
    assert "Python 3.11.7" in body and "at start [1.0, 1.0, 1.0], at end [2.0, 2.0, 2.0]" in body
    assert "| student | mlp800 | 122 | 0.9878 | 1,276,810 | 5.11 | 0.9901 | 0.0421 | 319.5 |" in body
    assert "| baseline | mlp800-baseline | 142 | 0.9858 |" in body
    assert "Stages of the job: teacher 286.8 s, soft targets 24.0 s, students 319.5 s." in body
