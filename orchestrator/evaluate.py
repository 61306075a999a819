"""Evaluation numerics shared by the train workers (validation) and the driver (test set)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.data import normalize_images
from orchestrator.losses import kl_to_teacher, top1_agreement


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 2048,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 logits (N, K) on the CPU, model left in eval mode."""
    model.eval()
    images = torch.as_tensor(images)
    chunks = []
    for start in range(0, len(images), batch_size):
        x = normalize_images(images[start : start + batch_size], mean, std).to(device)
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
