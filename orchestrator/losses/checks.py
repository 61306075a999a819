"""Checks and the softened KL shared by every logit loss (kept apart so loss modules import it, not each other)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def check_logits(student_logits: Tensor, teacher_logits: Tensor, *, what: str) -> None:
    """Shape checks that turn silent broadcasting bugs into one-line errors."""
    if student_logits.ndim != 2:
        raise ValueError(f"{what}: student logits must be (N, C), got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"{what}: teacher logits shape {tuple(teacher_logits.shape)} "
            f"does not match student logits shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape[0] == 0:
        raise ValueError(f"{what}: empty batch")


def check_temperature(temperature: float, *, what: str) -> None:
    # `not (t > 0)` also rejects NaN.
    if not (temperature > 0) or temperature == float("inf"):
        raise ValueError(f"{what}: temperature must be a finite number > 0, got {temperature!r}")


def check_alpha(alpha: float, *, what: str) -> None:
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"{what}: alpha must be in [0, 1], got {alpha!r}")


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(p_t^T || p_s^T) averaged over the batch, without the T^2 factor.

    The teacher is detached so no gradient can ever reach it (it may be a live
    model in feature-distillation setups). The target is given to `F.kl_div` as
    probabilities, not log-probabilities: kl_div then uses xlogy(p, p), which is
    0 where p == 0, so classes a top-k encoding dropped (teacher logit -inf,
    probability exactly 0) contribute 0 instead of 0 * -inf = NaN.
    """
    teacher = teacher_logits.detach().to(student_logits.dtype)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    # "batchmean" = sum over classes, mean over rows: the true KL per example.
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean")
