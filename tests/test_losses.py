"""Hinton KD loss and fidelity metrics against an independent float64 reference and pinned values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import ConfigError, KDConfig, validate_config
from orchestrator.losses.hinton import cross_entropy, hinton_kd, kl_to_teacher, top1_agreement
from orchestrator.losses.objective import Objective, StepInputs
from orchestrator.losses.terms import CE, KD, SHORTHANDS, TEACHER_LOGITS, expand, loss_needs

INF = float("inf")

# Hand-typed inputs (not torch.randn) so the pinned numbers cannot move with a
# change of random generator.
STUDENT = [[2.0, -1.0, 0.5, 0.0], [0.3, 0.3, -2.0, 1.5], [-0.7, 2.2, 1.1, -1.3]]
TEACHER = [[3.0, -2.0, 1.0, 0.5], [-1.0, 0.5, -0.5, 2.5], [0.0, 4.0, -1.0, -3.0]]
LABELS = [0, 3, 2]


# ---- independent reference: plain Python floats (float64), explicit sums ----


def _log_softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - log_norm for x in scaled]


def ref_kl(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """mean over rows of sum_c p_t log(p_t / p_s); classes with p_t == 0 contribute 0."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        log_ps, log_pt = _log_softmax(s_row, temperature), _log_softmax(t_row, temperature)
        total += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps) if lt != -INF)
    return total / len(student)


def ref_ce(student: list[list[float]], labels: list[int]) -> float:
    return -sum(_log_softmax(row, 1.0)[y] for row, y in zip(student, labels)) / len(student)


def ref_kd(student, labels, teacher, temperature: float, alpha: float) -> float:
    return alpha * temperature**2 * ref_kl(student, teacher, temperature) + (1 - alpha) * ref_ce(student, labels)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _random(n: int = 16, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student, labels = torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)
    return student, labels, torch.randn(n, c, generator=g) * 3


# ---- hinton_kd ----


@pytest.mark.parametrize(
    ("temperature", "alpha", "pinned"),
    [(4.0, 0.9, 0.6766160726547241), (2.0, 0.5, 0.6153564453125), (1.0, 0.3, 0.5809269547462463)],
)
def test_hinton_kd_matches_reference_and_pinned_value(temperature, alpha, pinned):
    loss = hinton_kd(_t(STUDENT), torch.tensor(LABELS), _t(TEACHER), temperature=temperature, alpha=alpha)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(ref_kd(STUDENT, LABELS, TEACHER, temperature, alpha), rel=1e-5)
    assert loss.item() == pytest.approx(pinned, abs=1e-6)


def test_cross_entropy_matches_reference_and_ignores_teacher_args():
    s, y = _t(STUDENT), torch.tensor(LABELS)
    assert cross_entropy(s, y).item() == pytest.approx(ref_ce(STUDENT, LABELS), rel=1e-6)
    assert cross_entropy(s, y).item() == pytest.approx(0.760608971118927, abs=1e-6)
    assert torch.equal(cross_entropy(s, y, _t(TEACHER), temperature=7.0, alpha=0.9), cross_entropy(s, y))


@pytest.mark.parametrize("temperature", [1.0, 2.5, 8.0])
def test_soft_term_is_kl_div_batchmean_times_t_squared(temperature):
    s, y, t = _random()
    expected = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
    got = hinton_kd(s, y, t, temperature=temperature, alpha=1.0)
    assert torch.equal(got, 1.0 * temperature**2 * expected)  # alpha = 1: exactly the soft term
    half = hinton_kd(s, y, t, temperature=temperature, alpha=0.5)
    assert half.item() == pytest.approx(0.5 * got.item() + 0.5 * F.cross_entropy(s, y).item(), rel=1e-6)


def test_alpha_zero_is_exactly_cross_entropy():
    s, y, t = _random()
    assert torch.equal(hinton_kd(s, y, t, temperature=4.0, alpha=0.0), F.cross_entropy(s, y))


def test_temperature_one_is_plain_kl_plus_ce():
    s, y, t = _random(seed=1)
    kl = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    got = hinton_kd(s, y, t, temperature=1.0, alpha=0.7)
    assert got.item() == pytest.approx(0.7 * kl.item() + 0.3 * F.cross_entropy(s, y).item(), rel=1e-6)


def test_batch_of_one():
    s, y, t = _t(STUDENT[1:2]), torch.tensor(LABELS[1:2]), _t(TEACHER[1:2])
    got = hinton_kd(s, y, t, temperature=3.0, alpha=0.6)
    assert got.item() == pytest.approx(ref_kd(STUDENT[1:2], LABELS[1:2], TEACHER[1:2], 3.0, 0.6), rel=1e-5)


def test_equal_logits_give_zero_soft_term():
    s, y, _ = _random()
    assert hinton_kd(s, y, s.clone(), temperature=4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)
    mixed = hinton_kd(s, y, s.clone(), temperature=4.0, alpha=0.25)
    assert mixed.item() == pytest.approx(0.75 * F.cross_entropy(s, y).item(), rel=1e-5)


def test_minus_inf_teacher_logits_from_topk_give_finite_loss_and_gradients():
    teacher = [row[:] for row in TEACHER]
    teacher[0][1] = teacher[0][3] = teacher[2][3] = -INF  # classes a top-k encoding dropped
    s = _t(STUDENT).requires_grad_()
    loss = hinton_kd(s, torch.tensor(LABELS), _t(teacher), temperature=4.0, alpha=0.9)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref_kd(STUDENT, LABELS, teacher, 4.0, 0.9), rel=1e-5)
    assert loss.item() == pytest.approx(3.7720346450805664, abs=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # fp16 teacher logits, as stored by the soft-target cache, work the same way.
    half = hinton_kd(_t(STUDENT), torch.tensor(LABELS), _t(teacher).half(), temperature=4.0, alpha=0.9)
    assert half.item() == pytest.approx(loss.item(), rel=1e-3)


def test_gradients_reach_student_but_never_teacher():
    s, y, t = _random()
    s.requires_grad_()
    t.requires_grad_()
    hinton_kd(s, y, t, temperature=4.0, alpha=0.9).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_t_squared_keeps_soft_gradient_scale_independent_of_temperature():
    # Hinton et al. Sec. 2.1: for zero-mean logits and large T the soft-term gradient
    # is ~ (s - t) / (N C T^2); the T^2 factor cancels that.
    s, _, t = _random(n=64, seed=2)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    y = torch.zeros(64, dtype=torch.long)

    def grad_norm(temperature: float, *, undo_scaling: bool = False) -> float:
        x = s.clone().requires_grad_()
        loss = hinton_kd(x, y, t, temperature=temperature, alpha=1.0)
        (loss / temperature**2 if undo_scaling else loss).backward()
        return x.grad.norm().item()

    assert 0.8 < grad_norm(2.0) / grad_norm(8.0) < 1.25
    # Without the factor the gradient shrinks by ~(8/2)^2 = 16.
    assert grad_norm(2.0, undo_scaling=True) / grad_norm(8.0, undo_scaling=True) > 10


def test_hinton_kd_rejects_bad_inputs():
    s, y, t = _random()
    with pytest.raises(ValueError, match="teacher logits are required"):
        hinton_kd(s, y, None, temperature=4.0, alpha=0.5)
    with pytest.raises(ValueError, match="does not match"):
        hinton_kd(s, y, t[:, :5], temperature=4.0, alpha=0.5)
    with pytest.raises(ValueError, match="temperature"):
        hinton_kd(s, y, t, temperature=0.0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        hinton_kd(s, y, t, temperature=4.0, alpha=1.5)


# ---- registry ----


def test_the_kd_shorthand_is_hintons_loss_built_from_terms():
    assert sorted(SHORTHANDS) == ["ce", "dkd", "dkd_ls", "kd", "kd_ls"]
    assert expand("kd", 4.0, 0.9) == [KD(weight=0.9, temperature=4.0), CE(weight=1.0 - 0.9)] and expand("ce", None, None) == [CE()]
    assert TEACHER_LOGITS in loss_needs("kd") and TEACHER_LOGITS not in loss_needs("ce")
    s, t, y = _t(STUDENT), _t(TEACHER), torch.tensor(LABELS)
    for alpha in (0.0, 0.3, 0.9, 1.0):
        built = Objective("kd", KDConfig(temperature=4.0, alpha=alpha))(StepInputs(s, y, t))
        assert built.item() == pytest.approx(hinton_kd(s, y, t, temperature=4.0, alpha=alpha).item(), rel=1e-6)
    assert torch.equal(Objective("ce", KDConfig(temperature=4.0, alpha=0.9))(StepInputs(s, y, None)), cross_entropy(s, y))
    with pytest.raises(ValueError, match="needs the student's kd temperature and alpha"):
        expand("kd", None, 0.5)


def test_config_validation_uses_loss_registry():
    with pytest.raises(ConfigError, match="unknown loss 'nope'"):
        validate_config({"students": [{"loss": "nope"}]})
    assert validate_config({"students": [{"loss": "ce"}]}).students[0].loss == "ce"


# ---- fidelity metrics ----


def test_top1_agreement_on_hand_made_logits():
    student = _t([[1, 2, 0], [3, 0, 0], [0, 0, 1], [0, 5, 1]])
    teacher = _t([[0, 9, 0], [0, 1, 0], [0, 0, 2], [0, 1, -INF]])
    agreement = top1_agreement(student, teacher)
    assert agreement.dtype == torch.float32 and agreement.shape == ()
    assert agreement.item() == pytest.approx(0.75)
    assert top1_agreement(student, student).item() == 1.0


def test_kl_to_teacher_on_hand_made_logits():
    student = _t([[0.0, 0.0]])
    # p_t = (3/4, 1/4) against p_s = (1/2, 1/2)
    teacher = _t([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl_to_teacher(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # T = 2 halves the teacher logits: p_t = (sqrt3, 1) / (sqrt3 + 1); no T^2 factor.
    pt = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    expected_t2 = pt * math.log(2 * pt) + (1 - pt) * math.log(2 * (1 - pt))
    assert kl_to_teacher(student, teacher, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    # A -inf teacher class has probability 0: KL((1, 0) || (1/2, 1/2)) = ln 2.
    assert kl_to_teacher(student, _t([[0.0, -INF]])).item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert kl_to_teacher(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_to_teacher_matches_reference_and_pinned_value():
    s, t = _t(STUDENT), _t(TEACHER)
    assert kl_to_teacher(s, t).item() == pytest.approx(ref_kl(STUDENT, TEACHER, 1.0), rel=1e-6)
    assert kl_to_teacher(s, t).item() == pytest.approx(0.16166897118091583, abs=1e-6)
    assert kl_to_teacher(s, t, temperature=4.0).item() == pytest.approx(0.041705161333084106, abs=1e-6)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match"):
        top1_agreement(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="empty batch"):
        kl_to_teacher(torch.zeros(0, 4), torch.zeros(0, 4))
