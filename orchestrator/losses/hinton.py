"""Hinton KD in its reference form, and the teacher-fidelity metrics.

Reference: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural
Network", NIPS 2014 Deep Learning Workshop, arXiv:1503.02531 (2015).

Shapes: N = batch size, C = number of classes.
    student_logits: (N, C) float, requires grad during training
    teacher_logits: (N, C) float (any float dtype; fp16 from the soft-target cache
                    is fine). Entries may be -inf for classes a top-k encoding dropped.
    labels:         (N,) int64 class indices

The trainer builds `loss: kd` from terms (terms.SHORTHANDS: kd at alpha, ce at 1 - alpha), which
tests/test_losses.py holds equal to `hinton_kd` here, the paper's formula in one function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from orchestrator.losses.checks import check_alpha as _check_alpha
from orchestrator.losses.checks import check_logits as _check_logits
from orchestrator.losses.checks import check_temperature as _check_temperature
from orchestrator.losses.checks import soft_kl as _soft_kl

__all__ = [
    "cross_entropy",
    "hinton_kd",
    "kl_to_teacher",
    "top1_agreement",
]


def cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> Tensor:
    """Plain cross-entropy on hard labels (the "ce" baseline); scalar.

    student_logits (N, C), labels (N,). teacher_logits, temperature and alpha are
    accepted and ignored so every loss shares one call signature.
    """
    return F.cross_entropy(student_logits, labels)


def hinton_kd(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    alpha: float,
) -> Tensor:
    """Hinton et al. (2015) knowledge distillation loss; scalar.

        loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(labels, s)

    Convention: `alpha` is the weight of the soft (teacher) term. alpha = 0 is pure
    cross-entropy on the labels, alpha = 1 is the pure soft term (labels unused).

    The T^2 factor is from Section 2 of the paper: the soft term's gradients scale
    as 1/T^2, so multiplying by T^2 keeps the relative contribution of hard and soft
    targets roughly unchanged when the temperature is tuned.

    student_logits (N, C), labels (N,), teacher_logits (N, C), possibly containing
    -inf for classes dropped by a top-k soft-target encoding (each row needs at
    least one finite entry). The teacher is detached. The KL is averaged over the
    batch ("batchmean").
    """
    if teacher_logits is None:
        raise ValueError("kd loss: teacher logits are required")
    _check_logits(student_logits, teacher_logits, what="kd loss")
    _check_temperature(temperature, what="kd loss")
    _check_alpha(alpha, what="kd loss")

    # Skip a term whose weight is 0, so alpha = 0 / 1 give the other term exactly
    # (0 * x is not x-free when x is inf or NaN, and it saves a softmax).
    loss = student_logits.new_zeros(())
    if alpha > 0.0:
        loss = loss + alpha * temperature**2 * _soft_kl(student_logits, teacher_logits, temperature)
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits, labels)
    return loss


@torch.no_grad()
def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Fraction of rows where the student's and teacher's argmax agree; float scalar in [0, 1].

    student_logits (N, C), teacher_logits (N, C). A fidelity metric (how well the
    student imitates the teacher), distinct from accuracy on the labels.
    """
    _check_logits(student_logits, teacher_logits, what="top1_agreement")
    same = student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)
    return same.float().mean()


@torch.no_grad()
def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Mean over the batch of KL(p_teacher^T || p_student^T); float scalar >= 0.

    student_logits (N, C), teacher_logits (N, C), -inf teacher entries allowed.
    No T^2 factor: this is a metric, and at T = 1 it is the plain KL in nats.
    """
    _check_logits(student_logits, teacher_logits, what="kl_to_teacher")
    _check_temperature(temperature, what="kl_to_teacher")
    # float64 so tiny divergences between near-identical models are not rounded away.
    return _soft_kl(student_logits.double(), teacher_logits, temperature).float()
