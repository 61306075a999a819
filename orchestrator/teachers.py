"""Teachers at inference time: the map_batches callable, ensembles and the forward-row counter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

from orchestrator.config import ModelSpec
from orchestrator.data import normalize_images
from orchestrator.models import build_model, load_weights
from orchestrator.soft_targets import encode_logits

COUNTER_NAME = "kd-teacher-forward-rows"
COUNTER_NAMESPACE = "kd-orchestrator"


def ensemble_logits(per_teacher: Sequence[torch.Tensor], weights: Sequence[float], *, rule: str) -> torch.Tensor:
    """Weighted ensemble of teacher logits, each (B, K) -> (B, K).

    rule "logits": weighted mean of logits. rule "probs": log of the weighted mean of
    probabilities, which is itself a valid logit vector (softmax gives the mean back).
    """
    w = torch.tensor(list(weights), dtype=torch.float32, device=per_teacher[0].device)  # online mode runs on the GPU too
    w = w / w.sum()
    stacked = torch.stack([t.float() for t in per_teacher])  # (M, B, K)
    if rule == "logits":
        return torch.einsum("m,mbk->bk", w, stacked)
    if rule == "probs":
        log_mix = torch.logsumexp(F.log_softmax(stacked, dim=-1) + w.log()[:, None, None], dim=0)
        return log_mix
    raise ValueError(f"unknown ensemble rule {rule!r} (logits, probs)")


@ray.remote(num_cpus=0)
class ForwardRowCounter:
    """Counts rows the teacher actually ran on, so tests and MLflow see real teacher work, not timings."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows


def forward_row_counter() -> Any:
    return ForwardRowCounter.options(name=COUNTER_NAME, namespace=COUNTER_NAMESPACE, get_if_exists=True, lifetime="detached").remote()


def teacher_forward_rows() -> int:
    return ray.get(forward_row_counter().total.remote())


class TeacherPredictor:
    """Callable class for `Dataset.map_batches` on an actor pool: images -> encoded teacher logits.

    Each actor builds its teachers once (weights come in the constructor kwargs, so
    nothing is read from a path the worker may not see) and then streams batches.
    Output columns: id, split (0 train, 1 test), label and the encoded logit columns.
    """

    def __init__(
        self,
        teachers: Sequence[Mapping[str, Any]],
        *,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        n_train: int,
        encoding: str,
        top_k: int,
        ensemble: str,
        threads: int,
        use_gpu: bool,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.models = []
        for teacher in teachers:
            model = build_model(ModelSpec.model_validate(teacher["spec"]), tuple(input_shape), num_classes)
            load_weights(model, teacher["state_dict"], where=f"teacher {teacher['name']}")
            self.models.append(model.to(self.device).eval())
        self.weights = [float(t["weight"]) for t in teachers]
        self.mean, self.std = tuple(mean), tuple(std)
        self.n_train = n_train
        self.encoding, self.top_k, self.ensemble = encoding, top_k, ensemble
        self.counter = forward_row_counter()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = normalize_images(torch.from_numpy(np.ascontiguousarray(batch["image"])), self.mean, self.std).to(self.device)
        with torch.inference_mode():
            outputs = [model(images) for model in self.models]
        logits = outputs[0] if len(outputs) == 1 else ensemble_logits(outputs, self.weights, rule=self.ensemble)
        self.counter.add.remote(len(batch["id"]))
        ids = batch["id"].astype(np.int64)
        return {
            "id": ids,
            "split": (ids >= self.n_train).astype(np.uint8),
            "label": batch["label"].astype(np.int64),
            **encode_logits(logits.float().cpu().numpy(), encoding=self.encoding, top_k=self.top_k),
        }


def attach_soft_targets(batch: dict[str, np.ndarray], *, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_batches function: add the encoded teacher logits of each row, looked up by its id.

    Ids are dense row indices, so the join is an array gather rather than a shuffle join.
    """
    ids = batch["id"]
    return {**batch, **{name: values[ids] for name, values in columns.items()}}
