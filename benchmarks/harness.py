"""What every benchmark shares: where results go, the machine and its load, and `distill` run as a user runs it.

A benchmark is a short script: it calls `distill_run` (a subprocess, as `make demo` would run it),
reads the summary rows, and writes one JSON under benchmarks/results/ with `write_result`, which
stamps the machine, the versions and the load. Nothing here imports torch, Ray or MLflow at module
level, so the README renderer can import the benchmark modules cheaply.
"""

from __future__ import annotations

import json
import os
import platform
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


def machine() -> dict:
    """CPU, memory, GPU and the versions of what the numbers depend on."""
    import mlflow
    import ray
    import torch

    def first(path: str, prefix: str) -> str:
        try:
            return next((line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines() if line.startswith(prefix)), "")
        except OSError:
            return ""

    mem_kb = first("/proc/meminfo", "MemTotal").split()
    return {
        "nproc": os.cpu_count(), "cpu_model": first("/proc/cpuinfo", "model name"),
        "mem_gib": round(int(mem_kb[0]) / 1024**2, 1) if mem_kb else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, "mlflow": mlflow.__version__,
    }


def machine_words(m: dict) -> str:
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    return (f"{m.get('nproc')} x {m.get('cpu_model') or 'CPU'}, {m.get('mem_gib')} GiB, {gpu}; "
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
