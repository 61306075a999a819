"""Each stage under its MLflow run: open the run, log the inputs, run the stage (stages.py, which knows
nothing of MLflow), log what it returned. The one place a teacher or soft-target stage meets MLflow."""

from __future__ import annotations

import time
from dataclasses import replace

from orchestrator.config import JobConfig
from orchestrator.data.datasets import DatasetArrays
from orchestrator.flows.finished import log_model
from orchestrator.flows.stages import SoftTargets, TeacherWeights, TrackingContext, make_soft_targets
from orchestrator.flows.teacher_stage import obtain_teacher
from orchestrator.tracking import runs as tracking
from orchestrator.train.models import state_dict_fingerprint


def resolve_teacher(cfg: JobConfig, index: int, data: DatasetArrays, train_ids, val_ids, loaded: dict | None, track: TrackingContext) -> TeacherWeights:
    """`teacher_stage.obtain_teacher` under the run `teacher:<name>`: its params, where the weights came from, the model
    (when new or pruned) and the stage's wall time."""
    teacher = cfg.teachers[index]
    started = time.perf_counter()
    with tracking.run_scope(track.uri, track.experiment_id, f"teacher:{teacher.name}", parent_id=track.parent_id, tags={"role": "teacher"}) as run_id:
        tracking.log_params(track.uri, run_id, tracking.flatten(teacher.model_dump()))
        got = obtain_teacher(cfg, index, data, train_ids, val_ids, loaded, track, run_id)
        if got.prune_metrics:
            tracking.log_metrics(track.uri, run_id, got.prune_metrics)
        weights_fp = state_dict_fingerprint(got.state_dict)
        tracking.set_tags(track.uri, run_id, {"source": got.source, "teacher_fingerprint": weights_fp, "dataset": data.name, **got.provenance})
        if (got.source != "cache" or teacher.prune_amount > 0) and cfg.tracking.log_models:
            log_model(track.uri, run_id, got.model, teacher, data)
        wall = time.perf_counter() - started
        tracking.log_metrics(track.uri, run_id, {"wall_s": wall})
    return TeacherWeights(teacher, got.state_dict, weights_fp, got.source, run_id, wall)


def soft_target_stage(cfg: JobConfig, teachers: list[TeacherWeights], data: DatasetArrays, track: TrackingContext) -> SoftTargets:
    """`stages.make_soft_targets` under the run `soft-targets`: the cache entry, the rows, the teacher forward rows."""
    with tracking.run_scope(track.uri, track.experiment_id, "soft-targets", parent_id=track.parent_id, tags={"role": "soft_targets"}) as run_id:
        tracking.log_params(track.uri, run_id, tracking.flatten(cfg.soft_targets.model_dump()))
        soft, report = make_soft_targets(cfg, teachers, data)
        tracking.set_tags(track.uri, run_id, {
            "soft_target_fingerprint": soft.fingerprint, "cache_hit": report.cache_hit, "cache_path": soft.path,
            "teacher_run_ids": ",".join(t.run_id for t in teachers), "dataset": data.name, "views": report.views,
        })
        tracking.log_metrics(track.uri, run_id, {
            "rows": report.rows, "teacher_forward_rows": soft.forward_rows, "wall_s": soft.wall_s, "rows_per_s": report.rows / soft.wall_s,
            "cache_lock_wait_s": report.lock_wait_s, "cache_bytes": soft.cache_bytes, "views": report.views,
        })
    return replace(soft, run_id=run_id)
