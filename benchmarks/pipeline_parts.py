"""What the two in-process pipeline benchmarks (bench_pipeline.py, bench_growth.py) share.

Both load MNIST, start one fresh local Ray, build the same seeded teacher and push rows through the
production code: soft targets by `orchestrator.flows.stages.generate_soft_targets`, the student by a
real Ray Train run from `orchestrator.train.trainer.build_trainer`. Keeping these pieces in one place
keeps the two benchmarks measuring the same thing. Nothing here imports torch, Ray or MLflow at module
level (readme_results.py imports the benchmarks for their renderers).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from harness import log, median
from proc_meter import Foreign

TEACHER_BATCH = 4096
STUDENT_BATCH = 128  # configs/mnist_kd.yaml
VAL_FRACTION = 0.1
SEED = 0


def mnist_on_fresh_ray(load_start: list[float]) -> tuple[object, float, int]:
    """MNIST loaded, then a fresh local Ray started: (arrays, ray.init seconds, the CPUs Ray uses)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    import ray
    import ray.data

    from orchestrator.config import DatasetConfig
    from orchestrator.data.datasets import load_arrays

    log(f"load average {load_start}")
    arrays = load_arrays(DatasetConfig(name="mnist", reader="driver"))  # the plain loop's arrays, in this process
    log(f"MNIST loaded: train {arrays.train.images.shape}, test {arrays.test.images.shape}")

    t0 = time.perf_counter()
    # As orchestrator.flows.pipeline.init_ray starts a local Ray (dashboard on, all CPUs), but always a fresh
    # cluster: with no address, ray.init would join one that `ray start` left running on this machine.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    threads = int(ray.cluster_resources().get("CPU", os.cpu_count()))
    log(f"ray.init {ray_init_s:.1f} s (not counted), {threads} CPUs")
    return arrays, ray_init_s, threads


# ------------------------------------------------------------------------------------ soft targets


def teacher_state(input_shape, num_classes):
    import torch

    from orchestrator.config import ModelSpec
    from orchestrator.train.models import build_model

    torch.manual_seed(SEED)
    model = build_model(ModelSpec(family="mlp", hidden=[1200, 1200]), input_shape, num_classes).eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def production_teacher(arrays) -> tuple[object, object, list]:
    """(teacher model, job config with the production soft_targets defaults, the TeacherWeights that
    generate_soft_targets takes): teacher MLP 784-1200-1200-10, random init, seeded."""
    from orchestrator.config import JobConfig, TeacherConfig
    from orchestrator.flows.stages import TeacherWeights
    from orchestrator.teachers.pool import forward_row_counter
    from orchestrator.train.models import state_dict_fingerprint

    model, state = teacher_state(arrays.input_shape, arrays.num_classes)
    teacher_cfg = TeacherConfig(name="teacher", family="mlp", hidden=[1200, 1200])
    cfg = JobConfig(teachers=[teacher_cfg])  # soft_targets: the production defaults
    teachers = [TeacherWeights(teacher_cfg, state, state_dict_fingerprint(state), "bench", "", 0.0)]
    forward_row_counter(), forward_row_counter("job")  # soft_target_stage creates them before generating, so does this
    return model, cfg, teachers


def ray_soft_targets(cfg, teachers, data) -> tuple[float, object]:
    """The production path, end to end: put the image blocks, run them through the job's teacher actors, every
    output block done. Returns (seconds, the output blocks as a Ray dataset, made after the clock stops)."""
    import ray.data

    from orchestrator.flows.stages import generate_soft_targets

    started = time.perf_counter()
    blocks = generate_soft_targets(cfg, teachers, data)
    seconds = time.perf_counter() - started
    return seconds, ray.data.from_arrow_refs(blocks)


# ------------------------------------------------------------------------------------ student epoch


def student_loop(arrays, storage: Path, encoding: str):
    from orchestrator.config import KDConfig, ModelSpec, TrainConfig
    from orchestrator.train.train_loop import LoopConfig, MemberConfig

    # train_rows: the rows of the whole train dataset, which size the per-step LR schedule.
    return lambda epochs, workers, cpus, run_id, uri, *, train_rows: LoopConfig(
        stage="distill",
        members=[MemberConfig(name="student", role="student", spec=ModelSpec(family="mlp", hidden=[800, 800]), loss="kd", run_id=run_id,
                              kd=KDConfig(temperature=8.0, alpha=0.9))],
        optim=TrainConfig(epochs=epochs, batch_size=STUDENT_BATCH, lr=1e-3, num_workers=workers, cpus_per_worker=cpus, storage_path=str(storage)),
        train_rows=train_rows,
        input_shape=arrays.input_shape,
        num_classes=arrays.num_classes,
        mean=arrays.mean,
        std=arrays.std,
        encoding=encoding,
        seed=SEED,
        tracking_uri=uri,
    )


class _ReportClock:
    """A Ray Train UserCallback (runs in the controller) that appends the time of each report to a file."""

    def __new__(cls, path: str):
        from ray.train import UserCallback

        class ReportClock(UserCallback):
            def __init__(self, target: str) -> None:
                self.target = target

            def after_report(self, run_context, metrics, checkpoint) -> None:
                rank0 = metrics[0] if metrics else {}
                with open(self.target, "a") as f:
                    f.write(f"{time.time()} {rank0.get('epoch', -1)} {rank0.get('epoch_s', float('nan'))} {rank0.get('train_s', float('nan'))}\n")

        return ReportClock(path)


def ray_student_run(loop, datasets: dict, clock_file: Path, *, last_metrics: bool = False, objects: dict | None = None) -> dict:
    """One Ray Train run as the orchestrator builds it; the steady-state epoch is the median interval between
    consecutive reports as the controller sees them (epoch 0, which pulls the shard, is excluded)."""
    from orchestrator.train.train_loop import load_state
    from orchestrator.train.trainer import build_trainer

    clock_file.unlink(missing_ok=True)
    trainer = build_trainer(loop, datasets, run_name=f"bench-{loop.optim.num_workers}w-{int(time.time())}", objects=objects)
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), _ReportClock(str(clock_file))]
    with Foreign(poll=True) as foreign:  # the train workers exit before fit() returns
        started = time.perf_counter()
        result = trainer.fit()
        fit_s = time.perf_counter() - started
    load_state(result.checkpoint)  # what fit_and_load does next
    lines = [line.split() for line in clock_file.read_text().splitlines()]
    stamps = [float(line[0]) for line in lines]
    epoch_s = [float(line[2]) for line in lines]
    train_s = [float(line[3]) for line in lines]
    intervals = np.diff(stamps).tolist()  # intervals[i]: report of epoch i -> report of epoch i+1
    steady_interval = median(intervals) if intervals else float("nan")  # all intervals exclude epoch 0

    def steady(values: list[float]) -> float:  # epoch 0 pulls the shard: excluded
        return median(values[1:]) if len(values) > 1 else float("nan")

    return {
        "epochs": loop.optim.epochs,
        "fit_s": round(fit_s, 2),
        "epoch_s_in_worker": [round(s, 3) for s in epoch_s],
        "report_intervals_s": [round(s, 3) for s in intervals],
        "steady_epoch_s": round(steady_interval, 3),
        "steady_epoch_s_in_worker": round(steady(epoch_s), 3),
        "train_s_in_worker": [round(s, 3) for s in train_s],
        "steady_train_s_in_worker": round(steady(train_s), 3),
        "foreign_cpu_share": foreign.share,
        **({"last_metrics": dict(result.metrics or {})} if last_metrics else {}),
    }
