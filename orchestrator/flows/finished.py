"""The one place a finished model (teacher, student, twin, sweep trial) is tested and recorded: its test-set
logits and metrics, and the model logged to its MLflow run with the spec it loads back from."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from orchestrator.config import ModelSpec, spec_of
from orchestrator.data.datasets import DatasetArrays
from orchestrator.tracking import runs as tracking
from orchestrator.train.evaluate import classification_metrics, eval_device, predict_logits


def logits_on_test_split(model: torch.nn.Module, data: DatasetArrays, *, use_gpu: bool, precision: str) -> torch.Tensor:
    """The model's logits on the whole test split (on the job's device); the model is back on the host after."""
    logits = predict_logits(model.to(eval_device(use_gpu)), data.test.images, mean=data.mean, std=data.std, precision=precision)
    model.cpu()  # logged, measured and handed back from the host
    return logits


def metrics_on_test_split(logits: torch.Tensor, data: DatasetArrays, teacher_test: torch.Tensor | None) -> dict[str, Any]:
    """accuracy, errors, agreement with and KL to the teacher on the test split, keyed `test_<metric>`."""
    metrics = classification_metrics(logits, torch.from_numpy(data.test.labels), teacher_test)
    return {f"test_{k}": v for k, v in metrics.items()}


def log_model(uri: str, run_id: str, model: torch.nn.Module, spec: ModelSpec, data: DatasetArrays) -> None:
    """The model as an MLflow pyfunc with its bare architecture (loads back with `tracking.load_torch_model`)."""
    example = np.zeros((1, *data.input_shape), dtype=np.float32)
    tracking.log_torch_model(uri, run_id, model, name="model", spec=spec_of(spec).model_dump(mode="json"), input_shape=data.input_shape,
                             num_classes=data.num_classes, input_example=example)
