"""Feature-, attention- and relation-based distillation losses (the teacher's internals, not only its logits).

References:
    A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints
    for Thin Deep Nets", ICLR 2015, arXiv:1412.6550.
    S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017,
    arXiv:1612.03928.
    W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019,
    arXiv:1904.05068.

Features are what forward hooks capture: (N, C, H, W) maps or (N, D) vectors. Teacher
features are detached inside every loss, so no gradient ever reaches a teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HintAdapter",
    "attention_map",
    "attention_transfer_loss",
    "fitnet_loss",
    "pairwise_distances",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
]

# Park et al. use lambda_D = 1, lambda_A = 2 for classification (Section 4.3 of the paper).
RKD_DISTANCE_WEIGHT = 1.0
RKD_ANGLE_WEIGHT = 2.0


def _check_batch(student: Tensor, teacher: Tensor, *, what: str) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: student batch {student.shape[0]} != teacher batch {teacher.shape[0]}")
    if student.shape[0] == 0:
        raise ValueError(f"{what}: empty batch")


class HintAdapter(nn.Module):
    """FitNets' regressor r: student guided-layer features -> the teacher hint's shape.

    Maps (4D student, 4D teacher): a 1x1 convolution C_s -> C_t (the paper uses a
    convolutional regressor to keep its parameter count small), then adaptive average
    pooling to the teacher's H x W when the sizes differ. Anything else: both sides
    flattened, one Linear D_s -> D_t. Trained with the student, discarded after it.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.spatial = len(student_shape) == 3 and len(teacher_shape) == 3  # shapes without the batch dim
        self.out_shape = tuple(teacher_shape)
        if self.spatial:
            self.proj: nn.Module = nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False)
        else:
            self.proj = nn.Linear(int(torch.tensor(student_shape).prod()), int(torch.tensor(teacher_shape).prod()))

    def forward(self, features: Tensor) -> Tensor:
        if not self.spatial:
            return self.proj(features.flatten(1))
        out = self.proj(features)
        if tuple(out.shape[-2:]) != self.out_shape[-2:]:
            out = F.adaptive_avg_pool2d(out, self.out_shape[-2:])
        return out


def fitnet_loss(adapted_student: Tensor, teacher_features: Tensor) -> Tensor:
    """FitNets hint loss (Romero et al. 2015, Eq. 3); scalar.

        loss = mean((r(v_guided) - u_hint)^2)

    adapted_student: r(student features), the HintAdapter's output; teacher_features:
    the hint layer's output, same number of elements per row. The paper's 1/2 * ||.||^2
    summed per example is replaced by the element mean (as in RepDistiller), so the
    weight does not have to change with the layer size. The paper trains the hint in a
    separate first stage; here it is one weighted term trained with the others.
    """
    _check_batch(adapted_student, teacher_features, what="fitnet loss")
    teacher = teacher_features.detach().to(adapted_student.dtype).reshape(adapted_student.shape[0], -1)
    student = adapted_student.reshape(adapted_student.shape[0], -1)
    if student.shape != teacher.shape:
        raise ValueError(f"fitnet loss: adapted student features {tuple(adapted_student.shape)} do not match the hint {tuple(teacher_features.shape)}")
    return F.mse_loss(student, teacher)


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of a feature map (Zagoruyko and Komodakis 2017, Eq. 2 with F_sum^p); (N, H*W).

        Q = vec(mean_c |A_c|^p),  returned L2-normalised per row

    features (N, C, H, W). The mean over channels (the authors' code) and the paper's
    sum differ by a factor that the normalisation removes.
    """
    if features.ndim != 4:
        raise ValueError(f"attention transfer: needs (N, C, H, W) feature maps, got shape {tuple(features.shape)}")
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_features: Tensor, teacher_features: Tensor, *, p: float = 2.0) -> Tensor:
    """Activation-based attention transfer for one layer pair (Zagoruyko and Komodakis 2017, Eq. 2); scalar.

        loss = mean_{n, j} (Q_s / ||Q_s||_2 - Q_t / ||Q_t||_2)^2

    As the authors' code (`at_loss`): the squared difference averaged over batch and
    positions; they weight the sum over layer pairs by beta / 2 = 500. When the two
    maps differ in size the larger one is average-pooled to the smaller (RepDistiller).
    """
    _check_batch(student_features, teacher_features, what="attention transfer")
    for features in (student_features, teacher_features):
        if features.ndim != 4:
            raise ValueError(f"attention transfer: needs (N, C, H, W) feature maps, got shape {tuple(features.shape)}")
    teacher = teacher_features.detach().to(student_features.dtype)
    s_side, t_side = student_features.shape[-2:], teacher.shape[-2:]
    if s_side != t_side:
        side = (min(s_side[0], t_side[0]), min(s_side[1], t_side[1]))
        student_features = F.adaptive_avg_pool2d(student_features, side)
        teacher = F.adaptive_avg_pool2d(teacher, side)
    return (attention_map(student_features, p) - attention_map(teacher, p)).pow(2).mean()


def pairwise_distances(embeddings: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between rows, (N, D) -> (N, N), zero diagonal.

    Squared distances are clamped before the square root (as in Park et al.'s code):
    sqrt has an infinite derivative at 0, so identical rows would give NaN gradients.
    """
    squared = embeddings.pow(2).sum(dim=1)
    d2 = (squared[:, None] + squared[None, :] - 2.0 * embeddings @ embeddings.t()).clamp(min=eps)
    off_diagonal = 1.0 - torch.eye(len(embeddings), dtype=embeddings.dtype, device=embeddings.device)
    return d2.sqrt() * off_diagonal


def _normalised_distances(embeddings: Tensor) -> Tensor:
    d = pairwise_distances(embeddings)
    positive = (d > 0).to(d.dtype)
    # mu = mean distance over pairs i != j. All rows identical: no scale to normalise by (mu = 1).
    # Masked sums instead of d[positive]: boolean indexing would wait on the GPU every step.
    count = positive.sum()
    mu = torch.where(count > 0, (d * positive).sum() / count.clamp(min=1), torch.ones_like(count))
    return d / mu


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance-wise loss (Park et al. 2019, Eq. 4-5); scalar.

        psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu,  mu = mean over pairs i != j of ||t_i - t_j||_2
        loss = mean over (i, j) of Huber(psi_D(s_i, s_j), psi_D(t_i, t_j))

    student (N, D_s), teacher (N, D_t) (flattened if not 2-D): the relation is free of
    the embedding width. A batch of one has no pairs: loss 0.
    """
    _check_batch(student, teacher, what="rkd distance")
    student, teacher = student.flatten(1), teacher.detach().to(student.dtype).flatten(1)
    if len(student) < 2:
        return student.sum() * 0.0
    return F.smooth_l1_loss(_normalised_distances(student), _normalised_distances(teacher))


def _angles(embeddings: Tensor) -> Tensor:
    # e[j, i] = (x_i - x_j) / ||x_i - x_j||; angles[j, i, k] = <e_ji, e_jk> = cos of the angle at x_j.
    e = F.normalize(embeddings[None, :, :] - embeddings[:, None, :], p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2)).flatten()


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle-wise loss (Park et al. 2019, Eq. 6-7); scalar.

        psi_A(t_i, t_j, t_k) = <(t_i - t_j) / ||t_i - t_j||, (t_k - t_j) / ||t_k - t_j||>
        loss = mean over all (i, j, k) of Huber(psi_A(s), psi_A(t))

    Degenerate triplets (a repeated index) have a zero edge vector and angle 0 on both
    sides, so they add nothing, as in the authors' code. A batch of one: loss 0.
    """
    _check_batch(student, teacher, what="rkd angle")
    student, teacher = student.flatten(1), teacher.detach().to(student.dtype).flatten(1)
    if len(student) < 2:
        return student.sum() * 0.0
    return F.smooth_l1_loss(_angles(student), _angles(teacher))


def rkd_loss(student: Tensor, teacher: Tensor, *, distance_weight: float = RKD_DISTANCE_WEIGHT, angle_weight: float = RKD_ANGLE_WEIGHT) -> Tensor:
    """distance_weight * rkd_distance_loss + angle_weight * rkd_angle_loss (Park et al.'s RKD-DA); scalar."""
    loss = student.new_zeros(())
    if distance_weight > 0:
        loss = loss + distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight > 0:
        loss = loss + angle_weight * rkd_angle_loss(student, teacher)
    return loss
