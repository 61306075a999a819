"""What every benchmark shares: where results go, the machine and its load, `distill` run as a user runs it,
and the first lines of every report.

A benchmark is a short script: it calls `distill_run` (a subprocess, as `make demo` would run it), or
measures in-process (bench_pipeline.py, bench_growth.py), and writes one JSON under benchmarks/results/
with `write_result`. Each JSON starts with `report_header` (command, time, machine, load) and each
rendered report with `header_lines`, so every result says how to rerun it, where it ran and how busy
the machine was. Nothing here imports torch, Ray or MLflow at module level, so the README renderer
can import the benchmark modules cheaply.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("KD_BENCH_RESULTS", REPO / "benchmarks" / "results"))  # run_all.py --quick points it elsewhere


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: a figure taken beside another job is not a result."""
    return [round(x, 2) for x in os.getloadavg()]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict:
    """CPU, memory, GPU and the versions of what the numbers depend on (the `machine` of every results JSON)."""
    import mlflow
    import numpy as np
    import ray
    import torch

    def first(path: str, prefix: str) -> str:
        try:
            return next((line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines() if line.startswith(prefix)), "")
        except OSError:
            return ""

    try:  # `nproc`, not os.cpu_count(): the CPUs this process may run on (affinity), what the figures were taken with
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        nproc = os.cpu_count()
    mem_kb = first("/proc/meminfo", "MemTotal").split()
    return {
        "nproc": nproc, "cpu_model": first("/proc/cpuinfo", "model name"),
        "mem_gib": round(int(mem_kb[0]) / 1024**2, 1) if mem_kb else None,
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, "mlflow": mlflow.__version__,
        "numpy": np.__version__, "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_words(m: dict) -> str:
    """CPUs, memory, GPU and versions in one line: how every report names the machine it ran on."""
    return (f"{m.get('nproc')} x {m.get('cpu_model') or '?'}, {m.get('mem_gib')} GiB, {gpu_words(m)}; "
            f"torch {m.get('torch')}, ray {m.get('ray')}, mlflow {m.get('mlflow')}, Python {m.get('python')}")


def distill_run(config: str | Path, overrides: list[str], *, workdir: Path, summary: Path, log: Path) -> dict:
    """`distill run CONFIG OVERRIDES --summary-json SUMMARY` in `workdir` (its own MLflow store and caches),
    output to `log`; returns the summary rows with the wall time and the load before and after."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray, never another job's cluster
    argv = [sys.executable, "-m", "orchestrator.cli", "run", str(config), *overrides, "--summary-json", str(summary)]
    load_start, started, t0 = loadavg(), utc_now(), time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return {"command": " ".join(["distill", "run", str(Path(config).relative_to(REPO)) if Path(config).is_relative_to(REPO) else str(config), *overrides]),
            "started_utc": started, "wall_s": round(time.perf_counter() - t0, 1), "load_start": load_start, "load_end": loadavg(),
            "rows": json.loads(summary.read_text())}


def write_result(name: str, report: dict) -> Path:
    """benchmarks/results/<name>.json, written whole through a temporary file (a crash leaves the old one)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


def table(header: list[str], rows: list[list], align: str) -> list[str]:
    """A markdown table; align has one character per column, 'l' or 'r'."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def gpu_words(machine: dict) -> str:
    """Older results have no GPU field: say so rather than guess from the torch build."""
    if "gpu" not in machine:
        return "GPU not recorded"
    gpu = machine["gpu"]
    if not gpu:
        return "no GPU"
    return f"GPU {gpu}" if isinstance(gpu, str) else "GPU"


def report_header(load_start: list[float], script_argv: list[str] | None = None) -> dict:
    """What every in-process benchmark's JSON starts with: how to rerun it, when, where, and how busy the machine was.

    The command names the script actually run (`script_argv`, default sys.argv), relative to the repository, so a
    result never points at a script or a flag that did not produce it."""
    script, *args = script_argv if script_argv is not None else sys.argv
    path = Path(script).resolve()
    return {
        "command": " ".join([".venv/bin/python", str(path.relative_to(REPO)) if path.is_relative_to(REPO) else script, *args]),
        "finished_utc": utc_now(),
        "machine": machine(),
        "load_start": load_start,
        "load_end": loadavg(),
    }


def header_lines(report: dict) -> list[str]:
    """Command, when, machine and versions, load average: the first lines of every report written from a `report_header`
    (keys command, finished_utc or started_utc, machine, wall_s, load_start, load_end)."""
    when = f"Run {report['finished_utc']}" if "finished_utc" in report else f"Started {report['started_utc']}"
    return [
        f"Command: `{report['command']}`  ",
        f"{when} on {machine_words(report['machine'])}; {report['wall_s']:.0f} s in all.  ",
        f"Load average (1/5/15 min) at start {report['load_start']}, at end {report['load_end']}.",
    ]
