"""Evaluation numerics shared by the train workers (validation) and the driver (test set)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.data.datasets import normalize_images
from orchestrator.losses.hinton import kl_to_teacher, top1_agreement


def eval_device(use_gpu: bool) -> torch.device:
    """Where the driver scores models: its GPU when the job trains on GPUs and this process has one, else the CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 2048,
    precision: str = "fp32",
) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 logits (N, K) on the CPU, model left in eval mode.

    Runs on the model's device: each batch crosses as uint8 and is normalised there.
    """
    from orchestrator.train.precision import autocast

    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    images = torch.as_tensor(images)
    chunks = []
    with autocast(precision, device):
        for start in range(0, len(images), batch_size):
            x = normalize_images(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
            chunks.append(model(x).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy, error count and CE loss; plus top-1 agreement and KL(teacher || model) when a teacher is given."""
    # Compared on the logits' device: labels or teacher logits left on another device (a CUDA batch
    # beside CPU logits) would fail with "Expected all tensors to be on the same device".
    labels = torch.as_tensor(labels).long().to(logits.device)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(logits.device)
    predictions = logits.argmax(dim=1)
    metrics = {
        "accuracy": float((predictions == labels).float().mean()),
        "errors": int((predictions != labels).sum()),
        "loss": float(F.cross_entropy(logits, labels)),
    }
    if teacher_logits is not None:
        metrics["agreement"] = float(top1_agreement(logits, teacher_logits))
        metrics["kl_to_teacher"] = float(kl_to_teacher(logits, teacher_logits))
    return metrics
