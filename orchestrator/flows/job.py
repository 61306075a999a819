"""A job's start-up, written once: everything checked and loaded before Ray starts (`prepare`), Ray
joined or started (`init_ray`), the cluster checked, and, for the pipeline's jobs, the MLflow parent
run with the config logged, the progress printer and the Ray logs attached on the way out (`job_context`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from orchestrator.cluster import preflight
from orchestrator.cluster.checks import check_cluster
from orchestrator.cluster.interrupts import reclaim_sigterm
from orchestrator.cluster.local_ray import start_local_ray
from orchestrator.cluster.orphans import free_orphaned_placement_groups
from orchestrator.config import ConfigError, JobConfig
from orchestrator.data.datasets import DatasetArrays, load_arrays, split_train_val
from orchestrator.data.ray_objects import read_planned_images
from orchestrator.flows.stages import TrackingContext, start_teachers
from orchestrator.teachers.online import check_feature_layers
from orchestrator.tracking import runs as tracking
from orchestrator.tracking.progress import VERBOSE_ENV, copy_job_logs, progress_printer, quiet_driver_logs, verbose
from orchestrator.train.models import build_model, check_output_size, load_state_dict_file, load_weights


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
        free_orphaned_placement_groups()  # before the cluster checks count its free CPUs
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


def start_job(cfg: JobConfig, *, ray_address: str | None = None, prepared: Prepared | None = None, warm_teachers: bool = False) -> Prepared:
    """Checked and loaded, then Ray, then the cluster checked: bad input costs no Ray start, and nothing runs
    on a cluster that cannot hold the job. `warm_teachers`: the job makes soft targets, and its teacher actors
    start now, beside the teacher stage (stages.start_teachers)."""
    prep = prepared or prepare(cfg)
    init_ray(ray_address, cfg)
    check_cluster(cfg, prep.tracking_uri)  # resources and shared storage, before any stage or MLflow run
    if warm_teachers:
        start_teachers(cfg)
    # dataset.reader ray: the images are read now, in Ray tasks, while the teacher actors start.
    prep.data = read_planned_images(prep.data, cfg.dataset)
    return prep


@dataclass
class JobContext:
    prep: Prepared
    track: TrackingContext  # the parent run, and the progress printer stages report to

    @property
    def parent_id(self) -> str:
        return self.track.parent_id


@contextlib.contextmanager
def job_context(cfg: JobConfig, run_name: str, tags: dict, *, ray_address: str | None = None, prepared: Prepared | None = None,
                attach_ray_logs: bool = False, warm_teachers: bool = False) -> Iterator[JobContext]:
    """`start_job`, then the job's parent MLflow run (its config as params and config.json) around the stages."""
    prep = start_job(cfg, ray_address=ray_address, prepared=prepared, warm_teachers=warm_teachers)
    uri = prep.tracking_uri
    with tracking.run_scope(uri, prep.experiment_id, run_name, tags=tags) as parent_id, \
            (ray_logs_attached(uri, parent_id) if attach_ray_logs else contextlib.nullcontext()), progress_printer() as sink:
        tree = cfg.model_dump(mode="json")
        tracking.log_params(uri, parent_id, tracking.flatten(tree))
        tracking.log_dict(uri, parent_id, tree, "config.json")  # `distill report` rebuilds the config from it
        yield JobContext(prep, TrackingContext(uri, prep.experiment_id, parent_id, sink))


@contextlib.contextmanager
def ray_logs_attached(uri: str, run_id: str) -> Iterator[None]:
    """On the way out of a job, finished or failed (not interrupted: Ctrl-C must be quick), the Ray worker
    logs the console left out, attached to its run as ray_logs/: those written to while the job ran."""
    started = time.time() - 1.0  # file times are coarser than the clock on some filesystems
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        _attach_ray_logs(uri, run_id, started)
        raise
    _attach_ray_logs(uri, run_id, started)


def _attach_ray_logs(uri: str, run_id: str, since: float) -> None:
    try:
        with tempfile.TemporaryDirectory(prefix="kd-ray-logs-") as out:
            if copy_job_logs(Path(out), since=since):
                tracking.log_artifacts(uri, run_id, out, "ray_logs")
    except Exception:  # noqa: BLE001  (best effort: the logs stay in Ray's session folder; the job's result must not depend on them)
        pass


