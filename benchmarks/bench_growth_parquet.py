"""Growth through the parquet source: MNIST tiled to 1x, 4x and 16x rows, read from a file:// URI by Ray tasks (issue 15).

    .venv/bin/python benchmarks/bench_growth_parquet.py            # 1x, 4x, 16x with dataset.reader ray; 1x and 4x with reader driver
    .venv/bin/python benchmarks/bench_growth_parquet.py --quick    # 1x and 2x of 6,000 rows: checks that it runs
    .venv/bin/python benchmarks/bench_growth_parquet.py --s3       # the same, the training files on a moto S3 server (growth_parquet_s3.*)

The 60,000 MNIST training images are written once as a parquet file (pixels as a fixed-size list of uint8, row
groups of 10,000 rows; the 10,000 test images beside it); a k-times dataset is a folder of k hard links to that
file, so the rows repeat end to end and nothing is copied. Each size is one whole `distill run`, as a user runs it,
in a fresh process with its own local Ray, MLflow store and caches: a teacher given as a state-dict file (MLP
784-800-10, seeded, untrained: the rows' cost is under test, not the logits' values), soft targets for every row,
then one student (MLP 784-100-10, no twin, 2 epochs, 1 worker), all data read through `dataset.train_path` as a
file:// URI. Figures: the driver's peak RSS (`ru_maxrss` of the `distill` process, read by a wrapper that waits
for it, as bench_driver_memory.py does; and the job's own `driver_peak_rss_mb_*` metrics after each stage), the
soft-target stage's wall time, and the student's second-epoch training time (`train_s`, the worker's own).
With --s3 the folder is uploaded to a moto S3 server on 127.0.0.1 (foreign_parquet.s3_copy; k copies of the
file per k-times folder, as objects cannot be hard links) and read through an s3:// URI, the credentials in
the jobs' environment, which their local Ray's workers inherit. Writes benchmarks/results/growth_parquet[_s3].{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_driver_memory import MEASURE  # noqa: E402
from foreign_parquet import s3_copy  # noqa: E402
from harness import REPO, header_lines, loadavg, log, report_header, table, write_result  # noqa: E402

SEED = 0
ROW_GROUP = 10_000
LINEAR_TOLERANCE = 0.15  # "linear": time(kx) / time(1x) within 15% of k
MEMORY_TOLERANCE = 1.10  # the bound: the driver's peak at the largest size within 1.1x of its peak at 1x


def write_sources(folder: Path, factors: list[int], base_rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from orchestrator.config import ModelSpec, load_config
    from orchestrator.data.datasets import load_arrays
    from orchestrator.train.models import build_model

    mnist = load_arrays(load_config(None, ["dataset.reader=driver"]).dataset)
    for name, split, rows in (("train", mnist.train, base_rows), ("test", mnist.test, len(mnist.test))):
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(split.images[:rows]).reshape(-1)), 784)
        pq.write_table(pa.table({"image": pixels, "label": split.labels[:rows]}), folder / f"{name}.parquet", row_group_size=ROW_GROUP)
    for k in factors:
        (folder / f"train-{k}x").mkdir()
        for i in range(k):
            os.link(folder / "train.parquet", folder / f"train-{k}x" / f"part-{i:02d}.parquet")
    torch.manual_seed(SEED)
    torch.save(build_model(ModelSpec(family="mlp", hidden=[800]), (1, 28, 28), 10).state_dict(), folder / "teacher.pt")


def job(folder: Path, k: int, reader: str, s3=None) -> dict:
    """One `distill run` in a fresh process; its peak RSS, wall time, and what its MLflow runs recorded."""
    work = folder / f"job-{k}x-{reader}"
    work.mkdir()
    overrides = [
        "dataset.name=parquet", f"dataset.train_path={s3(f'train-{k}x')}" if s3 else f"dataset.train_path=file://{folder / f'train-{k}x'}", f"dataset.test_path=file://{folder / 'test.parquet'}",
        "dataset.image_shape=[1, 28, 28]", "dataset.num_classes=10", f"dataset.reader={reader}", "dataset.val_fraction=0",
        f"teachers=[{{name: mlp800, family: mlp, hidden: [800], checkpoint: {folder / 'teacher.pt'}}}]",
        "students=[{name: mlp100, family: mlp, hidden: [100]}]", "baseline=false", "views.max_shift=0", "views.flip=false",
        "train.epochs=2", "train.num_workers=1", "train.cpus_per_worker=2", "kd.temperature=4", "kd.alpha=0.9",
        f"soft_targets.cache_dir={work / 'cache'}", "tracking.experiment=growth-parquet",
    ]
    argv = [sys.executable, "-c", MEASURE, sys.executable, "-m", "orchestrator.cli", "run", str(REPO / "configs/mnist_kd.yaml"), *overrides,
            "--summary-json", str(work / "summary.json")]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}  # with s3_copy's AWS variables
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray, never another job's cluster
    load_start, started = loadavg(), time.perf_counter()
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    peak_kib, exit_code = (int(x) for x in done.stdout.strip().splitlines()[-1].split())
    if exit_code != 0:
        raise SystemExit(f"distill run ({k}x, {reader}) exited {exit_code}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - started
    return {"factor": k, "reader": reader, "driver_peak_rss_mb": round(peak_kib / 1024, 1), "wall_s": round(wall, 1),
            "load_start": load_start, "load_end": loadavg(), **recorded(uri, work / "summary.json")}


def recorded(uri: str, summary: Path) -> dict:
    from orchestrator.tracking import runs as tracking

    rows = json.loads(summary.read_text())
    student = next(r for r in rows if r["role"] == "student")
    client = tracking.client(uri)
    run = client.get_run(student["mlflow_run_id"])
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    train_s = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_s"), key=lambda m: m.step)]
    metrics = parent.data.metrics
    return {"soft_targets_s": round(metrics["wall_s_soft_targets"], 2),
            "train_s_per_epoch": [round(s, 2) for s in train_s], "students_s": round(metrics["wall_s_students"], 1),
            "job_driver_peak_rss_mb": {k.removeprefix("driver_peak_rss_mb_"): v for k, v in metrics.items() if k.startswith("driver_peak_rss_mb_")},
            "student_test_accuracy": student["test_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1x and 2x of 6,000 rows: checks that it runs, not the figures")
    parser.add_argument("--s3", action="store_true", help="the training files on a moto S3 server, read through an s3:// URI")
    args = parser.parse_args(argv)
    base_rows, factors, driver_factors = (6_000, [1, 2], [1]) if args.quick else (60_000, [1, 4, 16], [1, 4])
    load_start, started = loadavg(), time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="kd-growth-parquet-") as name:
        folder = Path(name)
        write_sources(folder, factors, base_rows)
        with s3_copy(folder) if args.s3 else contextlib.nullcontext() as s3:  # the folder as written: sources, k-times folders, teacher
            for reader, sizes in (("ray", factors), ("driver", driver_factors)):
                for k in sizes:
                    log(f"{k}x ({k * base_rows:,} rows), dataset.reader {reader}" + (", from S3 (moto)" if s3 else ""))
                    runs.append(job(folder, k, reader, s3))
                    log(f"driver peak {runs[-1]['driver_peak_rss_mb']:.0f} MB, soft targets {runs[-1]['soft_targets_s']:.1f} s, "
                        f"epochs {runs[-1]['train_s_per_epoch']} s, {runs[-1]['wall_s']:.0f} s in all, load {loadavg()}")
    report = report_header(load_start) | {"wall_s": round(time.perf_counter() - started, 1), "quick": args.quick, "base_rows": base_rows,
                                          "row_group": ROW_GROUP, "source": "s3 (moto)" if args.s3 else "file://", "runs": runs, "verdict": verdict(runs)}
    name = "growth_parquet_s3" if args.s3 else "growth_parquet"
    path = write_result(name, report)
    (path.parent / f"{name}.md").write_text(render(report))
    print(render(report))
    log(f"wrote {path}")
    return 0


def verdict(runs: list[dict]) -> dict:
    ray_runs = [r for r in runs if r["reader"] == "ray"]
    first, last = ray_runs[0], ray_runs[-1]
    k = last["factor"] / first["factor"]
    soft = last["soft_targets_s"] / first["soft_targets_s"]
    epoch = last["train_s_per_epoch"][-1] / first["train_s_per_epoch"][-1]
    memory = last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"]
    # The same ratios between the two largest sizes: where a fixed cost (actor and process start-up, a short epoch's
    # overheads) is a small part of both, they show how the time grows with the rows past it.
    before = ray_runs[-2] if len(ray_runs) > 2 else first
    return {"factor": k, "driver_peak_ratio": round(memory, 3), "driver_peak_within_1_1x": memory <= MEMORY_TOLERANCE,
            "soft_targets_ratio": round(soft, 2), "epoch_ratio": round(epoch, 2),
            "soft_targets_linear": abs(soft / k - 1) <= LINEAR_TOLERANCE, "epoch_linear": abs(epoch / k - 1) <= LINEAR_TOLERANCE,
            "last_step": [before["factor"], last["factor"]],
            "last_step_soft_targets_ratio": round(last["soft_targets_s"] / before["soft_targets_s"], 2),
            "last_step_epoch_ratio": round(last["train_s_per_epoch"][-1] / before["train_s_per_epoch"][-1], 2)}


def render(report: dict) -> str:
    lines = header_lines(report) + [""]
    rows = [[f"{r['factor']}x", f"{r['factor'] * report['base_rows']:,}", r["reader"], f"{r['driver_peak_rss_mb']:,.0f}",
             " / ".join(f"{v:,.0f}" for v in r["job_driver_peak_rss_mb"].values()), f"{r['soft_targets_s']:.1f}",
             f"{r['train_s_per_epoch'][-1]:.1f}", f"{r['wall_s']:.0f}", f"{r['student_test_accuracy']:.4f}"] for r in report["runs"]]
    lines += table(["size", "training rows", "dataset.reader", "driver peak RSS MB", "job's own peak after teacher / soft targets / students",
                    "soft targets s", "student epoch 2 train s", "job wall s", "student test accuracy"], rows, "lrlrrrrrr")
    v = report["verdict"]
    lines += ["", f"dataset.reader ray, {v['factor']:.0f}x the rows against 1x: driver peak {v['driver_peak_ratio']}x "
              f"({'within' if v['driver_peak_within_1_1x'] else 'outside'} 1.1x); soft targets {v['soft_targets_ratio']}x "
              f"({'linear' if v['soft_targets_linear'] else 'not linear'}), student epoch {v['epoch_ratio']}x "
              f"({'linear' if v['epoch_linear'] else 'not linear'}; linear = within 15% of {v['factor']:.0f})."
              + (f" From {v['last_step'][0]}x to {v['last_step'][1]}x ({v['last_step'][1] / v['last_step'][0]:.0f}x the rows): soft targets "
                 f"{v['last_step_soft_targets_ratio']}x, student epoch {v['last_step_epoch_ratio']}x." if "last_step" in v else "")
              + (" Quick run: checks that it runs, not the figures." if report.get("quick") else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
