"""The stages of a distillation job after the teacher (teacher_stage.py): soft targets, then students.

Each stage is a plain function over plain data that returns what it made and knows nothing of
MLflow: stage_runs.py puts each under its run and logs what it returned; `pipeline.run_job` calls
them in order inside one parent run. A stage takes a run id only to hand it to the train workers,
which report their epochs to it. Ray APIs are used directly here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
import torch

from orchestrator.cluster.checks import teacher_gpus
from orchestrator.config import JobConfig, StudentConfig, TeacherConfig, spec_of
from orchestrator.data.datasets import DatasetArrays
from orchestrator.data.ray_objects import image_blocks, rows_dataset
from orchestrator.data.views import ViewPolicy
from orchestrator.losses.kd_settings import student_kd
from orchestrator.teachers.cache_manifest import CacheEntry
from orchestrator.teachers.pool import forward_row_counter
from orchestrator.teachers.soft_target_columns import assemble_soft_targets, teacher_sample
from orchestrator.teachers.soft_targets import build_lock, fingerprint, logit_columns, publish_cache, read_cache
from orchestrator.teachers.warm_pool import Shards, release, run_pass, start_teacher_pool, teacher_pool
from orchestrator.tracking.progress import say
from orchestrator.train.models import build_model, count_params
from orchestrator.train.train_loop import SOFT_CACHE, SOFT_COLUMNS, LoopConfig, MemberConfig
from orchestrator.train.trainer import fit_and_load

# Bump when the cached columns change meaning. 2: one row per (id, view) with columns id, view and the
# encoded logits (views.py); split and label are no longer stored (the manifest's n_train gives the split).
SOFT_TARGET_FORMAT = 2


@dataclass
class TrackingContext:
    uri: str
    experiment_id: str
    parent_id: str
    progress: str | None = None  # the job's progress sink (progress.py): where train workers send their epoch lines

    def child(self, parent_id: str) -> "TrackingContext":
        """The same job, with runs nested under `parent_id`."""
        return replace(self, parent_id=parent_id)

    def with_progress(self, sink: str | None) -> "TrackingContext":
        return replace(self, progress=sink)


@dataclass
class TeacherWeights:
    config: TeacherConfig
    state_dict: dict[str, torch.Tensor]
    fingerprint: str
    source: str  # trained | cache | checkpoint | mlflow
    run_id: str
    wall_s: float


@dataclass
class SoftTargets:
    """A soft-target cache entry as the job uses it. The logits themselves stay in Ray's object store: a task
    assembles them there (`assemble_soft_targets`), the map tasks that join them to the images and the scoring
    tasks (finished.py) read them there, and the driver holds only the references."""

    fingerprint: str
    train_columns: "ray.ObjectRef"  # -> {name: (n_train, V, ...)}: encoded logit columns, row i = train id i, one entry per view
    test_columns: "ray.ObjectRef"  # -> {name: (n_test, ...)}: view 0 (the untouched image) of test row i
    n_train: int
    n_test: int
    views: int
    cache_hit: bool
    forward_rows: int
    wall_s: float
    path: str
    run_id: str
    cache_bytes: int = 0  # the entry's parquet files on disk
    entry: CacheEntry | None = None  # the cache entry, for train workers that read their own rows from its files

    def teacher_sample(self, num_classes: int, rows: int = 50_000) -> torch.Tensor:
        """Decoded teacher logits of up to `rows` training (example, view) entries, evenly strided (what auto_kd
        reads): cut in a task beside the object store, so only the sample reaches the caller."""
        return ray.get(teacher_sample.remote(self.train_columns, num_classes, rows))


@dataclass
class StudentsResult:
    state_dicts: dict[str, dict]
    members: list[MemberConfig]
    wall_s: float
    run_ids: dict[str, str] = field(default_factory=dict)
    online_teacher_rows: int = 0  # rows the online teacher ran on inside the workers (teacher_mode online)


def loop_config(cfg: JobConfig, data: DatasetArrays, track: TrackingContext, *, stage: str, members, optim, encoding,
                seed: int | None = None, train_rows: int, views: ViewPolicy | None = None) -> LoopConfig:
    return LoopConfig(
        stage=stage, members=members, optim=optim, input_shape=data.input_shape, num_classes=data.num_classes,
        mean=data.mean, std=data.std, fill=data.fill, encoding=encoding, seed=cfg.seed if seed is None else seed, tracking_uri=track.uri,
        train_rows=train_rows, views=asdict(views or ViewPolicy(fill=data.fill)), progress_sink=track.progress,
    )


def soft_target_key(cfg: JobConfig, teachers: list[TeacherWeights], data: DatasetArrays) -> str:
    st = cfg.soft_targets
    return fingerprint({
        "format": SOFT_TARGET_FORMAT,
        "teachers": [[t.fingerprint, t.config.model_dump(exclude={"name", "checkpoint", "mlflow_model", "train"}), t.config.weight] for t in teachers],
        "dataset": [data.name, data.fingerprint("train"), data.fingerprint("test")],
        "splits": ["train", "test"],
        "transform": {"mean": list(data.mean), "std": list(data.std)},
        "views": soft_target_views(cfg, data).fingerprint_parts(),
        "encoding": st.encoding,
        # bf16 inference, TF32 and cuDNN change the logits' low bits: a cache made on a GPU is not the CPU's.
        "inference": {"device": "cuda" if teacher_actor_gpus(cfg) > 0 else "cpu", "precision": st.precision},
        "top_k": st.top_k if st.encoding == "topk" else None,
        "ensemble": st.ensemble if len(teachers) > 1 else None,
    })


def view_policy(cfg: JobConfig, data: DatasetArrays) -> ViewPolicy:
    """The views students draw from (config `views`, padding resolved against the data)."""
    v = cfg.views
    return ViewPolicy(max_shift=v.max_shift, flip=v.flip, num_views=v.num_views, seed=v.seed, fill=data.fill if v.fill == "auto" else v.fill)


def soft_target_views(cfg: JobConfig, data: DatasetArrays) -> ViewPolicy:
    """The views the cache holds: every student view in cached mode; in online mode the teacher runs on the
    student's view itself, and the cache only serves validation and test metrics, on the untouched image."""
    return view_policy(cfg, data) if cfg.teacher_mode == "cached" else ViewPolicy(fill=data.fill)


def teacher_threads(cfg: JobConfig) -> int:
    return max(1, int(cfg.soft_targets.num_cpus_per_actor))


def teacher_actor_gpus(cfg: JobConfig) -> float:
    """GPUs per teacher actor (and per scoring task): as configured when the cluster has GPUs, else 0 (the CPU)."""
    return teacher_gpus(cfg.soft_targets.gpus_per_actor(cfg.train.use_gpu))


def start_teachers(cfg: JobConfig) -> None:
    """At job start, for jobs that make soft targets: the warm teacher actors start while the job goes on."""
    if cfg.teachers:
        start_teacher_pool(cfg.soft_targets.num_actors, teacher_threads(cfg), teacher_actor_gpus(cfg))


def soft_target_blocks(cfg: JobConfig, data: DatasetArrays) -> int:
    """How many image blocks a soft-target pass reads: a train row becomes one output row per view, so blocks of
    about batch_size output rows, as many per actor."""
    st = cfg.soft_targets
    rows = len(data.train.labels) + len(data.test.labels)
    per_block = max(1, st.batch_size // soft_target_views(cfg, data).count)
    return -(-rows // (per_block * st.num_actors)) * st.num_actors


def generate_soft_targets(cfg: JobConfig, teachers: list[TeacherWeights], data: DatasetArrays,
                          shards: Shards | None = None) -> list[ray.ObjectRef]:
    """Every (train id, view) and test id through the job's warm teacher actors (warm_pool.py): the references
    of their output blocks (Arrow tables: id, view, encoded logits), all done when returned, each also written
    to `shards` by its actor when given. Test ids follow the train ids."""
    st = cfg.soft_targets
    gpus = teacher_actor_gpus(cfg)
    views = soft_target_views(cfg, data)
    threads = teacher_threads(cfg)
    predictor_kwargs: dict[str, Any] = {
        # Weights as object-store references: small arguments, fetched once per actor and pass.
        "teachers": [{"name": t.config.name, "spec": spec_of(t.config).model_dump(mode="json"), "state_dict": ray.put(t.state_dict),
                      "weight": t.config.weight} for t in teachers],
        "input_shape": data.input_shape,
        "num_classes": data.num_classes,
        "mean": data.mean,
        "std": data.std,
        "n_train": len(data.train.labels),
        "encoding": st.encoding,
        "top_k": st.top_k,
        "ensemble": st.ensemble,
        "threads": threads,
        "use_gpu": gpus > 0,
        "views": asdict(views),
        "forward_batch": st.batch_size,
        "precision": st.precision,
    }
    actors = teacher_pool(st.num_actors, threads, gpus)
    interrupted = False
    try:
        outputs = run_pass(actors, predictor_kwargs, image_blocks(data, soft_target_blocks(cfg, data)), shards)  # put once per job
        ray.wait(outputs, num_returns=len(outputs), fetch_local=False)  # done, where the actors left them
        return outputs
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (interrupts.py raises it): Ray goes down next
        interrupted = True
        raise
    finally:
        release(actors, gpus, interrupted=interrupted)


@dataclass
class SoftTargetReport:
    """What the soft-target stage did, for its MLflow run (stage_runs.py)."""

    cache_hit: bool
    rows: int
    lock_wait_s: float
    views: int


def make_soft_targets(cfg: JobConfig, teachers: list[TeacherWeights], data: DatasetArrays) -> tuple[SoftTargets, SoftTargetReport]:
    """The teachers' soft targets for every (train id, view) and test id: read from the fingerprinted cache, or
    generated on the actor pool and written to it. The returned SoftTargets has no run id yet."""
    st = cfg.soft_targets
    started = time.perf_counter()
    key = soft_target_key(cfg, teachers, data)
    columns = ["id", "view", *logit_columns(st.encoding)]
    views = soft_target_views(cfg, data)
    shape = {"n_train": len(data.train.labels), "n_test": len(data.test.labels), "views": views.count}
    counter = forward_row_counter("job")  # this job's rows only: a job beside it on the cluster does not count here
    rows_before = ray.get(counter.total.remote())
    # One builder per fingerprint: a concurrent job waits here, then reads what the first one wrote.
    names = list(logit_columns(st.encoding))
    pass_s: list[float] = []  # the teacher pass alone: from handing the actors their blocks to every block written
    with build_lock(st.cache_dir, key) as lock_wait_s:
        entry = read_cache(st.cache_dir, key)
        cache_hit = entry is not None
        if cache_hit:
            train_ref, test_ref, summary = assemble_soft_targets.remote(entry, columns, names, shape)
        else:
            blocks: list[ray.ObjectRef] = []

            def write(directory: str, filesystem: pafs.FileSystem | None) -> None:  # the entry's files, by the actors
                begun = time.perf_counter()
                blocks.extend(generate_soft_targets(cfg, teachers, data, Shards(directory, columns, filesystem)))
                pass_s.append(time.perf_counter() - begun)

            # cache_dir as configured: a URI must reach publish_cache whole (it resolves paths itself).
            entry = publish_cache(write, st.cache_dir, key, columns=columns,
                                  extra_manifest={"dataset": data.name, "n_train": len(data.train.labels), "views": asdict(views)})
            # Training gets the logits from the object store (the actors' output blocks), not from the files; the
            # driver passes the blocks' references and never holds a row.
            train_ref, test_ref, summary = assemble_soft_targets.remote(None, columns, names, shape, *blocks)
        ray.get(summary)  # a cache that does not cover every (example, view) fails here, inside the stage
    forward_rows = ray.get(counter.total.remote()) - rows_before
    wall = time.perf_counter() - started
    rows = shape["n_train"] * shape["views"] + shape["n_test"]
    size = sum(f["bytes"] for f in entry.manifest.get("files", []))
    say(f"soft targets: {'cache hit' if cache_hit else 'generated'}, {rows:,} rows ({views.count} view(s) per training image), "
        f"{forward_rows:,} teacher forward rows" + (f", {forward_rows / wall:,.0f} rows/s" if forward_rows else "") + f", {wall:.0f} s"
        + (f" (teacher pass {pass_s[-1]:.2f} s)" if pass_s else ""))
    soft = SoftTargets(key, train_ref, test_ref, shape["n_train"], shape["n_test"], views.count, cache_hit, forward_rows, wall, str(entry.path), "", size,
                       entry)
    return soft, SoftTargetReport(cache_hit, rows, lock_wait_s, views.count)


def student_member(cfg: JobConfig, student: StudentConfig, data: DatasetArrays, soft: SoftTargets | None, *, run_id: str | None = None) -> MemberConfig:
    """A student as a training member, with its own T and alpha (kd_settings.student_kd, which reads `soft`'s teacher)."""
    params = count_params(build_model(student, data.input_shape, data.num_classes))
    sample = soft.teacher_sample(data.num_classes) if soft is not None and (cfg.kd.temperature is None) else None
    return MemberConfig(name=student.name, role="student", spec=spec_of(student), loss=student.loss, run_id=run_id,
                        kd=student_kd(cfg, student, params, sample))


def student_members(cfg: JobConfig, run_ids: dict[str, str], data: DatasetArrays, soft: SoftTargets | None) -> list[MemberConfig]:
    """Every student, each followed by its label-only twin (the baseline) when `baseline` is on.

    Students of one architecture share one twin (`<first such student>-baseline`): with the same seed,
    views and batches, two twins of one architecture would be the same model trained twice.
    """
    members, twins = [], {}
    for student in cfg.students:
        member = student_member(cfg, student, data, soft, run_id=run_ids.get(student.name))
        if cfg.baseline:
            spec = spec_of(student)
            key = spec.model_dump_json()
            new_twin = key not in twins
            twins.setdefault(key, f"{student.name}-baseline")
            member = member.model_copy(update={"twin": twins[key]})
            members.append(member)
            if new_twin:
                members.append(MemberConfig(name=twins[key], role="baseline", spec=spec, loss="ce", run_id=run_ids.get(twins[key])))
        else:
            members.append(member)
    return members


def student_rows(data: DatasetArrays, train_ids: np.ndarray, val_ids: np.ndarray) -> dict[str, ray.data.Dataset]:
    """The students' train and validation rows (id, image, label) as Ray Datasets, put once per job and shared
    by its stages and sweep trials (ray_objects.rows_dataset)."""
    datasets = {"train": rows_dataset(data, train_ids)}
    if len(val_ids):
        datasets["val"] = rows_dataset(data, val_ids)
    return datasets


def student_datasets(data: DatasetArrays, train_ids: np.ndarray, val_ids: np.ndarray, soft: SoftTargets,
                     worker_reads: str = "object_store") -> tuple[dict[str, ray.data.Dataset], dict]:
    """`student_rows`, and the object the train workers join them with: the soft-target columns' reference (ids
    index the train split directly, so each worker gathers its rows' logits from shared memory; no joined copy
    is made, nothing passes the driver), or with `worker_reads` "cache" the cache entry, whose files holding
    its own rows each worker reads (shard_batches.own_rows_reader)."""
    if worker_reads == "cache":
        if soft.entry is None:
            raise ValueError("soft_targets.worker_reads cache: these soft targets have no cache entry")
        return student_rows(data, train_ids, val_ids), {SOFT_CACHE: soft.entry}
    return student_rows(data, train_ids, val_ids), {SOFT_COLUMNS: soft.train_columns}


def distill_members(cfg: JobConfig, data: DatasetArrays, train_ids, val_ids, soft: SoftTargets, track: TrackingContext,
                    members: list[MemberConfig], *, run_name: str, callbacks=(), teachers: list[TeacherWeights] | None = None) -> tuple[dict[str, dict], dict]:
    """Distil `members` from `soft` in one Ray Train run; returns their final state dicts and the last epoch's reported metrics.

    With `teacher_mode: online` the `teachers` also run inside the workers on every batch
    (feature terms, jittered inputs); `soft` still gives the validation metrics.
    """
    loop = loop_config(cfg, data, track, stage="distill", members=members, optim=cfg.train, encoding=cfg.soft_targets.encoding,
                       train_rows=len(train_ids), views=view_policy(cfg, data)).model_copy(update={"has_val": len(val_ids) > 0})
    datasets, objects = student_datasets(data, train_ids, val_ids, soft, cfg.soft_targets.worker_reads)
    if cfg.teacher_mode == "online":
        if not teachers:
            raise ValueError("teacher_mode online: this stage was given no teachers to run")
        online = [{"name": t.config.name, "spec": spec_of(t.config).model_dump(mode="json"), "weight": t.config.weight} for t in teachers]
        loop = loop.model_copy(update={"teacher_mode": "online", "online_teachers": online, "ensemble": cfg.soft_targets.ensemble})
        objects["teacher_states"] = ray.put([t.state_dict for t in teachers])  # weights through the object store, once
    return fit_and_load(loop, datasets, run_name=run_name, callbacks=callbacks, objects=objects)


def student_stage(cfg: JobConfig, data: DatasetArrays, train_ids, val_ids, soft: SoftTargets, track: TrackingContext, run_ids: dict[str, str],
                  teachers: list[TeacherWeights] | None = None) -> StudentsResult:
    started = time.perf_counter()
    members = student_members(cfg, run_ids, data, soft)
    say(f"students: {', '.join(m.name for m in members)}; {cfg.train.epochs} epochs on {len(train_ids):,} images, {soft.views} view(s) each")
    state_dicts, last = distill_members(cfg, data, train_ids, val_ids, soft, track, members, run_name=f"{cfg.name}-students-{track.parent_id[:8]}",
                                        teachers=teachers)
    return StudentsResult(state_dicts, members, time.perf_counter() - started, run_ids, int(last.get("online_teacher_rows", 0)))
