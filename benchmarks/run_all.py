"""Every benchmark, one after the other, inside a time budget; then the README's results blocks.

    python benchmarks/run_all.py                     # `make bench`: what fits in 60 minutes, cheapest first
    python benchmarks/run_all.py --budget-min 300    # all of them (about 4.5 h on 2 CPU cores)
    python benchmarks/run_all.py --only sweep_cost,growth
    python benchmarks/run_all.py --quick             # `make bench-quick`: the quick variants, into a scratch dir

A benchmark starts only if its expected time fits in what is left of the budget. Its expected time is
the wall time its last full result recorded (benchmarks/results/<name>.json), else the estimate below;
what is skipped is listed with its command, so nothing is silently left out. Full runs write
benchmarks/results/ and then rewrite the README's generated blocks (readme_results.py). Quick runs
check the plumbing only: they write to a scratch directory (KD_BENCH_RESULTS), never over the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Bench:
    name: str  # its results/<name>.json
    steps: tuple[tuple[str, ...], ...]  # commands, run from the repo root; "{py}" is this Python, "{distill}" the CLI
    quick_steps: tuple[tuple[str, ...], ...] | None  # None: no quick variant
    estimate_min: float  # used until a full run has recorded its wall time
    workdir: bool = False  # the steps share a fresh directory (MLflow store and caches), "{work}"


BENCHES = (
    Bench("pipeline", (("{py}", "benchmarks/bench_pipeline.py"),), (("{py}", "benchmarks/bench_pipeline.py", "--quick"),), 15),
    Bench("first_call", (("{py}", "benchmarks/bench_first_call.py"),), (("{py}", "benchmarks/bench_first_call.py", "--jobs", "1"),), 2),
    Bench("growth", (("{py}", "benchmarks/bench_growth.py"),), (("{py}", "benchmarks/bench_growth.py", "--quick"),), 7),
    Bench("driver_memory", (("{py}", "benchmarks/bench_driver_memory.py"),), (("{py}", "benchmarks/bench_driver_memory.py", "--quick"),), 3),
    Bench("mnist_demo", (("{py}", "benchmarks/mnist_demo.py"),), None, 12),
    Bench("foreign_parquet", (("{py}", "benchmarks/foreign_parquet.py"),), (("{py}", "benchmarks/foreign_parquet.py", "--quick"),), 12),
    Bench("storage", (("{py}", "benchmarks/bench_storage.py"),), (("{py}", "benchmarks/bench_storage.py", "--quick"),), 30),
    Bench("sweep_cost", (("{py}", "benchmarks/bench_sweep.py"),), (("{py}", "benchmarks/bench_sweep.py", "--quick"),), 45),
    Bench("fashion_gap", (("{distill}", "run", "configs/fashion_kd.yaml"), ("{distill}", "sweep", "configs/fashion_sweep.yaml"),
                          ("{py}", "benchmarks/fashion_gap.py")), None, 50, workdir=True),
    Bench("methods", (("{py}", "benchmarks/bench_methods.py"),), (("{py}", "benchmarks/bench_methods.py", "--quick"),), 52),
    Bench("hinton_mnist", (("{distill}", "run", "configs/mnist_hinton.yaml", "--summary-json", "{work}/summary.json"),
                           ("{distill}", "run", "configs/mnist_hinton_small.yaml", "--summary-json", "{work}/summary_small.json"),
                           ("{py}", "benchmarks/hinton_mnist.py")), None, 70, workdir=True),
)


def recorded_minutes(bench: Bench) -> float | None:
    """Wall time of the last full run, where its JSON records one."""
    path = RESULTS / f"{bench.name}.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    if report.get("quick") or "--quick" in str(report.get("command", "")):
        return None
    seconds = report.get("wall_s")
    return seconds / 60 if isinstance(seconds, (int, float)) else None


def expected_minutes(bench: Bench, quick: bool) -> float:
    if quick:
        return max(3.0, bench.estimate_min / 8)
    return recorded_minutes(bench) or bench.estimate_min


def shown(step: tuple[str, ...]) -> str:
    return " ".join(step).replace("{py}", "python").replace("{distill}", "distill").replace("{work}/", "")


def run_bench(bench: Bench, steps, env: dict) -> int:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{bench.name}-")) if bench.workdir else REPO
    env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}") if bench.workdir else env
    for step in steps:
        argv = [a.replace("{py}", sys.executable).replace("{distill}", str(Path(sys.executable).with_name("distill"))).replace("{work}", str(work))
                for a in step]
        argv = [str(REPO / a) if a.startswith("configs/") or a.startswith("benchmarks/") else a for a in argv]
        print(f"[run_all] {bench.name}: {shown(step)}", flush=True)
        code = subprocess.run(argv, cwd=work, env=env).returncode
        if code != 0:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=60.0, help="start nothing whose expected time exceeds what is left (default 60)")
    parser.add_argument("--quick", action="store_true", help="quick variants only, written to a scratch dir (not benchmarks/results)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(b.name for b in BENCHES)}")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    unknown = set(args.only.split(",")) - {b.name for b in BENCHES} if args.only else set()
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.quick:
        env["KD_BENCH_RESULTS"] = tempfile.mkdtemp(prefix="bench-quick-")
    started = time.monotonic()
    outcome = []
    for bench in chosen:
        steps = bench.quick_steps if args.quick else bench.steps
        left = max(0.0, args.budget_min - (time.monotonic() - started) / 60)
        expected = expected_minutes(bench, args.quick)
        if steps is None:
            outcome.append((bench.name, "no quick variant", ""))
        elif expected > left:
            outcome.append((bench.name, f"skipped: expects {expected:.0f} min, {left:.0f} left", " && ".join(map(shown, steps))))
        else:
            t0 = time.monotonic()
            code = run_bench(bench, steps, env)
            outcome.append((bench.name, f"{'ok' if code == 0 else f'FAILED (exit {code})'} in {(time.monotonic() - t0) / 60:.1f} min", ""))
    if not args.quick and any(status.startswith("ok") for _, status, _ in outcome):
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_results.py")], cwd=REPO, check=False)
    print("\n[run_all] summary" + (f" (quick results in {env['KD_BENCH_RESULTS']})" if args.quick else ""))
    for name, status, command in outcome:
        print(f"  {name:13} {status}" + (f"  -> run: {command}" if command else ""))
    return 1 if any("FAILED" in status for _, status, _ in outcome) else 0


if __name__ == "__main__":
    raise SystemExit(main())
