"""The teacher stage: a teacher's weights given, reused from the teacher cache, or trained on Ray Train
(and pruned if asked). Knows nothing of MLflow: stage_runs.resolve_teacher logs what it returns."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import ray.data
import torch

from orchestrator.compress.quantize import prune_model, sparsity
from orchestrator.config import JobConfig, TeacherConfig, spec_of
from orchestrator.data.datasets import DatasetArrays, Split
from orchestrator.data.ray_objects import to_ray_dataset
from orchestrator.flows.finished import put_test_split, score_models
from orchestrator.flows.stages import TrackingContext, loop_config
from orchestrator.teachers.soft_targets import build_lock, fingerprint
from orchestrator.teachers.weights_cache import load_cached_weights, save_cached_weights, weights_file
from orchestrator.tracking.progress import say
from orchestrator.train.models import build_model, load_weights
from orchestrator.train.train_loop import MemberConfig
from orchestrator.train.trainer import fit_and_load

SOURCE_WORDS = {"trained": "trained", "cache": "reused from the teacher cache", "checkpoint": "loaded from its checkpoint",
                "mlflow": "loaded from MLflow"}


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


@dataclass
class ObtainedTeacher:
    """A teacher's weights and where they came from (what its MLflow run records: stage_runs.py)."""

    state_dict: dict[str, torch.Tensor]
    source: str  # trained | cache | checkpoint | mlflow
    model: torch.nn.Module  # built and loaded (pruned, if asked)
    provenance: dict[str, str]  # source_path | cache_file (+ source_run_id)
    prune_metrics: dict[str, float] = field(default_factory=dict)


def obtain_teacher(cfg: JobConfig, index: int, data: DatasetArrays, train_ids, val_ids, loaded: dict | None, track: TrackingContext,
                   run_id: str) -> ObtainedTeacher:
    """A teacher's weights: given (checkpoint / MLflow model), reused from the teacher cache, or trained now (its epochs
    reported to `run_id`)."""
    teacher = cfg.teachers[index]
    started = time.perf_counter()
    if loaded is not None:
        state_dict, source = loaded, ("checkpoint" if teacher.checkpoint else "mlflow")
        provenance = {"source_path": teacher.checkpoint or teacher.mlflow_model}
    else:
        key = teacher_training_key(cfg, teacher, data)
        path = weights_file(cfg.soft_targets.cache_dir, "teachers", key)
        with build_lock(path.folder, key):  # a job training the same teacher right now: wait and reuse it
            cached = load_cached_weights(path)
            if cached is not None:
                state_dict, source = cached["state_dict"], "cache"
                provenance = {"cache_file": str(path), "source_run_id": cached.get("run_id", "")}
            else:
                say(f"teacher {teacher.name}: training {teacher.train.epochs} epochs on {len(train_ids):,} images")
                state_dict, source = train_teacher(cfg, index, data, train_ids, val_ids, track, run_id)
                save_cached_weights(path, {"state_dict": state_dict, "run_id": run_id})
                provenance = {"cache_file": str(path)}
    say(f"teacher {teacher.name}: {SOURCE_WORDS[source]}" + (f" ({time.perf_counter() - started:.0f} s)" if source == "trained" else ""))
    model = build_model(teacher, data.input_shape, data.num_classes)
    load_weights(model, state_dict, where=f"teachers.{index}")
    prune_metrics = {}
    if teacher.prune_amount > 0:
        state_dict, prune_metrics = prune_teacher(model, teacher, data)
    return ObtainedTeacher(state_dict, source, model, provenance, prune_metrics)


def prune_teacher(model: torch.nn.Module, teacher: TeacherConfig, data: DatasetArrays) -> tuple[dict, dict[str, float]]:
    """Prune `model` in place; returns the pruned weights and the teacher's test accuracy before and after, both
    scored in one scoring task (finished.py), like every finished model.

    The test split is only reported here, never used to choose anything.
    """
    unpruned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prune_model(model, teacher.prune_amount, structured=teacher.prune_structured)
    pruned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before, after = (score["metrics"] for score in score_models([(teacher, unpruned, teacher.name), (teacher, pruned, teacher.name)],
                                                                 put_test_split(data), None, precision="fp32"))
    metrics = {"prune_sparsity": sparsity(model), "unpruned_test_accuracy": before["test_accuracy"], "pruned_test_accuracy": after["test_accuracy"]}
    kind = "structured (filters/rows)" if teacher.prune_structured else "unstructured"
    print(f"teacher {teacher.name}: pruned {kind} {teacher.prune_amount:.0%} -> sparsity {metrics['prune_sparsity']:.1%}, "
          f"test accuracy {before['test_accuracy']:.4f} -> {after['test_accuracy']:.4f}", flush=True)
    return pruned, metrics


