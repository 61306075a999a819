"""Jobs as functions: validate before Ray starts, then run the stages under one MLflow parent run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from orchestrator.cluster import preflight

from orchestrator.tracking import runs as tracking
from orchestrator.cluster.checks import check_cluster
from orchestrator.flows.chain_runner import run_chain
from orchestrator.flows.chains import StageRegistry
from orchestrator.config import ConfigError, JobConfig
from orchestrator.data.datasets import DatasetArrays, load_arrays, split_train_val
from orchestrator.cluster.interrupts import reclaim_sigterm
from orchestrator.cluster.local_ray import start_local_ray
from orchestrator.tracking.progress import VERBOSE_ENV, copy_job_logs, progress_printer, quiet_driver_logs, verbose
from orchestrator.train.memory import peak_rss_mb
from orchestrator.train.evaluate import classification_metrics, eval_device, predict_logits
from orchestrator.train.models import build_model, check_output_size, count_params, load_state_dict_file, load_weights, model_size_mb
from orchestrator.flows.born_again import later_generations
from orchestrator.losses.kd_settings import is_auto
from orchestrator.flows.scoring import class_errors, correct_bias, pair_with_twin
from orchestrator.teachers.online import check_feature_layers
from orchestrator.losses.terms import describe_loss, uses_kd_section
from orchestrator.teachers.soft_targets import decode_logits, fingerprint
from orchestrator.flows.stages import (
    SoftTargets,
    TeacherWeights,
    TrackingContext,
    resolve_teacher,
    soft_target_stage,
    student_members,
    student_stage,
)


@dataclass
class Prepared:
    """Everything checked and loaded before any Ray resources are spent."""

    cfg: JobConfig
    data: DatasetArrays
    train_ids: np.ndarray  # the teachers' training rows
    val_ids: np.ndarray
    given_teachers: list[dict | None]  # state dicts from checkpoint / MLflow model, else None
    tracking_uri: str
    experiment_id: str
    student_train_ids: np.ndarray | None = None  # the students' transfer set: train_ids less transfer.exclude_classes

    def __post_init__(self) -> None:
        if self.student_train_ids is None:
            self.student_train_ids = self.train_ids


def transfer_ids(train_ids: np.ndarray, labels: np.ndarray, exclude_classes: list[int]) -> np.ndarray:
    """The rows students learn from: `train_ids` without the examples of `exclude_classes`."""
    if not exclude_classes:
        return train_ids
    return train_ids[~np.isin(labels[train_ids], exclude_classes)]


def _load_given_teacher(cfg: JobConfig, index: int, data: DatasetArrays, uri: str) -> dict | None:
    teacher = cfg.teachers[index]
    where = f"teachers.{index}"
    if teacher.checkpoint:
        state_dict = load_state_dict_file(teacher.checkpoint)
    elif teacher.mlflow_model:
        try:
            state_dict = tracking.load_torch_model(uri, teacher.mlflow_model).state_dict()
        except Exception as exc:
            raise ConfigError(f"{where}.mlflow_model: cannot load {teacher.mlflow_model} ({type(exc).__name__})") from None
    else:
        return None
    preflight.check_finite_weights(state_dict, where)
    load_weights(build_model(teacher, data.input_shape, data.num_classes), state_dict, where=where)
    return state_dict


def prepare(cfg: JobConfig) -> Prepared:
    data = load_arrays(cfg.dataset)
    for group, items in (("teachers", cfg.teachers), ("students", cfg.students)):
        for i, spec in enumerate(items):
            check_output_size(build_model(spec, data.input_shape, data.num_classes), data.input_shape, data.num_classes, where=f"{group}.{i}")
    # train.input_jitter with cached soft targets is refused by the config itself (losses/terms.py check_students).
    check_feature_layers(cfg, data)
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    # Files first (nothing written yet), then the tracking store, then MLflow-hosted teachers.
    given = [_load_given_teacher(cfg, i, data, uri) if not cfg.teachers[i].mlflow_model else None for i in range(len(cfg.teachers))]
    try:
        experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment or cfg.name)
    except Exception as exc:
        problem = f"cannot use MLflow store {uri} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        raise ConfigError(f"tracking.tracking_uri: {tracking.redact(problem)}") from None  # no password in the terminal
    given = [g if g is not None else _load_given_teacher(cfg, i, data, uri) for i, g in enumerate(given)]
    train_ids, val_ids = split_train_val(len(data.train.labels), cfg.dataset.val_fraction, cfg.seed)
    if len(val_ids) == 0 and cfg.sweep is not None:
        raise ConfigError("dataset.val_fraction: the validation split is empty; a sweep compares its trials on it")
    if len(val_ids) == 0 and cfg.transfer.bias_correction:
        raise ConfigError("dataset.val_fraction: the validation split is empty; transfer.bias_correction chooses its shift on it")
    bad = [c for c in cfg.transfer.exclude_classes if c >= data.num_classes]
    if bad:
        raise ConfigError(f"transfer.exclude_classes: class {bad[0]} does not exist (dataset {data.name!r} has {data.num_classes})")
    students_ids = transfer_ids(train_ids, data.train.labels, cfg.transfer.exclude_classes)
    if len(students_ids) == 0:
        raise ConfigError("transfer.exclude_classes: nothing is left for the students to learn from")
    return Prepared(cfg, data, train_ids, val_ids, given, uri, experiment_id, students_ids)


def init_ray(address: str | None = None, cfg: JobConfig | None = None) -> None:
    """Connect to the cluster this job runs in, else start a local Ray for the user.

    Bad input costs no Ray start: a remote address must answer first, and a local start
    must be able to meet `cfg`'s resource requests.
    """
    if ray.is_initialized():
        return
    address, where = preflight.ray_address(address)
    if address and address != "local":
        preflight.check_ray_address(address, where)
        try:
            ray.init(address=address, log_to_driver=verbose(), logging_level=logging.INFO if verbose() else logging.WARNING,
                     runtime_env={"env_vars": {VERBOSE_ENV: "1"}} if verbose() else None)
        except (ConnectionError, TimeoutError, RuntimeError, ray.exceptions.RayError) as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{where}: cannot connect to Ray at {address} ({reason})") from None
    else:
        if cfg is not None:
            preflight.check_local_resources(cfg)
        # The dashboard (it can submit jobs) listens on loopback only; see README "Security". Ray's own output
        # stays in its session logs unless -v (progress.py): the console shows this project's lines.
        start_local_ray(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=verbose(),
                        logging_level=logging.INFO if verbose() else logging.WARNING,
                        runtime_env={"env_vars": {VERBOSE_ENV: "1"}} if verbose() else None)
    quiet_driver_logs()
    reclaim_sigterm()  # ray.init installs its own SIGTERM handler (a bare sys.exit)


def _teacher_rows(prep: Prepared, teachers: list[TeacherWeights], teacher_test: torch.Tensor, role: str = "teacher") -> list[dict]:
    rows = []
    data = prep.data
    for t in teachers:
        model = build_model(t.config, data.input_shape, data.num_classes)
        load_weights(model, t.state_dict, where=t.config.name)
        logits = predict_logits(model.to(eval_device(prep.cfg.train.use_gpu)), data.test.images, mean=data.mean, std=data.std,
                                precision=prep.cfg.soft_targets.precision)
        model.cpu()
        metrics = classification_metrics(logits, torch.from_numpy(data.test.labels), teacher_test)
        tracking.log_metrics(prep.tracking_uri, t.run_id, {f"test_{k}": v for k, v in metrics.items()})
        rows.append(_row(role, t.config.name, metrics, model, t.wall_s, t.run_id))
    return rows


def _row(role: str, name: str, metrics: dict, model: torch.nn.Module, wall_s: float, run_id: str) -> dict:
    return {
        "role": role,
        "name": name,
        "test_accuracy": round(metrics["accuracy"], 6),
        "test_errors": metrics["errors"],
        "params": count_params(model),
        "size_mb": round(model_size_mb(model), 4),
        "agreement": round(metrics["agreement"], 6),
        "kl_to_teacher": round(metrics["kl_to_teacher"], 6),
        "wall_s": round(wall_s, 2),
        "mlflow_run_id": run_id,
    }


def teacher_test_logits(prep: Prepared, soft: SoftTargets) -> torch.Tensor:
    test_rows = {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in soft.test_columns.items()}
    return decode_logits(test_rows, num_classes=prep.data.num_classes)


def dataset_inputs(prep: Prepared, soft: SoftTargets | None = None, *, students: bool = True) -> list[dict]:
    """The train (the students' transfer set, or the teachers' rows), validation and test data, and the soft
    targets, as MLflow dataset inputs: digests of the rows' content, their source, their size."""
    data = prep.data

    def rows_digest(ids: np.ndarray) -> str:
        return fingerprint({"split": data.fingerprint("train"), "ids": hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()})

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
                       "rows": soft.n_train * soft.views + len(next(iter(soft.test_columns.values())))})
    return inputs


def run_job(cfg: JobConfig, *, summary_json: str | Path | None = None, ray_address: str | None = None, prepared: Prepared | None = None) -> list[dict]:
    """The whole distillation: teachers -> soft targets -> students -> test evaluation -> summary rows."""
    prep = prepared or prepare(cfg)
    init_ray(ray_address, cfg)
    check_cluster(cfg, prep.tracking_uri)  # resources and shared storage, before any stage or MLflow run
    uri, data = prep.tracking_uri, prep.data
    with tracking.run_scope(uri, prep.experiment_id, cfg.name, tags={"job": "distill", "dataset": data.name}) as parent_id, \
            ray_logs_attached(uri, parent_id), progress_printer() as sink:
        track = TrackingContext(uri, prep.experiment_id, parent_id, sink)
        tracking.log_params(uri, parent_id, tracking.flatten(cfg.model_dump(mode="json")))
        tracking.log_dict(uri, parent_id, cfg.model_dump(mode="json"), "config.json")
        teachers = [resolve_teacher(cfg, i, data, prep.train_ids, prep.val_ids, prep.given_teachers[i], track) for i in range(len(cfg.teachers))]
        driver_peak = {"teacher": peak_rss_mb()}  # the driver's peak so far, after each stage
        soft = soft_target_stage(cfg, teachers, data, track)
        tracking.log_datasets(uri, parent_id, dataset_inputs(prep, soft))
        for t in teachers:  # what each teacher trained on (or would have: given ones too), and what the soft-target pass made
            tracking.log_datasets(uri, t.run_id, [d for d in dataset_inputs(prep, students=False) if d["context"] != "test"])
        tracking.log_datasets(uri, soft.run_id, [d for d in dataset_inputs(prep, soft) if d["context"] == "soft_targets"])
        driver_peak["soft_targets"] = peak_rss_mb()
        teacher_test = teacher_test_logits(prep, soft)
        rows = _teacher_rows(prep, teachers, teacher_test)
        assistants: list[TeacherWeights] = []
        if cfg.chain:  # the students learn from the last assistant's soft targets; agreement and KL stay the teachers'
            registry = StageRegistry.remote()
            soft, assistants = run_chain(cfg, prep, soft, cfg.chain, track, registry)
            ray.kill(registry)
            rows += _teacher_rows(prep, assistants, teacher_test, role="assistant")
        student_rows, online_rows = distill_students(prep, soft, teachers, teacher_test, track, assistants=assistants)
        rows += student_rows
        driver_peak["students"] = peak_rss_mb()
        stage_walls = {"teacher": sum(t.wall_s for t in teachers), "soft_targets": soft.wall_s, "students": rows[-1]["wall_s"]}
        tracking.log_metrics(uri, parent_id, {f"wall_s_{k}": v for k, v in stage_walls.items()} | {"teacher_forward_rows": soft.forward_rows + online_rows}
                             | {f"driver_peak_rss_mb_{k}": v for k, v in driver_peak.items()})
        tracking.set_tags(uri, parent_id, {"soft_target_fingerprint": soft.fingerprint, "teacher_run_ids": ",".join(t.run_id for t in teachers)})
        tracking.log_dict(uri, parent_id, rows, "summary.json")
        log_job_artifacts(uri, parent_id, rows, has_val=len(prep.val_ids) > 0)
    if summary_json:
        Path(summary_json).write_text(json.dumps(rows, indent=2) + "\n")
    from orchestrator.tracking.report import print_summary  # rich is only needed for the terminal

    print_summary(rows, stage_walls, soft, uri)
    return rows


@contextlib.contextmanager
def ray_logs_attached(uri: str, run_id: str) -> Iterator[None]:
    """On the way out of a job, finished or failed (not interrupted: Ctrl-C must be quick), the Ray worker
    logs the console left out, attached to its run as ray_logs/."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        _attach_ray_logs(uri, run_id)
        raise
    _attach_ray_logs(uri, run_id)


def _attach_ray_logs(uri: str, run_id: str) -> None:
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="kd-ray-logs-") as out:
            if copy_job_logs(Path(out)):
                tracking.log_artifacts(uri, run_id, out, "ray_logs")
    except Exception:  # noqa: BLE001  (best effort: the logs stay in Ray's session folder; the job's result must not depend on them)
        pass


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


def distill_students(prep: Prepared, soft: SoftTargets, teachers: list[TeacherWeights], teacher_test: torch.Tensor,
                     track: TrackingContext, assistants: list[TeacherWeights] = ()) -> tuple[list[dict], int]:
    """Students and twins trained, scored and logged; returns their rows and the rows an online teacher ran on.
    With a chain, `soft` is the last assistant's and `assistants` are the chain's stages, teacher side first."""
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
        rows = score_students(prep, result, teacher_test, run_ids)
    return rows, result.online_teacher_rows


def score_students(prep: Prepared, result, teacher_test: torch.Tensor, run_ids: dict[str, str]) -> list[dict]:
    """Test metrics of every student and twin, logged with the model; then each student paired with its twin."""
    cfg, data, uri = prep.cfg, prep.data, prep.tracking_uri
    labels = torch.from_numpy(data.test.labels)
    excluded = cfg.transfer.exclude_classes
    rows, correct, errors = [], {}, {}
    for m in result.members:
        model = build_model(m.spec, data.input_shape, data.num_classes)
        model.load_state_dict(result.state_dicts[m.name])
        model.to(eval_device(cfg.train.use_gpu))
        logits = predict_logits(model, data.test.images, mean=data.mean, std=data.std, precision=cfg.train.precision)
        extra = {}
        if excluded:
            extra["excluded_class_errors"] = class_errors(logits.argmax(1), labels, excluded)
        if excluded and cfg.transfer.bias_correction and m.role == "student":
            before = classification_metrics(logits, labels, teacher_test)
            extra = {"bias_shift": correct_bias(model, data.train.images[prep.val_ids], data.train.labels[prep.val_ids], excluded, mean=data.mean, std=data.std),
                     "errors_before_bias_correction": before["errors"], "excluded_class_errors_before_bias_correction": extra["excluded_class_errors"]}
            logits = predict_logits(model, data.test.images, mean=data.mean, std=data.std, precision=cfg.train.precision)
            extra["excluded_class_errors"] = class_errors(logits.argmax(1), labels, excluded)
        model.cpu()  # logged, measured and handed back from the host
        metrics = classification_metrics(logits, labels, teacher_test)
        correct[m.name], errors[m.name] = (logits.argmax(1) == labels).numpy(), metrics["errors"]
        tracking.log_metrics(uri, run_ids[m.name], {f"test_{k}": v for k, v in metrics.items()} | {"wall_s": result.wall_s} | extra)
        if cfg.tracking.log_models:
            example = np.zeros((1, *data.input_shape), dtype=np.float32)
            tracking.log_torch_model(uri, run_ids[m.name], model, name="model", spec=m.spec.model_dump(mode="json"), input_shape=data.input_shape,
                                     num_classes=data.num_classes, input_example=example)
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
    prep = prepare(cfg)
    init_ray(ray_address, cfg)
    check_cluster(cfg, prep.tracking_uri)  # resources and shared storage, before any stage or MLflow run
    with tracking.run_scope(prep.tracking_uri, prep.experiment_id, f"{cfg.name}:teacher", tags={"job": "teacher"}) as parent_id, \
            progress_printer() as sink:
        track = TrackingContext(prep.tracking_uri, prep.experiment_id, parent_id, sink)
        return [resolve_teacher(cfg, i, prep.data, prep.train_ids, prep.val_ids, prep.given_teachers[i], track) for i in range(len(cfg.teachers))]


def run_soft_targets_job(cfg: JobConfig, *, ray_address: str | None = None) -> SoftTargets:
    """Teachers, then their soft targets into the fingerprinted cache."""
    prep = prepare(cfg)
    init_ray(ray_address, cfg)
    check_cluster(cfg, prep.tracking_uri)  # resources and shared storage, before any stage or MLflow run
    with tracking.run_scope(prep.tracking_uri, prep.experiment_id, f"{cfg.name}:soft-targets", tags={"job": "soft_targets"}) as parent_id, \
            progress_printer() as sink:
        track = TrackingContext(prep.tracking_uri, prep.experiment_id, parent_id, sink)
        teachers = [resolve_teacher(cfg, i, prep.data, prep.train_ids, prep.val_ids, prep.given_teachers[i], track) for i in range(len(cfg.teachers))]
        started = time.perf_counter()
        soft = soft_target_stage(cfg, teachers, prep.data, track)
        print(f"soft targets {soft.fingerprint}: {'cache hit' if soft.cache_hit else 'generated'}, "
              f"{soft.forward_rows} teacher forward rows, {time.perf_counter() - started:.1f}s -> {soft.path}")
        return soft
