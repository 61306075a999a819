"""benchmarks/run_all.py: the budget decides what starts, and nothing is left out silently."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run_all  # noqa: E402


def test_what_does_not_fit_the_budget_is_skipped_with_its_command(capsys):
    assert run_all.main(["--budget-min", "0"]) == 0
    out = capsys.readouterr().out
    for bench in run_all.BENCHES:
        line = next(line for line in out.splitlines() if line.strip().startswith(bench.name + " "))
        assert "skipped: expects" in line and "-> run: " in line, line
    assert "python benchmarks/bench_sweep.py" in out and "{" not in out  # placeholders never reach the user


def test_expected_time_comes_from_the_last_full_run(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    bench = next(b for b in run_all.BENCHES if b.name == "sweep_cost")
    assert run_all.expected_minutes(bench, quick=False) == bench.estimate_min  # no result yet
    (tmp_path / "sweep_cost.json").write_text('{"wall_s": 1800}')
    assert run_all.expected_minutes(bench, quick=False) == 30
    (tmp_path / "sweep_cost.json").write_text('{"wall_s": 120, "quick": true}')  # a quick run says nothing about a full one
    assert run_all.expected_minutes(bench, quick=False) == bench.estimate_min


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--only", "sweep_cost,nope"])
    assert exit_info.value.code == 2 and "unknown benchmark(s) nope" in capsys.readouterr().err
