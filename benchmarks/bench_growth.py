"""How cost grows with the data: soft targets and one student epoch at 1x, 2x and 4x the MNIST train rows, with peak memory.

    .venv/bin/python benchmarks/bench_growth.py [--quick]

The MNIST train rows at 1x, 2x and 4x (the rows repeated end to end, np.tile along rows):
soft-target generation on the actor pool (median of 3 runs per size, sizes interleaved) and one
steady-state student epoch of a 1-worker Ray Train run (3 epochs per run), with the driver's peak
RSS after each stage, the Ray Train worker's (`worker_peak_rss_mb`) and the teacher actors' (VmHWM
polled from /proc, see proc_meter.py). Ratios time(kx)/time(1x) are "linear" only within 15% of k.
The teacher, the production soft-target path and the student run are those of bench_pipeline.py
(pipeline_parts.py). Writes benchmarks/results/growth.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import RESULTS, header_lines, loadavg, log, median, report_header, write_result
from pipeline_parts import (
    SEED,
    STUDENT_BATCH,
    VAL_FRACTION,
    mnist_on_fresh_ray,
    production_teacher,
    ray_soft_targets,
    ray_student_run,
    student_loop,
)
from proc_meter import MAX_FOREIGN, ActorPeak, Foreign, driver_memory, reset_driver_hwm

from orchestrator.train.memory import peak_rss_mb

GROWTH_FACTORS = (1, 2, 4)
LINEAR_TOLERANCE = 0.15  # "linear": time(kx)/time(1x) within 15% of k


def tiled(arrays, factor: int, base_rows: int):
    """The first `base_rows` MNIST train rows, repeated `factor` times end to end (np.concatenate of copies,
    i.e. np.tile along rows); an empty test split."""
    from orchestrator.data.datasets import DatasetArrays, Split

    images, labels = arrays.train.images[:base_rows], arrays.train.labels[:base_rows]
    split = Split(np.ascontiguousarray(np.concatenate([images] * factor)), np.concatenate([labels] * factor))
    return DatasetArrays(arrays.name, split, Split(images[:0], labels[:0]), arrays.num_classes, arrays.input_shape, arrays.mean, arrays.std)


def growth_ratio(seconds: dict[int, float]) -> dict:
    ratios = {f"{k}x": round(seconds[k] / seconds[1], 3) for k in GROWTH_FACTORS if k != 1}
    within = {f"{k}x": abs(seconds[k] / seconds[1] / k - 1) <= LINEAR_TOLERANCE for k in GROWTH_FACTORS if k != 1}
    return {"time_ratio_vs_1x": ratios, "within_15pct_of_k": within, "linear": all(within.values())}


def bench_growth(arrays, *, base_rows: int, rounds: int, epochs: int, threads: int, gen_budget_s: float) -> dict:
    """Soft-target generation (actor pool) and one Ray Train student epoch (1 worker) at 1x/2x/4x rows."""
    import gc

    import pyarrow as pa
    import ray

    from orchestrator.data.datasets import split_train_val
    from orchestrator.flows.stages import SoftTargets, student_datasets
    from orchestrator.teachers.soft_targets import DENSE_COLUMN, column_to_numpy
    from orchestrator.tracking import runs as tracking

    _, cfg, teachers = production_teacher(arrays)
    before = round(peak_rss_mb(), 1)  # MNIST loaded, Ray started, teacher built
    hwm_ok = reset_driver_hwm()
    out: dict = {"base_rows": base_rows, "factors": list(GROWTH_FACTORS), "rounds": rounds, "config": cfg.soft_targets.model_dump(),
                 "driver_stage_hwm_available": hwm_ok, "driver_peak_rss_mb_before_stages": before}

    def generate(factor: int) -> tuple[dict, np.ndarray | None]:
        data = tiled(arrays, factor, base_rows)
        rows = len(data.train)
        gc.collect()
        reset_driver_hwm()
        with ActorPeak("TeacherActor") as actors, Foreign() as foreign:
            seconds, materialized = ray_soft_targets(cfg, teachers, data)
        entry = {"rows": rows, "s": round(seconds, 3), "rows_per_s": round(rows / seconds, 1), "foreign": foreign.share,
                 **driver_memory(hwm_ok), **actors.summary()}
        logits = None
        if factor == 1:
            table = pa.concat_tables(ray.get(materialized.select_columns(["id", DENSE_COLUMN]).to_arrow_refs())).sort_by("id")
            if not np.array_equal(column_to_numpy(table, "id"), np.arange(rows)):
                raise RuntimeError("the actor pool did not return every row exactly once")
            logits = column_to_numpy(table, DENSE_COLUMN)
        elif materialized.count() != rows:
            raise RuntimeError(f"{factor}x: materialized {materialized.count()} rows, expected {rows}")
        del materialized
        log(f"growth soft targets {factor}x ({rows:,} rows): {seconds:.2f} s, {rows / seconds:,.0f} rows/s, foreign {foreign.share}, "
            f"driver {entry['driver_peak_rss_mb']:.0f} MB (stage {entry.get('driver_stage_peak_rss_mb', float('nan')):.0f}), "
            f"actors {entry['actor_peak_rss_mb']} MB, load {loadavg()}")
        return entry, logits

    # First call on this cluster: the teacher actors' processes start. Kept, not in the ratios.
    out["first_call_1x"], logits_1x = generate(1)
    runs: dict[int, list[dict]] = {k: [] for k in GROWTH_FACTORS}
    deadline = time.perf_counter() + gen_budget_s  # a busy machine must not stretch the run: later rounds are dropped
    for r in range(rounds):  # interleaved sizes: slow drift in background load hits every size alike
        if r and time.perf_counter() > deadline:
            log(f"growth soft targets: {r} of {rounds} rounds done, generation budget ({gen_budget_s:.0f} s) spent")
            break
        for k in GROWTH_FACTORS:
            runs[k].append(generate(k)[0])
    out["rounds_done"] = len(runs[1])
    soft = {}
    for k in GROWTH_FACTORS:
        seconds = median([run["s"] for run in runs[k]])
        soft[f"{k}x"] = {
            "rows": runs[k][0]["rows"],
            "median_s": round(seconds, 3),
            "rows_per_s": round(runs[k][0]["rows"] / seconds, 1),
            "max_foreign": max(run["foreign"] for run in runs[k]),
            "driver_peak_rss_mb": max(run["driver_peak_rss_mb"] for run in runs[k]),
            **({"driver_stage_peak_rss_mb": max(run["driver_stage_peak_rss_mb"] for run in runs[k])} if hwm_ok else {}),
            "actor_peak_rss_mb": max((max(run["actor_peak_rss_mb"]) for run in runs[k] if run["actor_peak_rss_mb"]), default=None),
            "runs": runs[k],
        }
    soft["growth"] = growth_ratio({k: soft[f"{k}x"]["median_s"] for k in GROWTH_FACTORS})
    out["soft_targets"] = soft

    work = Path(tempfile.mkdtemp(prefix="kd-bench-growth-"))
    student = {}
    try:
        uri = f"sqlite:///{work / 'mlflow.db'}"
        experiment = tracking.ensure_experiment(uri, "bench-growth")
        make_loop = student_loop(arrays, work / "ray_results", "fp16")
        for k in GROWTH_FACTORS:
            data = tiled(arrays, k, base_rows)
            n = len(data.train)
            # Teacher logits of the tiled rows = the 1x logits tiled the same way (same images, same teacher).
            # In the object store, as a job's are: (rows, 1 view, classes).
            soft_k = SoftTargets("bench", ray.put({DENSE_COLUMN: np.concatenate([logits_1x] * k)[:, None]}), ray.put({}), n, 0, 1, False, 0, 0.0, "", "")
            train_ids, val_ids = split_train_val(n, VAL_FRACTION, SEED)
            gc.collect()
            reset_driver_hwm()
            datasets, objects = student_datasets(data, train_ids, val_ids, soft_k)
            run_id = tracking.create_run(uri, experiment, f"student-{k}x")
            with ActorPeak("RayTrainWorker") as train_workers:
                run = ray_student_run(make_loop(epochs, 1, float(threads), run_id, uri, train_rows=len(train_ids)), datasets, work / "clock.txt", last_metrics=True, objects=objects)
            tracking.end_run(uri, run_id)
            last = run.pop("last_metrics")
            polled = train_workers.summary()
            run.update({"rows": len(train_ids), "val_rows": len(val_ids), "worker_peak_rss_mb": round(float(last.get("worker_peak_rss_mb", float("nan"))), 1),
                        "train_worker_vmhwm_polled_mb": polled["actor_peak_rss_mb"], "train_worker_pids": polled["actor_pids"],
                        "train_worker_titles": polled["actor_titles"], **driver_memory(hwm_ok)})
            student[f"{k}x"] = run
            del datasets, data, soft_k
            log(f"growth student {k}x ({len(train_ids):,} train rows): {run}, load {loadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    student["growth"] = growth_ratio({k: student[f"{k}x"]["steady_epoch_s"] for k in GROWTH_FACTORS})
    student["growth_in_worker"] = growth_ratio({k: student[f"{k}x"]["steady_epoch_s_in_worker"] for k in GROWTH_FACTORS})
    out["student_epoch"] = {"workers": 1, "cpus_per_worker": float(threads), "epochs_per_run": epochs, "batch_size": STUDENT_BATCH, **student}
    return out


# ------------------------------------------------------------------------------------ report


def _linear_words(growth: dict) -> str:
    r = growth["time_ratio_vs_1x"]
    word = "linear" if growth["linear"] else "not linear"
    return f"{r['2x']:.2f} / {r['4x']:.2f} ({word})"


def write_growth_reports(report: dict) -> None:
    write_result("growth", report)
    (RESULTS / "growth.md").write_text(render_growth(report))


def render_growth(report: dict) -> str:
    """growth.md from growth.json."""
    g = report["growth"]
    st, se = g["soft_targets"], g["student_epoch"]
    hwm = g["driver_stage_hwm_available"]
    first = g["first_call_1x"]
    soft_foreign = ", ".join(f"{k}x {st[f'{k}x']['max_foreign']:.2f}" for k in g["factors"])
    student_foreign = ", ".join(f"{k}x {se[f'{k}x']['foreign_cpu_share']:.2f}" for k in g["factors"])
    polled_train = ", ".join(f"{k}x {se[f'{k}x']['train_worker_vmhwm_polled_mb'] or 'not seen'} MB" for k in g["factors"])
    lines = header_lines(report)
    lines[-1] += f" Ray start-up ({report['ray_init_s']:.1f} s) is not counted."
    lines += [
        "",
        f"Rows: the first {g['base_rows']:,} MNIST train rows (1x), and the same rows repeated 2 and 4 times end to end "
        "(np.concatenate of copies, i.e. np.tile along rows).",
        "",
        "| size | rows | soft targets s | rows/s | driver peak MB | teacher actor peak MB | student train rows | student epoch s (report interval) | in-worker epoch s | driver peak MB | worker peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def drv(entry: dict) -> str:
        stage = f" (stage {entry['driver_stage_peak_rss_mb']:.0f})" if hwm and "driver_stage_peak_rss_mb" in entry else ""
        return f"{entry['driver_peak_rss_mb']:.0f}{stage}"

    for k in g["factors"]:
        s, e = st[f"{k}x"], se[f"{k}x"]
        actor = f"{s['actor_peak_rss_mb']:.0f}" if s["actor_peak_rss_mb"] else "not seen"
        lines.append(f"| {k}x | {s['rows']:,} | {s['median_s']:.2f} | {s['rows_per_s']:,.0f} | {drv(s)} | {actor} | {e['rows']:,} | "
                     f"{e['steady_epoch_s']:.2f} | {e['steady_epoch_s_in_worker']:.2f} | {drv(e)} | {e['worker_peak_rss_mb']:.0f} |")
    lines += [
        f"| time(2x)/time(1x) / time(4x)/time(1x) | | {_linear_words(st['growth'])} | | | | | {_linear_words(se['growth'])} | "
        f"{_linear_words(se['growth_in_worker'])} | | |",
        "",
        f"- \"linear\" only where both ratios are within {LINEAR_TOLERANCE:.0%} of 2 and 4.",
        f"- Soft targets: `generate_soft_targets(...)` (teacher MLP 784-1200-1200-10, random init; default "
        f"`soft_targets` config: {st['1x']['runs'][0]['actor_processes'] or '?'} actor processes seen, "
        f"{g['config']['num_actors']} x {g['config']['num_cpus_per_actor']:g} CPU, batch {g['config']['batch_size']}, {g['config']['encoding']}), "
        f"timed from building the Ray dataset to materialized; median of {g['rounds_done']} runs per size, sizes interleaved "
        f"(foreign CPU share per size at most {soft_foreign}). "
        f"The first call on the fresh cluster (1x, worker processes start: {first['s']:.2f} s, {first['rows_per_s']:,.0f} rows/s) is not in the table.",
        f"- Driver peak RSS before the first stage (MNIST loaded, Ray started, teacher built): {g['driver_peak_rss_mb_before_stages']:.0f} MB.",
        f"- Student epoch: one Ray Train run per size (`build_trainer`, 1 worker x {se['cpus_per_worker']:g} CPU, {se['epochs_per_run']} epochs, "
        f"MLP 784-800-800-10, KD loss, batch {se['batch_size']}, MLflow logging on), 90/10 train/val split of the tiled rows "
        "(validation grows with the size too). Student epoch s = median interval between consecutive reports (train + "
        "validation + checkpoint + MLflow + report), epoch 0 (shard pull) excluded; in-worker = the worker's own `epoch_s` "
        f"(train + validation). Foreign CPU share per run: {student_foreign}.",
        "- Memory: driver peak = the driver's peak RSS since it started, read with `orchestrator.train.memory.peak_rss_mb()` after "
        "the stage (what the orchestrator logs; as the VmHWM reset below lowers ru_maxrss too, the larger of that and the "
        "reading taken before each reset)" + ("; in brackets the peak during that stage alone (VmHWM reset through /proc/self/clear_refs "
        "before the stage; for the student it covers building the two Ray datasets and `fit()`)" if hwm else "") +
        ". Worker peak = `worker_peak_rss_mb` of the Ray Train run's last reported metrics (rank 0's ru_maxrss; "
        f"cross-check, the worker's VmHWM polled from /proc: {polled_train}). "
        "Teacher actor peak = largest VmHWM of the actor-pool processes (command line naming TeacherActor, descendants of "
        "this process, not alive before the measurement began), read from /proc/<pid>/status every 0.2 s while generation "
        "runs: growth after the last read before a process exits is missed. RSS counts the object-store pages a process has touched.",
    ]
    worst = max([st[f"{k}x"]["max_foreign"] for k in g["factors"]] + [se[f"{k}x"]["foreign_cpu_share"] for k in g["factors"]])
    if worst > MAX_FOREIGN:
        lines.append(f"- **Read with care**: other processes used up to {worst:.2f} of the CPUs during a measurement "
                     f"(above {MAX_FOREIGN}); the times and ratios of such rows include their slow-down.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6,000 base rows, 1 round, 2 epochs: checks the plumbing, not the numbers")
    args = parser.parse_args()
    started = time.perf_counter()
    load_start = loadavg()

    import ray

    arrays, ray_init_s, threads = mnist_on_fresh_ray(load_start)
    base_rows, rounds, epochs, gen_budget_s = (6000, 1, 2, 60) if args.quick else (len(arrays.train), 3, 3, 300)
    try:
        growth = bench_growth(arrays, base_rows=base_rows, rounds=rounds, epochs=epochs, threads=threads, gen_budget_s=gen_budget_s)
    finally:
        ray.shutdown()
    report = {
        **report_header(load_start),
        "ray_init_s": round(ray_init_s, 2),
        "linear_tolerance": LINEAR_TOLERANCE,
        "growth": growth,
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_growth_reports(report)
    print((RESULTS / "growth.md").read_text())
    log(f"done in {report['wall_s']:.0f} s; wrote {RESULTS / 'growth.json'} and growth.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
