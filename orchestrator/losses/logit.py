"""Response-based losses beyond Hinton KD: decoupled KD and logit standardization.

References:
    B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation",
    CVPR 2022, arXiv:2203.08679.
    S. Sun, W. Ren, J. Li, R. Wang, X. Cao, "Logit Standardization in Knowledge
    Distillation", CVPR 2024, arXiv:2403.01427.

Shapes: N = batch size, C = number of classes (C >= 2 for DKD).
    student_logits (N, C) float; teacher_logits (N, C) any float dtype, detached
    here (no gradient ever reaches a teacher); labels (N,) int64.

The shorthands `dkd`, `kd_ls`, `dkd_ls` blend these with CE by alpha (losses/terms.py SHORTHANDS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from orchestrator.losses.checks import check_logits, check_temperature, soft_kl

__all__ = [
    "DKD_NCKD_WEIGHT",
    "DKD_TCKD_WEIGHT",
    "dkd_loss",
    "kd_soft_loss",
    "mutual_learning_loss",
    "standardize_logits",
]

# Zhao et al. (2022), Table 11 / official mdistiller CIFAR-100 configs: alpha = 1, beta = 8.
DKD_TCKD_WEIGHT = 1.0
DKD_NCKD_WEIGHT = 8.0
# Sun et al.'s code divides by (eps + std): rows of equal logits (std 0) become all zeros,
# i.e. the uniform distribution, instead of NaN.
_LS_EPS = 1e-7


def standardize_logits(logits: Tensor) -> Tensor:
    """Z-score each row (Sun et al. 2024, Eq. 8 without the temperature): (z - mean(z)) / (eps + std(z)).

    logits (N, C) -> (N, C). `std` is the unbiased one (n - 1), as in the authors' code.
    The softmax of Z(z) / T is invariant to shifting and scaling z, so a student is
    no longer forced to match the teacher's logit range, only its ranking and shape.
    """
    if not torch.isfinite(logits).all():
        raise ValueError("logit standardization: logits must be finite (top-k soft targets carry -inf; use fp16/fp32)")
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True) if logits.shape[1] > 1 else torch.zeros_like(mean)
    return (logits - mean) / (_LS_EPS + std)


def _prepare(student_logits: Tensor, teacher_logits: Tensor, *, standardize: bool) -> tuple[Tensor, Tensor]:
    teacher = teacher_logits.detach().to(student_logits.dtype)
    if standardize:
        return standardize_logits(student_logits), standardize_logits(teacher)
    return student_logits, teacher


def kd_soft_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float, standardize: bool = False) -> Tensor:
    """The soft term of Hinton KD, optionally on standardized logits; scalar.

        loss = T^2 * KL(softmax(f(t) / T) || softmax(f(s) / T)),  f = Z (standardize) or identity

    With `standardize`, this is Sun et al.'s (2024) KD + LS term.
    """
    if teacher_logits is None:
        raise ValueError("kd loss: teacher logits are required")
    check_logits(student_logits, teacher_logits, what="kd loss")
    check_temperature(temperature, what="kd loss")
    student, teacher = _prepare(student_logits, teacher_logits, standardize=standardize)
    return temperature**2 * soft_kl(student, teacher, temperature)


def _binary_log_probs(logits: Tensor, target_mask: Tensor, temperature: float) -> Tensor:
    """log [p_target, 1 - p_target] at temperature T, (N, 2), via logsumexp (no log of a subtracted probability)."""
    scaled = logits / temperature
    log_norm = torch.logsumexp(scaled, dim=1)
    log_target = scaled[target_mask] - log_norm
    log_rest = torch.logsumexp(scaled.masked_fill(target_mask, float("-inf")), dim=1) - log_norm
    return torch.stack([log_target, log_rest], dim=1)


def _non_target(logits: Tensor, target_mask: Tensor) -> Tensor:
    """The C - 1 non-target logits of each row, (N, C - 1): dropping the column, rather than
    masking it with a large negative number, makes the non-target softmax exact."""
    n, c = logits.shape
    return logits[~target_mask].view(n, c - 1)


def dkd_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    tckd_weight: float = DKD_TCKD_WEIGHT,
    nckd_weight: float = DKD_NCKD_WEIGHT,
    standardize: bool = False,
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022, Eq. 7); scalar.

        b = [p_y, 1 - p_y]                      binary target / rest probabilities at T
        p_hat = softmax(z_{not y} / T)          distribution among the non-target classes
        TCKD = KL(b^teacher || b^student)
        NCKD = KL(p_hat^teacher || p_hat^student)
        loss = T^2 * (tckd_weight * TCKD + nckd_weight * NCKD)    (paper: alpha, beta)

    Classical KD is TCKD + (1 - p_y^teacher) * NCKD (Eq. 5); DKD frees NCKD from that
    factor, which suppresses it exactly when the teacher is confident. Batch mean
    over rows; T^2 as in the authors' code. `standardize` applies Sun et al.'s (2024)
    Z-score to both sides first (DKD + LS). The DKD warm-up of the authors' training
    recipe (linear ramp of the weights over 20 epochs) is not part of the loss.
    """
    if teacher_logits is None:
        raise ValueError("dkd loss: teacher logits are required")
    check_logits(student_logits, teacher_logits, what="dkd loss")
    check_temperature(temperature, what="dkd loss")
    if student_logits.shape[1] < 2:
        raise ValueError("dkd loss: needs at least 2 classes")
    if tckd_weight < 0 or nckd_weight < 0:
        raise ValueError(f"dkd loss: weights must be >= 0, got tckd {tckd_weight!r}, nckd {nckd_weight!r}")
    student, teacher = _prepare(student_logits, teacher_logits, standardize=standardize)
    target_mask = F.one_hot(labels.long(), student.shape[1]).bool()
    loss = student.new_zeros(())
    if tckd_weight > 0:
        log_b_student = _binary_log_probs(student, target_mask, temperature)
        b_teacher = _binary_log_probs(teacher, target_mask, temperature).exp()
        loss = loss + tckd_weight * F.kl_div(log_b_student, b_teacher, reduction="batchmean")
    if nckd_weight > 0:
        student_rest, teacher_rest = _non_target(student, target_mask), _non_target(teacher, target_mask)
        # A row whose teacher keeps only the target class (top-k with k = 1) has no
        # non-target distribution; it contributes nothing rather than NaN.
        # Such a row gets the student's own (detached) distribution as its target: KL 0 and no gradient, so
        # the sum over rows / N equals the old mean over defined rows x their share, without a host sync.
        defined = torch.isfinite(teacher_rest).any(dim=1, keepdim=True)
        teacher_rest = torch.where(defined, teacher_rest, student_rest.detach())
        loss = loss + nckd_weight * soft_kl(student_rest, teacher_rest, temperature)
    return temperature**2 * loss


def mutual_learning_loss(student_logits: Tensor, peer_logits: list[Tensor], *, temperature: float = 1.0) -> Tensor:
    """Deep mutual learning's mimicry term (Zhang, Xiang, Hospedales, Lu, "Deep Mutual
    Learning", CVPR 2018, arXiv:1706.00384, Eq. 10); scalar.

        loss_k = T^2 / (K - 1) * sum_{l != k} KL(p_l^T || p_k^T)

    student_logits (N, C): student k; peer_logits: the K - 1 other students' logits on
    the same batch, each (N, C), detached (each student is its own optimisation problem;
    the paper's Algorithm 1 also treats the peers' predictions as fixed targets). The
    paper uses T = 1; T^2 keeps other temperatures on the same gradient scale.
    """
    if not peer_logits:
        raise ValueError("dml loss: needs at least one peer (two or more students with a dml term)")
    check_temperature(temperature, what="dml loss")
    total = student_logits.new_zeros(())
    for peer in peer_logits:
        check_logits(student_logits, peer, what="dml loss")
        total = total + soft_kl(student_logits, peer, temperature)
    return temperature**2 * total / len(peer_logits)
