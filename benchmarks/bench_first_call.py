"""A job's first soft-target call on a fresh Ray against the plain loop (issue 15's "a first call on a fresh Ray").

    .venv/bin/python benchmarks/bench_first_call.py            # 3 jobs, each beside a plain pass (about 3 min)
    .venv/bin/python benchmarks/bench_first_call.py --jobs 1   # one (checks that it runs)

Each job is `distill soft-targets` as a user runs it, in a fresh process: a local Ray that the job starts (no
Ray was running), its teacher actors started at job start (stages.start_teachers, as every job does), the
teacher given as a state-dict file so that no teacher training hides the actors' start-up: what the job does
between its start and the call is the data, MLflow's runs and loading that file. MNIST, one view, 60,000
training + 10,000 test rows; teacher MLP 784-1200-1200-10 (random init, seeded) as in bench_pipeline.py; the
production soft_targets settings (2 actors x 1 thread, fp16, batch 4096); a new cache each job.

Production = the job's own figures, from its "soft targets: generated" line: the teacher pass (the actors'
call, from handing them the image blocks to every block written to the cache, waiting for actors not yet
started included) and the whole stage (the cache key, the pass, the manifest and the per-id columns).
Plain = this process, the same weights, 2 torch threads, normalise + forward + fp16 encode of the same 70,000
rows, right after each job. Ratio = plain seconds / production seconds (rows/s ratio). bench_pipeline.py's
stricter row, the first call with no job (the actors start with the call), is beside it in docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, header_lines, loadavg, log, median, report_header, table, write_result  # noqa: E402
from proc_meter import Foreign  # noqa: E402

TARGET = 0.7  # issue 15: a first call on a fresh Ray >= 0.7x the plain loop's rows/s
STAGE_LINE = re.compile(r"soft targets: generated, ([\d,]+) rows .*?([\d,]+) teacher forward rows.*?, (\d+) s \(teacher pass ([\d.]+) s\)")


def overrides(work: Path, teacher: Path, reader: str | None = None) -> list[str]:
    return ["views.max_shift=0", "views.num_views=null", f"teachers=[{{name: teacher, family: mlp, hidden: [1200, 1200], checkpoint: {teacher}}}]",
            f"soft_targets.cache_dir={work / 'cache'}", "tracking.experiment=first-call", *([f"dataset.reader={reader}"] if reader else [])]


def soft_targets_job(work: Path, teacher: Path, reader: str | None = None) -> dict:
    """One `distill soft-targets` job in a fresh process with its own local Ray; its teacher pass and stage seconds."""
    work.mkdir(parents=True)
    argv = [sys.executable, "-m", "orchestrator.cli", "soft-targets", str(REPO / "configs/mnist_kd.yaml"), *overrides(work, teacher, reader)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray, never another job's cluster
    load_start, started = loadavg(), time.perf_counter()
    with Foreign(poll=True) as foreign:  # the job and its Ray are children of this process: ours, not foreign
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"distill soft-targets exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    line = next((m for m in map(STAGE_LINE.search, (done.stdout + done.stderr).splitlines()) if m), None)
    if line is None:
        raise SystemExit(f"no 'soft targets: generated ... (teacher pass N s)' line in the job's output:\n{done.stdout[-2000:]}")
    rows, forward_rows = (int(g.replace(",", "")) for g in line.group(1, 2))
    return {"rows": rows, "forward_rows": forward_rows, "pass_s": float(line.group(4)), "stage_line": line.group(0),
            "job_wall_s": round(time.perf_counter() - started, 1), "load_start": load_start, "foreign": foreign.share}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3, help="jobs, each followed by a plain pass (default 3)")
    parser.add_argument("--reader", choices=("driver", "ray"), help="the jobs' dataset.reader (default: unset, the job's default: Ray's for MNIST)")
    args = parser.parse_args()
    started, load_start = time.perf_counter(), loadavg()

    import numpy as np
    import torch
    from bench_pipeline import plain_soft_targets
    from pipeline_parts import teacher_state

    from orchestrator.config import DatasetConfig
    from orchestrator.data.datasets import load_arrays

    arrays = load_arrays(DatasetConfig(name="mnist", reader="driver"))  # the plain loop's arrays, in this process
    images = np.concatenate([arrays.train.images, arrays.test.images])  # the job's rows: every train id, then the test ids
    model, state = teacher_state(arrays.input_shape, arrays.num_classes)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    plain_soft_targets(model, images[:8192], arrays.mean, arrays.std)  # this process's own first pass, not measured
    runs = []
    with tempfile.TemporaryDirectory(prefix="first-call-") as tmp:
        teacher = Path(tmp) / "teacher.pt"
        torch.save(state, teacher)
        for i in range(args.jobs):
            job = soft_targets_job(Path(tmp) / f"job-{i}", teacher, args.reader)
            if job["forward_rows"] != len(images):
                raise SystemExit(f"the job ran {job['forward_rows']:,} teacher rows, expected {len(images):,}")
            with Foreign() as foreign:
                plain_s = plain_soft_targets(model, images, arrays.mean, arrays.std)[0]
            runs.append({**job, "plain_s": round(plain_s, 3), "plain_foreign": foreign.share, "ratio": round(plain_s / job["pass_s"], 3)})
            log(f"job {i}: {job['stage_line']}; plain {plain_s:.2f} s; ratio {runs[-1]['ratio']}; foreign {job['foreign']} / {foreign.share}")
    report = {**report_header(load_start), "rows": len(images), "plain_threads": threads, "reader": args.reader, "runs": runs,
              "ratio": round(median([r["ratio"] for r in runs]), 3), "target": TARGET, "wall_s": round(time.perf_counter() - started, 1)}
    write_result("first_call", report)
    print(render(report))
    return 0


def render(report: dict) -> str:
    """The README block from first_call.json."""
    runs = report["runs"]
    rows = [[i, f"{r['plain_s']:.2f}", f"{r['pass_s']:.2f}", f"{r['ratio']:.2f}x", f"{r['stage_line'].rsplit(', ', 1)[1].split(' (')[0]}",
             f"{r['job_wall_s']:.0f}", f"{max(r['foreign'], r['plain_foreign']):.2f}"] for i, r in enumerate(runs)]
    ratio = report["ratio"]
    lines = header_lines(report) + [""]
    lines += table(["job", "plain loop s", "job's teacher pass s", "ratio (rows/s)", "job's whole soft-target stage", "job wall s", "foreign"],
                   rows, "rrrrrrr")
    lines += ["", f"Median ratio **{ratio:.2f}x** over {len(runs)} jobs (target >= {report['target']}: {'PASS' if ratio >= report['target'] else 'FAIL'}). "
              f"{report['rows']:,} rows a job; plain loop {report['plain_threads']} torch threads. A `distill soft-targets` job on a fresh local "
              "Ray (MNIST, one view, the teacher from a state-dict file, a new cache); its teacher actors start at job start; "
              + (f"`dataset.reader={report['reader']}`. " if report.get("reader") else "its images read as the job's default has them. ") +
              "foreign = the larger share of the CPUs used by other processes during the job or the plain pass."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
