"""Sweep cost: an 8-trial sweep on cached soft targets against the naive sweep that runs the teacher in every trial.

Both arms are the same `distill sweep` (configs/fashion_sweep.yaml, direct KD, a fixed 4 x 2 grid
over temperature and alpha, FIFO, one seed), run one after the other on this machine:

- cached: the production path. The teacher runs once, on the job's warm teacher actors, into the
  fingerprinted parquet cache; every trial streams its soft targets from there.
- naive: `teacher_mode=online`. Every trial runs the teacher inside its Ray Train worker on every
  batch of every epoch, which is what a sweep without a soft-target cache does.

The teacher is trained first, once, by `distill teacher` (not part of either arm's time). The cached
arm starts with an empty soft-target cache and pays for generating it; the naive arm then finds that
cache warm (it reads validation and test teacher logits from it) and pays for nothing but its own
teacher passes, so the ratio is if anything in the naive sweep's favour. Wall time = the whole
`distill sweep` command, Ray start-up and data loading included. Every figure is read back from the
commands' MLflow runs.

    python benchmarks/bench_sweep.py            # Fashion-MNIST, 8 trials x the config's 10 epochs (about 45 min on 2 CPUs)
    python benchmarks/bench_sweep.py --quick    # 6,000 rows, 4 trials x 2 epochs: checks the plumbing, not the numbers

Writes benchmarks/results/sweep_cost.json and sweep_cost.md (--quick: sweep_cost_quick.*).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("KD_BENCH_RESULTS", REPO_ROOT / "benchmarks" / "results"))  # run_all.py --quick points it elsewhere
CONFIG = "configs/fashion_sweep.yaml"
EXPERIMENT = "bench_sweep"
GRID = {"full": ([1.5, 3.0, 6.0, 12.0], [0.5, 0.9]), "quick": ([2.0, 8.0], [0.5, 0.9])}  # T x alpha
TARGET_SPEEDUP = 5.0


def log(msg: str) -> None:
    print(f"[bench_sweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def overrides(quick: bool) -> list[str]:
    temperatures, alphas = GRID["quick" if quick else "full"]
    common = [
        "sweep.search=random", "sweep.scheduler=fifo", "sweep.num_samples=1",
        f"sweep.space={{temperature: {{grid: {temperatures}}}, alpha: {{grid: {alphas}}}}}",
        f"tracking.experiment={EXPERIMENT}",
    ]
    if quick:
        common += ["dataset.limit=6000", "dataset.test_limit=1000", "teachers.0.train.epochs=1", "train.epochs=2"]
    return common


def distill(args: list[str], workdir: Path) -> float:
    """Run one `distill` command in `workdir` and return its wall time; a failure stops the benchmark."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    logfile = workdir / f"{args[0]}-{len(list(workdir.glob('*.log')))}.log"
    log(f"distill {' '.join(args)}  (log: {logfile})")
    started = time.perf_counter()
    with open(logfile, "w") as out:
        code = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"bench_sweep: `distill {args[0]}` exited {code} after {wall:.0f}s; see {logfile}")
    return wall


def arm_result(workdir: Path, run_name: str, wall_s: float) -> dict:
    """The arm's parent run, counts and trials, read back from its MLflow store."""
    import pandas as pd

    from orchestrator.tracking import runs as tracking

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([exp.experiment_id], filter_string=f"tags.job = 'sweep' and attributes.run_name = '{run_name}'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    trials = pd.read_csv(io.StringIO(tracking.artifact_text(uri, parent.info.run_id, "trials.csv")))
    metrics = parent.data.metrics
    best = trials.sort_values("val_accuracy", ascending=False).iloc[0]
    return {
        "mlflow_run_id": parent.info.run_id,
        "status": parent.info.status,
        "wall_s": round(wall_s, 1),
        "mlflow_run_s": round((parent.info.end_time - parent.info.start_time) / 1000, 1),
        "teacher_forward_rows": int(metrics["teacher_forward_rows"]),
        "trials": int(metrics["trials"]),
        "best": {"temperature": float(best["temperature"]), "alpha": float(best["alpha"]),
                 "val_accuracy": float(best["val_accuracy"]), "test_accuracy": float(best["test_accuracy"])},
        "trial_rows": [{"temperature": float(r.temperature), "alpha": float(r.alpha), "epochs_run": int(r.epochs_run),
                        "val_accuracy": float(r.val_accuracy), "test_accuracy": float(r.test_accuracy)} for r in trials.itertuples()],
    }


def speedup_of(cached: dict, naive: dict) -> float:
    """Naive wall time over cached, to 3 decimals: 2 would show 4.997 as 5.00 beside a missed 5x target."""
    return round(naive["wall_s"] / cached["wall_s"], 3)


def paired_accuracy(cached: dict, naive: dict) -> dict:
    """Test accuracy of the same (T, alpha) trial in both arms."""
    by_params = {(r["temperature"], r["alpha"]): r["test_accuracy"] for r in naive["trial_rows"]}
    diffs = [r["test_accuracy"] - by_params[(r["temperature"], r["alpha"])] for r in cached["trial_rows"] if (r["temperature"], r["alpha"]) in by_params]
    return {"pairs": len(diffs), "mean_diff": round(sum(diffs) / len(diffs), 4) if diffs else None,
            "max_abs_diff": round(max(abs(d) for d in diffs), 4) if diffs else None}


def run(workdir: Path, quick: bool) -> dict:
    from harness import loadavg, machine

    common = overrides(quick)
    load_start = loadavg()
    started = datetime.now(timezone.utc)
    config = str(REPO_ROOT / CONFIG)  # the commands run in workdir
    teacher_s = distill(["teacher", config, *common], workdir)
    cached_s = distill(["sweep", config, *common, "name=bench_sweep_cached"], workdir)
    naive_s = distill(["sweep", config, *common, "name=bench_sweep_naive", "teacher_mode=online"], workdir)
    cached = arm_result(workdir, "bench_sweep_cached-sweep", cached_s)
    naive = arm_result(workdir, "bench_sweep_naive-sweep", naive_s)
    speedup = speedup_of(cached, naive)
    return {
        "benchmark": "sweep_cost",
        "quick": quick,
        "started_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_avg_start": load_start,
        "load_avg_end": loadavg(),
        "command": "python benchmarks/bench_sweep.py" + (" --quick" if quick else ""),
        "config": CONFIG,
        "overrides": common,
        "teacher_train_s": round(teacher_s, 1),
        "cached": cached,
        "naive": naive,
        "speedup": speedup,
        "forward_rows_ratio": round(naive["teacher_forward_rows"] / max(cached["teacher_forward_rows"], 1), 1),
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": speedup >= TARGET_SPEEDUP,
        "accuracy": paired_accuracy(cached, naive),
    }


def markdown(report: dict) -> str:
    """The results table (also what the README's generated block shows)."""
    from harness import gpu_words

    m, c, n = report["machine"], report["cached"], report["naive"]
    acc = report["accuracy"]
    lines = [
        f"Command: `{report['command']}`{' (quick: plumbing only)' if report['quick'] else ''}  ",
        f"Run {report['started_utc']} on {m['nproc']} CPUs ({m['cpu_model']}), {gpu_words(m)}; Python {m['python']}, torch {m['torch']}, "
        f"ray {m['ray']}, mlflow {m['mlflow']}; load average {report['load_avg_start'][0]} at the start, {report['load_avg_end'][0]} at the end.  ",
        f"Both arms: `distill sweep {report['config']}` with `{' '.join(report['overrides'])}`; the teacher was trained once "
        f"beforehand (`distill teacher`, {report['teacher_train_s']:.0f} s, not counted).",
        "",
        "| sweep | wall time s | teacher forward rows | trials | best trial (by val) | its test accuracy |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for label, arm in (("cached soft targets (default)", c), ("naive: teacher in every trial (`teacher_mode=online`)", n)):
        b = arm["best"]
        lines.append(f"| {label} | {arm['wall_s']:.0f} | {arm['teacher_forward_rows']:,} | {arm['trials']} | "
                     f"T={b['temperature']:g}, alpha={b['alpha']:g} (val {b['val_accuracy']:.4f}) | {b['test_accuracy']:.4f} |")
    verdict = "meets" if report["meets_target"] else "misses"
    lines += [
        "",
        f"Cached sweep **{report['speedup']:.3f}x** faster than the naive one ({verdict} the >= {report['target_speedup']:g}x target), "
        f"with {report['forward_rows_ratio']:g}x fewer teacher forward rows. Same-(T, alpha) trials: test accuracy differs by "
        f"{acc['mean_diff']:+.4f} on average (cached - naive), at most {acc['max_abs_diff']:.4f}, over {acc['pairs']} pairs.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6,000 rows, 4 trials x 2 epochs (a few minutes): plumbing, not numbers")
    parser.add_argument("--workdir", help="scratch dir for the caches, MLflow store and Ray results (default: a new temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_sweep-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    report = run(workdir, args.quick)
    report["workdir"] = str(workdir)
    stem = "sweep_cost_quick" if args.quick else "sweep_cost"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
