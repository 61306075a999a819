"""The one place a finished model (teacher, assistant, student, twin, sweep trial, a teacher before and after
pruning) is tested and recorded.

Testing runs on one of the job's warm teacher actors, or in a Ray task (`score_models`, for a stage's models):
the test split goes to it by one object-store reference (`put_test_split`), the teachers' test logits by the reference the
soft-target stage left there, and what comes back is each model's metrics (accuracy, errors, agreement with
and KL to the teacher), the per-example correctness the paired test reads and, when the transfer-set bias
was corrected, the corrected weights. No logits reach the driver. A sweep trial, itself a Tune actor, calls
the same `model_scores` in its own process.

This module stays light (no MLflow, no Ray Train at import): the tasks' workers import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch

from orchestrator.config import ModelSpec, spec_of
from orchestrator.data.datasets import DatasetArrays, Split
from orchestrator.data.object_images import ObjectImages
from orchestrator.data.ray_objects import put_once
from orchestrator.flows.scoring import class_errors, correct_bias
from orchestrator.teachers.soft_targets import decode_logits
from orchestrator.train.evaluate import classification_metrics, eval_device, predict_logits
from orchestrator.train.models import build_model, load_weights


def logits_on_test_split(model: torch.nn.Module, data: DatasetArrays, *, use_gpu: bool, precision: str) -> torch.Tensor:
    """The model's logits on the whole test split (on the job's device); the model is back on the host after.
    Run where the scoring runs (an actor or a task): test images in the object store (reader ray) are read here."""
    images = data.test.images.read_all() if isinstance(data.test.images, ObjectImages) else data.test.images
    logits = predict_logits(model.to(eval_device(use_gpu)), images, mean=data.mean, std=data.std, precision=precision)
    model.cpu()  # logged, measured and handed back from the host
    return logits


def metrics_on_test_split(logits: torch.Tensor, data: DatasetArrays, teacher_test: torch.Tensor | None) -> dict[str, Any]:
    """accuracy, errors, agreement with and KL to the teacher on the test split, keyed `test_<metric>`."""
    metrics = classification_metrics(logits, torch.from_numpy(data.test.labels), teacher_test)
    return {f"test_{k}": v for k, v in metrics.items()}


def model_scores(model: torch.nn.Module, data: DatasetArrays, teacher_test: Mapping[str, np.ndarray] | None, *, use_gpu: bool, precision: str,
               excluded: Sequence[int] = (), bias_val: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """{"metrics", "extra", "correct", "state_dict"}: a finished model on `data`'s test split.

    `teacher_test`: the encoded teacher logit columns of the test split (agreement and KL are measured
    against them). `excluded`: classes left out of the transfer set, whose test errors are counted apart;
    with `bias_val` (validation images and labels) their output bias is first raised by the validation-best
    shift (Hinton et al. 2015), and the corrected weights come back as "state_dict" (else None)."""
    teacher = decode_logits({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in teacher_test.items()}, num_classes=data.num_classes) \
        if teacher_test is not None else None
    labels = torch.from_numpy(data.test.labels)
    logits = logits_on_test_split(model, data, use_gpu=use_gpu, precision=precision)
    extra: dict[str, Any] = {}
    if excluded:
        extra["excluded_class_errors"] = class_errors(logits.argmax(1), labels, excluded)
    if excluded and bias_val is not None:
        before = metrics_on_test_split(logits, data, teacher)
        extra = {"bias_shift": correct_bias(model, *bias_val, excluded, mean=data.mean, std=data.std),
                 "errors_before_bias_correction": before["test_errors"], "excluded_class_errors_before_bias_correction": extra["excluded_class_errors"]}
        logits = logits_on_test_split(model, data, use_gpu=use_gpu, precision=precision)
        extra["excluded_class_errors"] = class_errors(logits.argmax(1), labels, excluded)
    return {"metrics": metrics_on_test_split(logits, data, teacher), "extra": extra, "correct": (logits.argmax(1) == labels).numpy(),
            "state_dict": model.state_dict() if excluded and bias_val is not None else None}


def score_stage(models: Sequence[tuple[dict, Mapping[str, torch.Tensor], str]], test_split: DatasetArrays,
                teacher_test: Mapping[str, np.ndarray] | None, *, use_gpu: bool, precision: str, excluded: Sequence[int] = (),
                bias_val: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """`model_scores` of each (spec, weights, name), the models rebuilt where this runs: a warm teacher actor or a
    task (`score_models`; Ray resolves the references among the arguments: the test split and the teachers'
    test columns come from the object store). One call for a stage's models, not one each: on small models a
    new worker's imports cost more than the scoring."""
    scores = []
    for spec, state_dict, name in models:
        model = build_model(ModelSpec.model_validate(spec), test_split.input_shape, test_split.num_classes)
        load_weights(model, state_dict, where=name)
        scores.append(model_scores(model, test_split, teacher_test, use_gpu=use_gpu, precision=precision, excluded=excluded,
                                   bias_val=(bias_val or {}).get(name)))
    return scores


model_scores_task = ray.remote(score_stage)


def put_test_split(data: DatasetArrays) -> ray.ObjectRef:
    """The test split alone (no training rows), put in the object store once per job for every scoring task."""
    return put_once(data, ("test_split",), lambda: ray.put(replace(data, train=Split(data.train.images[:0], data.train.labels[:0]))))


def score_models(models: Sequence[tuple[ModelSpec, Mapping[str, torch.Tensor], str]], test_ref: ray.ObjectRef, teacher_test: ray.ObjectRef, *,
                 precision: str, gpus: float = 0.0, excluded: Sequence[int] = (),
                 bias_val: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, warm: bool = True) -> list[dict[str, Any]]:
    """Every (spec, weights, name) scored off the driver; results in the given order. `bias_val` maps the names
    whose transfer-set bias is corrected to their validation images and labels.

    On one of the job's warm teacher actors when the job has them on the CPU (`warm`): torch is imported there
    and no worker process starts; else in a task (with `gpus`, its GPU share)."""
    from orchestrator.teachers.warm_pool import warm_actor  # the driver's side only: a scoring task's worker never needs it

    models = [(spec_of(spec).model_dump(mode="json"), state, name) for spec, state, name in models]
    kwargs = {"use_gpu": gpus > 0, "precision": precision, "excluded": list(excluded), "bias_val": bias_val}
    actor = warm_actor() if warm and gpus == 0 else None
    if actor is not None:
        return ray.get(actor.call.remote(score_stage, models, test_ref, teacher_test, **kwargs))
    return ray.get(model_scores_task.options(num_gpus=gpus).remote(models, test_ref, teacher_test, **kwargs))


def log_model(uri: str, run_id: str, model: torch.nn.Module, spec: ModelSpec, data: DatasetArrays) -> None:
    """The model as an MLflow pyfunc with its bare architecture (loads back with `tracking.load_torch_model`)."""
    from orchestrator.tracking import runs as tracking  # MLflow: only the driver logs, the scoring tasks never import it

    example = np.zeros((1, *data.input_shape), dtype=np.float32)
    tracking.log_torch_model(uri, run_id, model, name="model", spec=spec_of(spec).model_dump(mode="json"), input_shape=data.input_shape,
                             num_classes=data.num_classes, input_example=example)
