"""The three stages of a distillation job: teachers, soft targets, students.

Each stage is a plain function over plain data; `pipeline.run_job` calls them in
order inside one MLflow parent run. Ray APIs are used directly here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from orchestrator.cluster.checks import teacher_gpus
from orchestrator.compress.quantize import prune_model, sparsity
from orchestrator.config import JobConfig, StudentConfig, TeacherConfig, spec_of
from orchestrator.data.datasets import DatasetArrays, Split, to_ray_dataset
from orchestrator.data.views import ViewPolicy
from orchestrator.losses.kd_settings import student_kd
from orchestrator.teachers.pool import TeacherPredictor, attach_soft_targets, forward_row_counter
from orchestrator.teachers.soft_targets import (
    build_lock,
    column_to_numpy,
    decode_logits,
    fingerprint,
    load_table,
    logit_columns,
    read_cache,
    write_cache,
)
from orchestrator.teachers.weights_cache import load_cached_weights, save_cached_weights, weights_file
from orchestrator.tracking import runs as tracking
from orchestrator.tracking.progress import say
from orchestrator.train.evaluate import classification_metrics, predict_logits
from orchestrator.train.models import build_model, count_params, load_weights, state_dict_fingerprint
from orchestrator.train.train_loop import LoopConfig, MemberConfig
from orchestrator.train.trainer import fit_and_load

# Bump when the cached columns change meaning. 2: one row per (id, view) with columns id, view and the
# encoded logits (views.py); split and label are no longer stored (the manifest's n_train gives the split).
SOFT_TARGET_FORMAT = 2
SOURCE_WORDS = {"trained": "trained", "cache": "reused from the teacher cache", "checkpoint": "loaded from its checkpoint",
                "mlflow": "loaded from MLflow"}


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
    fingerprint: str
    train_columns: dict[str, np.ndarray]  # encoded logit columns (n_train, V, ...): row i = train id i, one entry per view
    test_columns: dict[str, np.ndarray]  # (n_test, ...): view 0 (the untouched image) of test row i
    n_train: int
    cache_hit: bool
    forward_rows: int
    wall_s: float
    path: str
    run_id: str
    cache_bytes: int = 0  # the entry's parquet files on disk

    @property
    def views(self) -> int:
        return next(iter(self.train_columns.values())).shape[1]

    def teacher_sample(self, num_classes: int, rows: int = 50_000) -> torch.Tensor:
        """Decoded teacher logits of up to `rows` training (example, view) entries, evenly strided (what auto_kd reads)."""
        flat = {name: values.reshape(-1, *values.shape[2:]) for name, values in self.train_columns.items()}
        n = len(next(iter(flat.values())))
        index = np.linspace(0, n - 1, min(rows, n)).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
        return decode_logits({name: torch.from_numpy(np.ascontiguousarray(v[index])) for name, v in flat.items()}, num_classes=num_classes)


@dataclass
class StudentsResult:
    state_dicts: dict[str, dict]
    members: list[MemberConfig]
    wall_s: float
    run_ids: dict[str, str] = field(default_factory=dict)
    online_teacher_rows: int = 0  # rows the online teacher ran on inside the workers (teacher_mode online)


def teacher_seed(cfg: JobConfig, teacher: TeacherConfig) -> int:
    return cfg.seed if teacher.seed is None else teacher.seed


def teacher_training_key(cfg: JobConfig, teacher: TeacherConfig, data: DatasetArrays) -> str:
    spec = teacher.model_dump(exclude={"name", "weight", "checkpoint", "mlflow_model", "prune_amount", "prune_structured", "seed"})
    return fingerprint({
        "teacher": spec, "dataset": data.fingerprint("train"), "val_fraction": cfg.dataset.val_fraction, "seed": teacher_seed(cfg, teacher),
        # The inputs the teacher was trained on: normalisation and the padding of its shifted views.
        "transform": {"mean": list(data.mean), "std": list(data.std), "fill": data.fill},
        "device": {"gpu": cfg.train.use_gpu, "precision": cfg.train.precision},  # numerics differ between the two
    })


def materialized_images(split: Split, ids: np.ndarray) -> ray.data.Dataset:
    return to_ray_dataset(split, ids).materialize()


def loop_config(cfg: JobConfig, data: DatasetArrays, track: TrackingContext, *, stage: str, members, optim, encoding,
                seed: int | None = None, train_rows: int, views: ViewPolicy | None = None) -> LoopConfig:
    return LoopConfig(
        stage=stage, members=members, optim=optim, input_shape=data.input_shape, num_classes=data.num_classes,
        mean=data.mean, std=data.std, fill=data.fill, encoding=encoding, seed=cfg.seed if seed is None else seed, tracking_uri=track.uri,
        train_rows=train_rows, views=asdict(views or ViewPolicy(fill=data.fill)), progress_sink=track.progress,
    )


def train_teacher(cfg: JobConfig, index: int, data: DatasetArrays, train_ids, val_ids, track: TrackingContext, run_id: str) -> tuple[dict, str]:
    teacher = cfg.teachers[index]
    train_cfg = cfg.train.model_copy(update=teacher.train.model_dump())
    members = [MemberConfig(name=teacher.name, role="teacher", spec=spec_of(teacher), loss="ce", run_id=run_id)]
    loop = loop_config(cfg, data, track, stage="teacher", members=members, optim=train_cfg, encoding=None,
                       seed=teacher_seed(cfg, teacher), train_rows=len(train_ids)).model_copy(update={"has_val": len(val_ids) > 0})
    datasets = {"train": materialized_images(data.train, train_ids)}
    if len(val_ids):
        datasets["val"] = materialized_images(data.train, val_ids)
    state_dicts, _ = fit_and_load(loop, datasets, run_name=f"{cfg.name}-teacher-{teacher.name}-{run_id[:8]}")
    return state_dicts[teacher.name], "trained"


def resolve_teacher(cfg: JobConfig, index: int, data: DatasetArrays, train_ids, val_ids, loaded: dict | None, track: TrackingContext) -> TeacherWeights:
    """A teacher's weights: given (checkpoint / MLflow model), reused from the teacher cache, or trained now."""
    teacher = cfg.teachers[index]
    started = time.perf_counter()
    with tracking.run_scope(track.uri, track.experiment_id, f"teacher:{teacher.name}", parent_id=track.parent_id, tags={"role": "teacher"}) as run_id:
        tracking.log_params(track.uri, run_id, tracking.flatten(teacher.model_dump()))
        if loaded is not None:
            state_dict, source = loaded, ("checkpoint" if teacher.checkpoint else "mlflow")
            tags = {"source_path": teacher.checkpoint or teacher.mlflow_model}
        else:
            key = teacher_training_key(cfg, teacher, data)
            path = weights_file(cfg.soft_targets.cache_dir, "teachers", key)
            with build_lock(path.folder, key):  # a job training the same teacher right now: wait and reuse it
                cached = load_cached_weights(path)
                if cached is not None:
                    state_dict, source = cached["state_dict"], "cache"
                    tags = {"cache_file": str(path), "source_run_id": cached.get("run_id", "")}
                else:
                    say(f"teacher {teacher.name}: training {teacher.train.epochs} epochs on {len(train_ids):,} images")
                    state_dict, source = train_teacher(cfg, index, data, train_ids, val_ids, track, run_id)
                    save_cached_weights(path, {"state_dict": state_dict, "run_id": run_id})
                    tags = {"cache_file": str(path)}
        say(f"teacher {teacher.name}: {SOURCE_WORDS[source]}" + (f" ({time.perf_counter() - started:.0f} s)" if source == "trained" else ""))
        model = build_model(teacher, data.input_shape, data.num_classes)
        load_weights(model, state_dict, where=f"teachers.{index}")
        if teacher.prune_amount > 0:
            state_dict = _prune_teacher(model, teacher, data, track.uri, run_id)
        weights_fp = state_dict_fingerprint(state_dict)
        tracking.set_tags(track.uri, run_id, {"source": source, "teacher_fingerprint": weights_fp, "dataset": data.name, **tags})
        if (source != "cache" or teacher.prune_amount > 0) and cfg.tracking.log_models:
            example = np.zeros((1, *data.input_shape), dtype=np.float32)
            tracking.log_torch_model(track.uri, run_id, model, name="model", spec=spec_of(teacher).model_dump(mode="json"), input_shape=data.input_shape,
                                     num_classes=data.num_classes, input_example=example)
        wall = time.perf_counter() - started
        tracking.log_metrics(track.uri, run_id, {"wall_s": wall})
    return TeacherWeights(teacher, state_dict, weights_fp, source, run_id, wall)


def _prune_teacher(model: torch.nn.Module, teacher: TeacherConfig, data: DatasetArrays, uri: str, run_id: str) -> dict:
    """Prune `model` in place and log the teacher's test accuracy before and after; returns the pruned weights.

    The test split is only reported here, never used to choose anything.
    """
    labels = torch.from_numpy(data.test.labels)
    before = classification_metrics(predict_logits(model, data.test.images, mean=data.mean, std=data.std), labels)
    prune_model(model, teacher.prune_amount, structured=teacher.prune_structured)
    after = classification_metrics(predict_logits(model, data.test.images, mean=data.mean, std=data.std), labels)
    metrics = {"prune_sparsity": sparsity(model), "unpruned_test_accuracy": before["accuracy"], "pruned_test_accuracy": after["accuracy"]}
    tracking.log_metrics(uri, run_id, metrics)
    kind = "structured (filters/rows)" if teacher.prune_structured else "unstructured"
    print(f"teacher {teacher.name}: pruned {kind} {teacher.prune_amount:.0%} -> sparsity {metrics['prune_sparsity']:.1%}, "
          f"test accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}", flush=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
        "inference": {"device": "cuda" if teacher_gpus(st.gpus_per_actor(cfg.train.use_gpu)) > 0 else "cpu", "precision": st.precision},
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


def _all_images(data: DatasetArrays) -> Split:
    """Train and test rows in one dataset so the actor pool starts once; test ids follow the train ids."""
    return Split(np.concatenate([data.train.images, data.test.images]), np.concatenate([data.train.labels, data.test.labels]))


def generate_soft_targets(cfg: JobConfig, teachers: list[TeacherWeights], data: DatasetArrays) -> ray.data.Dataset:
    st = cfg.soft_targets
    gpus = teacher_gpus(st.gpus_per_actor(cfg.train.use_gpu))  # GPUs when the cluster has them, else the CPU
    views = soft_target_views(cfg, data)
    predictor_kwargs: dict[str, Any] = {
        # Weights as object-store references: small constructor arguments, fetched once per actor.
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
        "threads": max(1, int(st.num_cpus_per_actor)),
        "use_gpu": gpus > 0,
        "views": asdict(views),
        "forward_batch": st.batch_size,
        "precision": st.precision,
    }
    return to_ray_dataset(_all_images(data)).map_batches(
        TeacherPredictor,
        fn_constructor_kwargs=predictor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=st.num_actors),
        # A train row becomes one output row per view: keep output batches near batch_size rows.
        batch_size=max(1, st.batch_size // views.count),
        batch_format="numpy",
        zero_copy_batch=True,
        num_cpus=st.num_cpus_per_actor,
        num_gpus=gpus,
    )


def columns_by_id_and_view(table: pa.Table, columns: list[str], *, n_train: int, n_test: int, views: int) -> tuple[dict, dict]:
    """Cache rows -> ({name: (n_train, V, ...)}, {name: (n_test, ...)}), checking that every (id, view) is there once."""
    table = table.sort_by([("id", "ascending"), ("view", "ascending")])
    ids, view = column_to_numpy(table, "id"), column_to_numpy(table, "view")
    want_ids = np.concatenate([np.repeat(np.arange(n_train), views), np.arange(n_train, n_train + n_test)])
    want_views = np.concatenate([np.tile(np.arange(views), n_train), np.zeros(n_test, dtype=np.int64)])
    if not (np.array_equal(ids, want_ids) and np.array_equal(view, want_views)):
        raise RuntimeError(f"soft targets do not cover every (example, view) exactly once ({n_train} x {views} train, {n_test} test)")
    split = n_train * views
    train, test = {}, {}
    for name in columns:
        values = column_to_numpy(table, name)
        train[name] = values[:split].reshape(n_train, views, *values.shape[1:])
        test[name] = values[split:]
    return train, test


def soft_target_stage(cfg: JobConfig, teachers: list[TeacherWeights], data: DatasetArrays, track: TrackingContext) -> SoftTargets:
    st = cfg.soft_targets
    started = time.perf_counter()
    key = soft_target_key(cfg, teachers, data)
    columns = ["id", "view", *logit_columns(st.encoding)]
    views = soft_target_views(cfg, data)
    shape = {"n_train": len(data.train.labels), "n_test": len(data.test.labels), "views": views.count}
    counter = forward_row_counter("job")  # this job's rows only: a job beside it on the cluster does not count here
    rows_before = ray.get(counter.total.remote())
    with tracking.run_scope(track.uri, track.experiment_id, "soft-targets", parent_id=track.parent_id, tags={"role": "soft_targets"}) as run_id:
        tracking.log_params(track.uri, run_id, tracking.flatten(st.model_dump()))
        # One builder per fingerprint: a concurrent job waits here, then reads what the first one wrote.
        with build_lock(st.cache_dir, key) as lock_wait_s:
            entry = read_cache(st.cache_dir, key)
            cache_hit = entry is not None
            if cache_hit:
                by_id = columns_by_id_and_view(load_table(entry, columns), logit_columns(st.encoding), **shape)
            else:
                generated = generate_soft_targets(cfg, teachers, data).materialize()
                # cache_dir as configured: a URI must reach write_cache whole (it resolves paths itself).
                entry = write_cache(generated, st.cache_dir, key, columns=columns,
                                    extra_manifest={"dataset": data.name, "n_train": len(data.train.labels), "views": asdict(views)})
                # Training gets the logits from the object store, not from the parquet just written.
                table = pa.concat_tables(ray.get(generated.select_columns(columns).to_arrow_refs()))
                by_id = columns_by_id_and_view(table, logit_columns(st.encoding), **shape)
        forward_rows = ray.get(counter.total.remote()) - rows_before
        wall = time.perf_counter() - started
        rows = shape["n_train"] * shape["views"] + shape["n_test"]
        tracking.set_tags(track.uri, run_id, {
            "soft_target_fingerprint": key, "cache_hit": cache_hit, "cache_path": str(entry.path),
            "teacher_run_ids": ",".join(t.run_id for t in teachers), "dataset": data.name, "views": views.count,
        })
        size = sum(f["bytes"] for f in entry.manifest.get("files", []))
        tracking.log_metrics(track.uri, run_id, {
            "rows": rows, "teacher_forward_rows": forward_rows, "wall_s": wall, "rows_per_s": rows / wall, "cache_lock_wait_s": lock_wait_s,
            "cache_bytes": size, "views": views.count,
        })
    say(f"soft targets: {'cache hit' if cache_hit else 'generated'}, {rows:,} rows ({views.count} view(s) per training image), "
        f"{forward_rows:,} teacher forward rows" + (f", {forward_rows / wall:,.0f} rows/s" if forward_rows else "") + f", {wall:.0f} s")
    return SoftTargets(key, by_id[0], by_id[1], len(data.train.labels), cache_hit, forward_rows, wall, str(entry.path), run_id, size)


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


def with_soft_targets(split: Split, ids: np.ndarray, soft: SoftTargets) -> ray.data.Dataset:
    """Train-split images joined with their teacher logits by id (ids index the train split directly)."""
    return to_ray_dataset(split, ids).map_batches(attach_soft_targets, fn_kwargs={"columns": soft.train_columns}, batch_format="numpy").materialize()


def distill_members(cfg: JobConfig, data: DatasetArrays, train_ids, val_ids, soft: SoftTargets, track: TrackingContext,
                    members: list[MemberConfig], *, run_name: str, callbacks=(), teachers: list[TeacherWeights] | None = None) -> tuple[dict[str, dict], dict]:
    """Distil `members` from `soft` in one Ray Train run; returns their final state dicts and the last epoch's reported metrics.

    With `teacher_mode: online` the `teachers` also run inside the workers on every batch
    (feature terms, jittered inputs); `soft` still gives the validation metrics.
    """
    loop = loop_config(cfg, data, track, stage="distill", members=members, optim=cfg.train, encoding=cfg.soft_targets.encoding,
                       train_rows=len(train_ids), views=view_policy(cfg, data)).model_copy(update={"has_val": len(val_ids) > 0})
    objects = None
    if cfg.teacher_mode == "online":
        if not teachers:
            raise ValueError("teacher_mode online: this stage was given no teachers to run")
        online = [{"name": t.config.name, "spec": spec_of(t.config).model_dump(mode="json"), "weight": t.config.weight} for t in teachers]
        loop = loop.model_copy(update={"teacher_mode": "online", "online_teachers": online, "ensemble": cfg.soft_targets.ensemble})
        objects = {"teacher_states": ray.put([t.state_dict for t in teachers])}  # weights through the object store, once
    datasets = {"train": with_soft_targets(data.train, train_ids, soft)}
    if len(val_ids):
        datasets["val"] = with_soft_targets(data.train, val_ids, soft)
    return fit_and_load(loop, datasets, run_name=run_name, callbacks=callbacks, objects=objects)


def student_stage(cfg: JobConfig, data: DatasetArrays, train_ids, val_ids, soft: SoftTargets, track: TrackingContext, run_ids: dict[str, str],
                  teachers: list[TeacherWeights] | None = None) -> StudentsResult:
    started = time.perf_counter()
    members = student_members(cfg, run_ids, data, soft)
    say(f"students: {', '.join(m.name for m in members)}; {cfg.train.epochs} epochs on {len(train_ids):,} images, {soft.views} view(s) each")
    state_dicts, last = distill_members(cfg, data, train_ids, val_ids, soft, track, members, run_name=f"{cfg.name}-students-{track.parent_id[:8]}",
                                        teachers=teachers)
    return StudentsResult(state_dicts, members, time.perf_counter() - started, run_ids, int(last.get("online_teacher_rows", 0)))
