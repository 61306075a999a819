"""The README methods table: one teacher-student pair on Fashion-MNIST, every distillation method.

    .venv/bin/python benchmarks/bench_methods.py            # the table (about 30-60 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_methods.py --quick    # smoke run: 5k/1k rows, 1 epoch everywhere
    .venv/bin/python benchmarks/bench_methods.py --only response,dml

Runs each config of configs/fashion_methods/ with the same command a user would type,
`distill run configs/fashion_methods/<name>.yaml --summary-json ...` (as
`python -m orchestrator.cli`), one after the other, and collects the summary rows into
benchmarks/results/methods.json and methods.md (the table the README copies). The jobs
share the teacher through the teacher cache (same architecture, data and seed) and the
soft-target cache, so it trains once. MLflow: $MLFLOW_TRACKING_URI, else ./mlflow.db.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("KD_BENCH_RESULTS", REPO / "benchmarks" / "results"))  # run_all.py --quick points it elsewhere
CONFIGS = REPO / "configs" / "fashion_methods"

# (config stem, row name in its summary, label in the table), in table order.
ROWS = [
    ("response", "cnn32x64", "teacher: CNN 32-64 + FC 256"),
    ("response", "baseline", "baseline (labels only)"),
    ("response", "kd", "kd (Hinton 2015)"),
    ("response", "dkd", "dkd (Zhao 2022)"),
    ("response", "kd-ls", "kd + logit standardization (Sun 2024)"),
    ("features", "fitnet", "FitNets (Romero 2015)"),
    ("features", "at", "attention transfer (Zagoruyko 2017)"),
    ("features", "rkd", "RKD distance + angle (Park 2019)"),
    ("multi_teacher", "multi-teacher", "multi-teacher: CNN 32-64 x2 + CNN 16-32 x1, logit mean"),
    ("born_again", "born-again", "born-again, generation 3 (Furlanello 2018)"),
    ("dml", "dml-a", "DML, peer a (Zhang 2018)"),
    ("dml", "dml-b", "DML, peer b (Zhang 2018)"),
]
JOBS = list(dict.fromkeys(stem for stem, _, _ in ROWS))


def log(msg: str) -> None:
    print(f"[methods {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quick_overrides(config: Path) -> list[str]:
    import yaml

    teachers = yaml.safe_load(config.read_text()).get("teachers", [{}])
    return ["dataset.limit=5000", "dataset.test_limit=1000", "train.epochs=1", "tracking.experiment=fashion_methods_quick",
            *(f"teachers.{i}.train.epochs=1" for i in range(len(teachers)))]


def run_job(stem: str, overrides: list[str]) -> tuple[list[dict], float, str]:
    config = CONFIGS / f"{stem}.yaml"
    command = " ".join(["distill", "run", str(config.relative_to(REPO)), *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        started = time.perf_counter()
        log(f"$ {command}")
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(config), *overrides, "--summary-json", str(summary)],
                       cwd=REPO, check=True)
        wall = time.perf_counter() - started
        return json.loads(summary.read_text()), wall, command


def methods_machine() -> dict:
    """harness.machine() under the keys methods.json has always had ("cpus", the 1-minute load at the start inside it),
    so the committed methods.json and a new one render alike."""
    from harness import machine

    m = machine()
    return {
        "python": m["python"], "platform": m["platform"], "cpus": os.cpu_count(),
        "torch": m["torch"], "ray": m["ray"], "mlflow": m["mlflow"], "gpu": m["gpu"],
        "load_average_start": os.getloadavg()[0],
    }


def table(result: dict) -> str:
    lines = [
        "Command: `" + result["command"] + "`  ",
        f"Run {result['started']} on {result['machine']['cpus']} CPUs ({result['machine']['gpu'] or 'no GPU'}); "
        f"torch {result['machine']['torch']}, ray {result['machine']['ray']}, mlflow {result['machine']['mlflow']}, "
        f"Python {result['machine']['python']}; "
        f"load average {result['machine']['load_average_start']:.1f} at the start, {result['load_average_end']:.1f} at the end; "
        f"{result['wall_s'] / 60:.1f} min in all." + (" **Quick mode: 5k/1k rows, 1 epoch; not the table's numbers.**" if result["quick"] else ""),
        "",
        "| method | test accuracy | test errors | agreement with teacher | KL to teacher | parameters | reproduce |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['method']} | {row['test_accuracy']:.4f} | {row['test_errors']} | {row['agreement']:.4f} | "
                     f"{row['kl_to_teacher']:.4f} | {row['params']:,} | `{row['command']}` |")
    lines.append("")
    lines.append("Job wall times: " + ", ".join(f"{stem} {wall / 60:.1f} min" for stem, wall in result["job_wall_s"].items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5k train / 1k test rows, 1 epoch: checks the plumbing, not the numbers")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(JOBS)}")
    parser.add_argument("--out", default=str(RESULTS), help="where methods.json and methods.md go")
    args = parser.parse_args(argv)
    jobs = args.only.split(",") if args.only else JOBS
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        parser.error(f"unknown jobs {unknown} (known: {', '.join(JOBS)})")

    started, info, t0 = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), methods_machine(), time.perf_counter()
    summaries, walls, commands = {}, {}, {}
    for stem in jobs:
        overrides = quick_overrides(CONFIGS / f"{stem}.yaml") if args.quick else []
        summaries[stem], walls[stem], commands[stem] = run_job(stem, overrides)
    rows = []
    for stem, name, label in ROWS:
        if stem not in summaries:
            continue
        found = next(r for r in summaries[stem] if r["name"] == name)
        rows.append({"method": label, "job": stem, "command": commands[stem], **found})
    result = {
        "command": " ".join(["python", "benchmarks/bench_methods.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": started, "quick": args.quick, "machine": info, "load_average_end": os.getloadavg()[0],
        "wall_s": time.perf_counter() - t0, "job_wall_s": walls, "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "methods_quick" if args.quick else "methods"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table(result))
    log(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
