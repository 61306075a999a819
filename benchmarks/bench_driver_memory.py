"""The driver's memory in the soft-target stage: does it hold the teacher's logits? (issue 15)

    .venv/bin/python benchmarks/bench_driver_memory.py                   # 200,000 + 10,000 rows, 10 and 1,000 classes (about 2 min)
    .venv/bin/python benchmarks/bench_driver_memory.py --baseline 6cc6cc5  # the same jobs on that commit's code too (a git worktree)
    .venv/bin/python benchmarks/bench_driver_memory.py --quick           # 20,000 + 2,000 rows (checks that it runs)

A soft-targets job (`distill soft-targets`, as a user runs it, in a fresh process with its own local Ray,
MLflow store and cache) on a parquet dataset written here: random 8x8 grey images, labels cycling through
the classes, and a teacher given as a state-dict file (an MLP with 64 hidden units, seeded, untrained: the
logits' size is under test, not their values). The same rows are run twice, with a 10-class and a 1,000-class
teacher; the only difference between the two jobs is the width of every logit row, 20 vs 2,000 bytes in fp16.
A driver that pulled the soft targets into its own memory would peak that much higher (420 MB for 210,000
rows at 1,000 classes, more with its copies); one that holds references only peaks the same.

The figure is the driver process's peak resident set (`ru_maxrss` of the `distill` process, read by a
wrapper process that starts it and waits for it). `--baseline REV` runs the same two jobs on the library as it
was at REV (checked out in a temporary git worktree, put first on the jobs' PYTHONPATH), so a change is measured
before and after by one script on one machine. Writes benchmarks/results/driver_memory.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, header_lines, loadavg, log, report_header, table, write_result  # noqa: E402

SEED = 0
CLASSES = (10, 1000)
# Starts `distill` and prints its peak RSS in KiB (ru_maxrss of the waited-for children: here, that one process).
MEASURE = "import resource, subprocess, sys; exit_code = subprocess.run(sys.argv[1:]).returncode; " \
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, exit_code)"


def write_dataset(folder: Path, train_rows: int, test_rows: int, classes: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(SEED)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        images = rng.integers(0, 256, (rows, 64), dtype=np.uint8)
        labels = np.arange(rows, dtype=np.int64) % classes
        pq.write_table(pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(images.ravel()), 64), "label": labels}),
                       folder / f"{name}-{classes}.parquet")


def write_teacher(path: Path, classes: int) -> None:
    import torch

    from orchestrator.config import ModelSpec
    from orchestrator.train.models import build_model

    torch.manual_seed(SEED)
    torch.save(build_model(ModelSpec(family="mlp", hidden=[64]), (1, 8, 8), classes).state_dict(), path)


def soft_targets_job(work: Path, classes: int, code: Path = REPO) -> dict:
    """One `distill soft-targets` job in a fresh process, on the library at `code`; its peak RSS, wall time and what it printed."""
    overrides = ["dataset.name=parquet", f"dataset.train_path={work / f'train-{classes}.parquet'}", f"dataset.test_path={work / f'test-{classes}.parquet'}",
                 "dataset.image_shape=[1, 8, 8]", f"dataset.num_classes={classes}",
                 f"teachers=[{{name: t{classes}, family: mlp, hidden: [64], checkpoint: {work / f't{classes}.pt'}}}]",
                 f"soft_targets.cache_dir={work / f'cache-{classes}-{code.name}'}", "soft_targets.num_actors=1", "tracking.experiment=driver-memory"]
    argv = [sys.executable, "-c", MEASURE, sys.executable, "-m", "orchestrator.cli", "soft-targets", str(REPO / "configs/digits_kd.yaml"), *overrides]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONPATH": str(code)}
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray, never another job's cluster
    load_start, started = loadavg(), time.perf_counter()
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, check=True)
    peak_kib, exit_code = (int(x) for x in done.stdout.strip().splitlines()[-1].split())
    if exit_code != 0:
        raise SystemExit(f"distill soft-targets exited {exit_code}:\n{done.stderr[-3000:]}")
    line = next((l for l in (done.stdout + done.stderr).splitlines() if l.startswith("soft targets: generated")), "")
    return {"code": revision(code), "classes": classes, "driver_peak_rss_mb": round(peak_kib / 1024, 1), "wall_s": round(time.perf_counter() - started, 1),
            "load_start": load_start, "load_end": loadavg(), "stage_line": line}


def revision(code: Path) -> str:
    return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def worktree(rev: str):
    """The repository at `rev` in a temporary detached git worktree, removed after."""
    folder = Path(tempfile.mkdtemp(prefix="kd-baseline-")) / "code"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), rev], capture_output=True, text=True, check=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], capture_output=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 + 2,000 rows: checks that it runs, not the figures")
    parser.add_argument("--baseline", metavar="REV", help="also run the jobs on the library as it was at this git revision")
    args = parser.parse_args(argv)
    train_rows, test_rows = (20_000, 2_000) if args.quick else (200_000, 10_000)
    load_start, started = loadavg(), time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="kd-driver-memory-") as folder:
        work = Path(folder)
        for classes in CLASSES:
            write_dataset(work, train_rows, test_rows, classes)
            write_teacher(work / f"t{classes}.pt", classes)
        with contextlib.ExitStack() as stack:
            codes = [REPO] + ([stack.enter_context(worktree(args.baseline))] if args.baseline else [])
            for code in codes:
                for classes in CLASSES:
                    log(f"{classes} classes, {train_rows + test_rows:,} rows, library at {revision(code)}")
                    runs.append(soft_targets_job(work, classes, code))
                    log(f"driver peak {runs[-1]['driver_peak_rss_mb']:.0f} MB, {runs[-1]['wall_s']:.0f} s")
    report = report_header(load_start) | {"wall_s": round(time.perf_counter() - started, 1), "quick": args.quick, "head": revision(REPO),
                                          "train_rows": train_rows, "test_rows": test_rows, "runs": runs}
    path = write_result("driver_memory", report)
    print(render(report))
    log(f"wrote {path}")
    return 0


def render(report: dict) -> str:
    rows_total = report["train_rows"] + report["test_rows"]
    lines = header_lines(report) + [""]
    rows = [[f"`{r['code']}`" + (" (the checkout run)" if r["code"] == report["head"] else " (--baseline)"),
             f"{r['classes']:,}", f"{rows_total * r['classes'] * 2 / 1e6:,.1f}", f"{r['driver_peak_rss_mb']:,.0f}", f"{r['wall_s']:.0f}"]
            for r in report["runs"]]
    lines += table(["library at", "teacher classes", "soft targets in fp16, MB", "driver peak RSS, MB", "job wall s"], rows, "lrrrr")
    words = []
    for code in dict.fromkeys(r["code"] for r in report["runs"]):
        mine = [r for r in report["runs"] if r["code"] == code]
        words.append(f"`{code}`: {mine[-1]['driver_peak_rss_mb'] - mine[0]['driver_peak_rss_mb']:+,.0f} MB")
    lines += ["", f"{rows_total:,} rows ({report['train_rows']:,} train + {report['test_rows']:,} test), one view each. The driver's peak "
              f"from {CLASSES[0]} to {CLASSES[-1]:,} classes: {'; '.join(words)}."
              + (" Quick run: checks that it runs, not the figures." if report.get("quick") else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
