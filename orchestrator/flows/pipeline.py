"""Jobs as functions: validate before Ray starts, then run the stages under one MLflow parent run."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import ray
import torch

from orchestrator.config import JobConfig
from orchestrator.data.datasets import ids_digest
from orchestrator.flows.born_again import later_generations
from orchestrator.flows.chain_runner import run_chain
from orchestrator.flows.chains import StageRegistry
from orchestrator.flows.finished import log_model, put_test_split, score_models
from orchestrator.flows.job import Prepared, job_context
from orchestrator.flows.scoring import pair_with_twin
from orchestrator.flows.stage_runs import resolve_teacher, soft_target_stage
from orchestrator.flows.stages import SoftTargets, TeacherWeights, TrackingContext, student_members, student_stage, teacher_actor_gpus
from orchestrator.losses.kd_settings import is_auto
from orchestrator.losses.terms import describe_loss, uses_kd_section
from orchestrator.teachers.pool import teacher_forward_rows
from orchestrator.teachers.soft_targets import fingerprint
from orchestrator.tracking import runs as tracking
from orchestrator.train.memory import peak_rss_mb
from orchestrator.train.models import build_model, count_params, model_size_mb


def _teacher_rows(prep: Prepared, teachers: list[TeacherWeights], soft: SoftTargets, test_ref, role: str = "teacher") -> list[dict]:
    """Each teacher (or assistant) scored in a task against the teachers' test logits, logged, as a summary row."""
    scores = score_models([(t.config, t.state_dict, t.config.name) for t in teachers], test_ref, soft.test_columns,
                          precision=prep.cfg.soft_targets.precision, gpus=teacher_actor_gpus(prep.cfg))
    rows = []
    for t, score in zip(teachers, scores):
        tracking.log_metrics(prep.tracking_uri, t.run_id, score["metrics"])
        model = build_model(t.config, prep.data.input_shape, prep.data.num_classes)
        rows.append(_row(role, t.config.name, score["metrics"], model, t.wall_s, t.run_id))
    return rows


def _row(role: str, name: str, metrics: dict, model: torch.nn.Module, wall_s: float, run_id: str) -> dict:
    return {
        "role": role,
        "name": name,
        "test_accuracy": round(metrics["test_accuracy"], 6),
        "test_errors": metrics["test_errors"],
        "params": count_params(model),
        "size_mb": round(model_size_mb(model), 4),
        "agreement": round(metrics["test_agreement"], 6),
        "kl_to_teacher": round(metrics["test_kl_to_teacher"], 6),
        "wall_s": round(wall_s, 2),
        "mlflow_run_id": run_id,
    }


def dataset_inputs(prep: Prepared, soft: SoftTargets | None = None, *, students: bool = True) -> list[dict]:
    """The train (the students' transfer set, or the teachers' rows), validation and test data, and the soft
    targets, as MLflow dataset inputs: digests of the rows' content, their source, their size."""
    data = prep.data

    def rows_digest(ids: np.ndarray) -> str:
        return fingerprint({"split": data.fingerprint("train"), "ids": ids_digest(ids)})

    train_ids = prep.student_train_ids if students else prep.train_ids
    inputs = [
        {"name": f"{data.name}-train", "digest": rows_digest(train_ids), "source": data.source, "context": "training", "rows": len(train_ids)},
        {"name": f"{data.name}-test", "digest": data.fingerprint("test"), "source": data.source, "context": "test", "rows": len(data.test.labels)},
    ]
    if len(prep.val_ids):
        inputs.append({"name": f"{data.name}-validation", "digest": rows_digest(prep.val_ids), "source": data.source, "context": "validation",
                       "rows": len(prep.val_ids)})
    if soft is not None:
        inputs.append({"name": f"{data.name}-soft-targets", "digest": soft.fingerprint, "source": soft.path, "context": "soft_targets",
                       "rows": soft.n_train * soft.views + soft.n_test})
    return inputs


def run_job(cfg: JobConfig, *, summary_json: str | Path | None = None, ray_address: str | None = None, prepared: Prepared | None = None) -> list[dict]:
    """The whole distillation: teachers -> soft targets -> students -> test evaluation -> summary rows."""
    with job_context(cfg, cfg.name, {"job": "distill"}, ray_address=ray_address, prepared=prepared, attach_ray_logs=True,
                     warm_teachers=True) as job:
        prep, track, parent_id = job.prep, job.track, job.parent_id
        uri, data = prep.tracking_uri, prep.data
        rows_before = teacher_forward_rows("job")  # every pass of this job counts: the teachers', each assistant's, each generation's
        tracking.set_tags(uri, parent_id, {"dataset": data.name})
        teachers = [resolve_teacher(cfg, i, data, prep.train_ids, prep.val_ids, prep.given_teachers[i], track) for i in range(len(cfg.teachers))]
        driver_peak = {"teacher": peak_rss_mb()}  # the driver's peak so far, after each stage
        soft = soft_target_stage(cfg, teachers, data, track)
        tracking.log_datasets(uri, parent_id, dataset_inputs(prep, soft))
        for t in teachers:  # what each teacher trained on (or would have: given ones too), and what the soft-target pass made
            tracking.log_datasets(uri, t.run_id, [d for d in dataset_inputs(prep, students=False) if d["context"] != "test"])
        tracking.log_datasets(uri, soft.run_id, [d for d in dataset_inputs(prep, soft) if d["context"] == "soft_targets"])
        driver_peak["soft_targets"] = peak_rss_mb()
        test_ref = put_test_split(data)  # once, for every scoring task of the job
        teacher_soft = soft  # agreement and KL are the teachers', whatever the students learn from
        rows = _teacher_rows(prep, teachers, teacher_soft, test_ref)
        assistants: list[TeacherWeights] = []
        stage_walls = {"teacher": sum(t.wall_s for t in teachers), "soft_targets": soft.wall_s}
        if cfg.chain:  # the students learn from the last assistant's soft targets; agreement and KL stay the teachers'
            started = time.perf_counter()
            registry = StageRegistry.remote()
            soft, assistants = run_chain(cfg, prep, soft, cfg.chain, track, registry)
            ray.kill(registry)
            stage_walls["assistants"] = time.perf_counter() - started  # their training and their soft-target passes
            rows += _teacher_rows(prep, assistants, teacher_soft, test_ref, role="assistant")
        student_rows, online_rows = distill_students(prep, soft, teachers, teacher_soft, test_ref, track, assistants=assistants)
        rows += student_rows
        driver_peak["students"] = peak_rss_mb()
        stage_walls["students"] = rows[-1]["wall_s"]
        forward_rows = teacher_forward_rows("job") - rows_before + online_rows
        tracking.log_metrics(uri, parent_id, {f"wall_s_{k}": v for k, v in stage_walls.items()} | {"teacher_forward_rows": forward_rows}
                             | {f"driver_peak_rss_mb_{k}": v for k, v in driver_peak.items()})
        tracking.set_tags(uri, parent_id, {"soft_target_fingerprint": soft.fingerprint, "teacher_run_ids": ",".join(t.run_id for t in teachers)})
        tracking.log_dict(uri, parent_id, rows, "summary.json")
        log_job_artifacts(uri, parent_id, rows, has_val=len(prep.val_ids) > 0)
    if summary_json:
        Path(summary_json).write_text(json.dumps(rows, indent=2) + "\n")
    from orchestrator.tracking.report import print_summary  # rich is only needed for the terminal

    print_summary(rows, stage_walls, soft, uri, forward_rows=forward_rows)
    return rows


def log_job_artifacts(uri: str, parent_id: str, rows: list[dict], *, has_val: bool) -> None:
    """The results table (summary.md) and the students' learning curves beside their twins' (plots/) on the parent run."""
    import tempfile

    from orchestrator.tracking.plots import member_curves
    from orchestrator.tracking.report import summary_markdown

    tracking.log_text(uri, parent_id, summary_markdown(rows), "summary.md")
    metric = "val_accuracy" if has_val else "train_loss"
    histories = {r["name"]: tracking.metric_history(uri, r["mlflow_run_id"], metric) for r in rows if r["role"] != "teacher"}
    with tempfile.TemporaryDirectory(prefix="kd-plots-") as out:
        tracking.log_artifact(uri, parent_id, member_curves(histories, metric, Path(out)), "plots")


def distill_students(prep: Prepared, soft: SoftTargets, teachers: list[TeacherWeights], teacher_soft: SoftTargets, test_ref,
                     track: TrackingContext, assistants: list[TeacherWeights] = ()) -> tuple[list[dict], int]:
    """Students and twins trained, scored (against `teacher_soft`, on the test split at `test_ref`) and logged; returns
    their rows and the rows an online teacher ran on. With a chain, `soft` is the last assistant's and `assistants`
    are the chain's stages, teacher side first."""
    cfg, data, uri = prep.cfg, prep.data, prep.tracking_uri
    lineage = {
        "teacher_run_ids": ",".join(t.run_id for t in teachers),
        "teacher_fingerprints": ",".join(t.fingerprint for t in teachers),
        "soft_target_fingerprint": soft.fingerprint,
        "soft_target_run_id": soft.run_id,
        "dataset": data.name,
    }
    if assistants:
        lineage |= {"assistant_run_ids": ",".join(a.run_id for a in assistants),
                    "lineage": ">".join([",".join(t.run_id for t in teachers), *(a.run_id for a in assistants)])}
    members = student_members(cfg, {}, data, soft)
    rows = []
    with contextlib.ExitStack() as stack:
        run_ids = {
            m.name: stack.enter_context(
                tracking.run_scope(uri, track.experiment_id, f"{m.role}:{m.name}", parent_id=track.parent_id, tags={"role": m.role, **lineage})
            )
            for m in members
        }
        for m in members:
            params = {**tracking.flatten(m.spec.model_dump(mode="json")), "loss": describe_loss(m.loss), **tracking.flatten(cfg.train.model_dump(mode="json"), "train.")}
            params |= {f"views.{k}": v for k, v in cfg.views.model_dump(mode="json").items()}
            if uses_kd_section(m.loss):  # not for a term list whose terms carry their own temperature
                auto = is_auto(cfg)
                params |= {"kd.temperature": m.kd.temperature, "kd.temperature_auto": auto["temperature"]}
                if isinstance(m.loss, str):
                    params |= {"kd.alpha": m.kd.alpha, "kd.alpha_auto": auto["alpha"]}
            tracking.log_params(uri, run_ids[m.name], params)
            tracking.log_datasets(uri, run_ids[m.name], dataset_inputs(prep, soft if m.role == "student" else None))
        result = student_stage(cfg, data, prep.student_train_ids, prep.val_ids, soft, track, run_ids, teachers=teachers)
        result = later_generations(prep, result, track, run_ids)  # born-again students: generations 2..k
        rows = score_students(prep, result, teacher_soft, test_ref, run_ids)
    return rows, result.online_teacher_rows


def score_students(prep: Prepared, result, teacher_soft: SoftTargets, test_ref, run_ids: dict[str, str]) -> list[dict]:
    """Test metrics of every student and twin (scoring tasks, all at once) against the teachers' test logits, logged
    with the model; then each student paired with its twin."""
    cfg, data, uri = prep.cfg, prep.data, prep.tracking_uri
    excluded = cfg.transfer.exclude_classes
    corrected = [m.name for m in result.members if excluded and cfg.transfer.bias_correction and m.role == "student"]
    val = (data.train.images[prep.val_ids], data.train.labels[prep.val_ids]) if corrected else None
    scores = score_models([(m.spec, result.state_dicts[m.name], m.name) for m in result.members], test_ref, teacher_soft.test_columns,
                          precision=cfg.train.precision, gpus=teacher_actor_gpus(cfg), excluded=excluded, bias_val={name: val for name in corrected})
    rows, correct, errors = [], {}, {}
    for m, score in zip(result.members, scores):
        model = build_model(m.spec, data.input_shape, data.num_classes)
        model.load_state_dict(score["state_dict"] or result.state_dicts[m.name])  # the bias-corrected weights, where corrected
        metrics, extra = score["metrics"], score["extra"]
        correct[m.name], errors[m.name] = score["correct"], metrics["test_errors"]
        tracking.log_metrics(uri, run_ids[m.name], metrics | {"wall_s": result.wall_s} | extra)
        if cfg.tracking.log_models:
            log_model(uri, run_ids[m.name], model, m.spec, data)
        row = _row(m.role, m.name, metrics, model, result.wall_s, run_ids[m.name]) | extra
        if m.role == "student" and uses_kd_section(m.loss):
            row |= {"temperature": m.kd.temperature, "alpha": m.kd.alpha if isinstance(m.loss, str) else None}
        rows.append(row)
    twin_of = {m.name: m.twin for m in result.members}
    rows = [pair_with_twin(row, twin_of.get(row["name"]), correct, errors) for row in rows]
    for row in rows:
        if "errors_saved" in row:
            tracking.log_metrics(uri, row["mlflow_run_id"], {"errors_saved_vs_twin": row["errors_saved"], "mcnemar_p": row["mcnemar_p"]})
    return rows


def run_teacher_job(cfg: JobConfig, *, ray_address: str | None = None) -> list[TeacherWeights]:
    """Only the teacher stage (train, or reuse a cached / given teacher), under its own parent run."""
    with job_context(cfg, f"{cfg.name}:teacher", {"job": "teacher"}, ray_address=ray_address) as job:
        prep, track = job.prep, job.track
        return [resolve_teacher(cfg, i, prep.data, prep.train_ids, prep.val_ids, prep.given_teachers[i], track) for i in range(len(cfg.teachers))]


def run_soft_targets_job(cfg: JobConfig, *, ray_address: str | None = None) -> SoftTargets:
    """Teachers, then their soft targets into the fingerprinted cache."""
    with job_context(cfg, f"{cfg.name}:soft-targets", {"job": "soft_targets"}, ray_address=ray_address, warm_teachers=True) as job:
        prep, track = job.prep, job.track
        teachers = [resolve_teacher(cfg, i, prep.data, prep.train_ids, prep.val_ids, prep.given_teachers[i], track) for i in range(len(cfg.teachers))]
        started = time.perf_counter()
        soft = soft_target_stage(cfg, teachers, prep.data, track)
        print(f"soft targets {soft.fingerprint}: {'cache hit' if soft.cache_hit else 'generated'}, "
              f"{soft.forward_rows} teacher forward rows, {time.perf_counter() - started:.1f}s -> {soft.path}")
        return soft
