"""Teachers at inference time: the map_batches callable, ensembles and the forward-row counter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

from orchestrator.config import ModelSpec
from orchestrator.data.datasets import normalize_images
from orchestrator.data.views import ViewPolicy, views_of
from orchestrator.teachers.soft_targets import encode_logits
from orchestrator.train.models import build_model, load_weights
from orchestrator.train.precision import autocast

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


_JOB_COUNTERS: dict[tuple[str, str], Any] = {}


def forward_row_counter(scope: str = "cluster") -> Any:
    """Rows the teachers ran on. `cluster`: every job's since the cluster started (detached; tests and benchmarks
    compare it across drivers). `job`: this driver's job only (owned by the driver, gone with it), what a job
    reports, whatever other jobs run beside it. The driver creates its job counter before any actor adds to it:
    one first made by an actor would end with that actor."""
    if scope == "job":
        context = ray.get_runtime_context()
        name = f"{COUNTER_NAME}-job-{context.get_job_id()}"
        key = (context.get_node_id(), name)  # a restarted Ray numbers its jobs from 1 again, on a new node id
        if key not in _JOB_COUNTERS:  # held here: a non-detached actor ends when the last handle to it goes
            _JOB_COUNTERS[key] = ForwardRowCounter.options(name=name, namespace=COUNTER_NAMESPACE, get_if_exists=True).remote()
        return _JOB_COUNTERS[key]
    if scope != "cluster":
        raise ValueError(f"scope must be 'cluster' or 'job', got {scope!r}")
    return ForwardRowCounter.options(name=COUNTER_NAME, namespace=COUNTER_NAMESPACE, get_if_exists=True, lifetime="detached").remote()


def teacher_forward_rows(scope: str = "cluster") -> int:
    return ray.get(forward_row_counter(scope).total.remote())


class TeacherPredictor:
    """Callable class for `Dataset.map_batches` on an actor pool: images -> encoded teacher logits per view.

    Each actor builds its teachers once (weights come in the constructor kwargs, so
    nothing is read from a path the worker may not see) and then streams batches.
    A training row (id < n_train) becomes `views["count"]` output rows, one per view
    (views.py), a test row one (view 0, the untouched image): output columns id, view
    and the encoded logit columns. Views are cut on the actor, so each image crosses
    the object store once, not once per view.
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
        views: Mapping[str, Any] | None = None,
        forward_batch: int = 4096,
        precision: str = "auto",
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.models = []
        for teacher in teachers:
            model = build_model(ModelSpec.model_validate(teacher["spec"]), tuple(input_shape), num_classes)
            # Weights come as an object-store reference (each actor fetches them once) or, in tests, inline.
            state = teacher["state_dict"]
            state = ray.get(state) if isinstance(state, ray.ObjectRef) else state
            load_weights(model, state, where=f"teacher {teacher['name']}")
            self.models.append(model.to(self.device).eval())
        self.weights = [float(t["weight"]) for t in teachers]
        self.mean, self.std = tuple(mean), tuple(std)
        self.n_train = n_train
        self.encoding, self.top_k, self.ensemble = encoding, top_k, ensemble
        self.policy = ViewPolicy(**(views or {}))
        self.forward_batch = max(1, forward_batch)
        self.precision = precision
        self.counters = [forward_row_counter(), forward_row_counter("job")]

    def _expand(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row of the input batch, id, view) of every output row: all views of train rows, view 0 of test rows."""
        per_row = np.where(ids < self.n_train, self.policy.count, 1)
        rows = np.repeat(np.arange(len(ids)), per_row)
        starts = np.cumsum(per_row) - per_row
        views = np.arange(len(rows)) - np.repeat(starts, per_row)
        return rows, ids[rows], views.astype(np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"].astype(np.int64)
        rows, out_ids, views = self._expand(ids)
        images = torch.from_numpy(np.array(batch["image"], copy=True))  # Ray's zero-copy batch is read-only; torch warns on those
        cuda = self.device.type == "cuda"
        # The batch's uint8 images cross to the device once (pinned, non-blocking); views are cut and
        # normalised there, and only the logits come back.
        images = images.pin_memory().to(self.device, non_blocking=True) if cuda else images
        ids_t, rows_t, views_t = (torch.from_numpy(a).to(self.device) for a in (out_ids, rows, views))
        chunks = []
        with torch.inference_mode(), autocast(self.precision, self.device):
            for start in range(0, len(rows), self.forward_batch):
                part = slice(start, start + self.forward_batch)
                x = normalize_images(views_of(images[rows_t[part]], ids_t[part], views_t[part], self.policy), self.mean, self.std)
                outputs = [model(x).float() for model in self.models]
                logits = outputs[0] if len(outputs) == 1 else ensemble_logits(outputs, self.weights, rule=self.ensemble)
                chunks.append(logits.cpu())
        for counter in self.counters:
            counter.add.remote(len(rows))
        logits = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), dtype=np.float32)
        return {"id": out_ids, "view": views.astype(np.int16), **encode_logits(logits, encoding=self.encoding, top_k=self.top_k)}
