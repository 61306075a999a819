"""DKD, logit standardization and DML against an independent numpy float64 reference and pinned values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import KDConfig
from orchestrator.losses.hinton import hinton_kd
from orchestrator.losses.logit import dkd_loss, kd_soft_loss, mutual_learning_loss, standardize_logits
from orchestrator.losses.objective import Objective, StepInputs
from orchestrator.losses.terms import LABELS as READS_LABELS
from orchestrator.losses.terms import TEACHER_LOGITS, loss_needs


def shorthand(name: str, s, y, t, *, temperature: float, alpha: float):
    """A string loss as the trainer computes it: its terms (terms.SHORTHANDS) summed by an Objective."""
    return Objective(name, KDConfig(temperature=temperature, alpha=alpha))(StepInputs(s, y, t))

INF = float("inf")
STUDENT = [[2.0, -1.0, 0.5, 0.0], [0.3, 0.3, -2.0, 1.5], [-0.7, 2.2, 1.1, -1.3]]
TEACHER = [[3.0, -2.0, 1.0, 0.5], [-1.0, 0.5, -0.5, 2.5], [0.0, 4.0, -1.0, -3.0]]
LABELS = [0, 3, 2]


# ---- independent reference: numpy float64, one row at a time, the papers' definitions ----


def _softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _zscore(row) -> np.ndarray:
    row = np.asarray(row, dtype=np.float64)
    return (row - row.mean()) / (1e-7 + row.std(ddof=1))


def _kl(p, q) -> float:
    return float(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def ref_dkd(student, labels, teacher, temperature, tckd, nckd, standardize=False) -> float:
    total = 0.0
    for s, y, t in zip(student, labels, teacher):
        s, t = (_zscore(s), _zscore(t)) if standardize else (np.asarray(s, float), np.asarray(t, float))
        ps, pt = _softmax(s / temperature), _softmax(t / temperature)
        rest = [c for c in range(len(s)) if c != y]
        total += tckd * _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        total += nckd * _kl(_softmax(t[rest] / temperature), _softmax(s[rest] / temperature))
    return temperature**2 * total / len(student)


def ref_kd_soft(student, teacher, temperature, standardize=False) -> float:
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = (_zscore(s), _zscore(t)) if standardize else (np.asarray(s, float), np.asarray(t, float))
        total += _kl(_softmax(t / temperature), _softmax(s / temperature))
    return temperature**2 * total / len(student)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _y(labels=LABELS) -> torch.Tensor:
    return torch.tensor(labels)


def _random(n: int = 16, c: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g), torch.randn(n, c, generator=g) * 3


# ---- DKD ----


@pytest.mark.parametrize(
    ("temperature", "tckd", "nckd", "standardize", "pinned"),
    [
        (4.0, 1.0, 8.0, False, 4.320903301239014),
        (1.0, 1.0, 8.0, False, 1.3559619188308716),
        (2.0, 0.5, 2.0, True, 0.22029060125350952),
        (4.0, 1.0, 8.0, True, 0.9096764326095581),
    ],
)
def test_dkd_matches_reference_and_pinned_value(temperature, tckd, nckd, standardize, pinned):
    loss = dkd_loss(_t(STUDENT), _y(), _t(TEACHER), temperature=temperature, tckd_weight=tckd, nckd_weight=nckd, standardize=standardize)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(ref_dkd(STUDENT, LABELS, TEACHER, temperature, tckd, nckd, standardize), rel=2e-5)
    assert loss.item() == pytest.approx(pinned, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dkd_reduces_to_kd_with_the_coupling_weight(temperature):
    # Zhao et al. Eq. 5: KD = TCKD + (1 - p_y^teacher) NCKD, row by row (a batch of one each).
    for s, y, t in zip(STUDENT, LABELS, TEACHER):
        p_target = _softmax(np.asarray(t) / temperature)[y]
        dkd = dkd_loss(_t([s]), _y([y]), _t([t]), temperature=temperature, tckd_weight=1.0, nckd_weight=float(1 - p_target))
        kd = hinton_kd(_t([s]), _y([y]), _t([t]), temperature=temperature, alpha=1.0)
        assert dkd.item() == pytest.approx(kd.item(), rel=1e-5)


def test_dkd_weights_zero_and_equal_logits():
    s, y, t = _random()
    assert dkd_loss(s, y, t, temperature=4.0, tckd_weight=0.0, nckd_weight=0.0).item() == 0.0
    tckd = dkd_loss(s, y, t, temperature=4.0, tckd_weight=1.0, nckd_weight=0.0)
    nckd = dkd_loss(s, y, t, temperature=4.0, tckd_weight=0.0, nckd_weight=1.0)
    both = dkd_loss(s, y, t, temperature=4.0, tckd_weight=2.0, nckd_weight=3.0)
    assert both.item() == pytest.approx(2 * tckd.item() + 3 * nckd.item(), rel=1e-6)
    assert dkd_loss(s, y, s.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-5)  # float32 rounding x T^2
    flat = torch.zeros(3, 4)
    assert dkd_loss(flat, _y(), flat, temperature=2.0, standardize=True).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_shorthand_alpha_convention():
    s, y, t = _random(seed=3)
    assert torch.equal(shorthand("dkd", s, y, t, temperature=4.0, alpha=0.0), F.cross_entropy(s, y))
    assert torch.equal(shorthand("dkd", s, y, t, temperature=4.0, alpha=1.0), dkd_loss(s, y, t, temperature=4.0))
    mixed = shorthand("dkd", s, y, t, temperature=4.0, alpha=0.3)
    expected = 0.3 * dkd_loss(s, y, t, temperature=4.0).item() + 0.7 * F.cross_entropy(s, y).item()
    assert mixed.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(shorthand("dkd_ls", s, y, t, temperature=2.0, alpha=1.0), dkd_loss(s, y, t, temperature=2.0, standardize=True))


def test_dkd_batch_of_one_and_two_classes():
    got = dkd_loss(_t(STUDENT[2:]), _y(LABELS[2:]), _t(TEACHER[2:]), temperature=2.0)
    assert got.item() == pytest.approx(ref_dkd(STUDENT[2:], LABELS[2:], TEACHER[2:], 2.0, 1.0, 8.0), rel=1e-5)
    # Two classes: the non-target distribution is one class, so NCKD is 0 and DKD is the binary KL.
    s, t = _t([[1.0, -1.0]]), _t([[0.0, 2.0]])
    assert dkd_loss(s, _y([0]), t, temperature=1.0, tckd_weight=0.0).item() == pytest.approx(0.0, abs=1e-7)
    assert dkd_loss(s, _y([0]), t, temperature=1.0, nckd_weight=0.0).item() == pytest.approx(hinton_kd(s, _y([0]), t, temperature=1.0, alpha=1.0).item(), rel=1e-6)


def test_dkd_with_topk_minus_inf_teacher_is_finite():
    teacher = [row[:] for row in TEACHER]
    teacher[0][1] = teacher[0][3] = teacher[2][3] = -INF
    s = _t(STUDENT).requires_grad_()
    loss = dkd_loss(s, _y(), _t(teacher), temperature=4.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # top-1 keeping only the label: no non-target distribution, only TCKD remains.
    only_target = _t([[2.0, -INF, -INF]])
    got = dkd_loss(_t([[1.0, 0.0, 0.5]]), _y([0]), only_target, temperature=1.0)
    assert torch.isfinite(got)


@pytest.mark.parametrize("loss_fn", [dkd_loss, lambda s, y, t, **kw: shorthand("dkd", s, y, t, alpha=0.5, **kw),
                                     lambda s, y, t, **kw: shorthand("kd_ls", s, y, t, alpha=0.5, **kw)])
def test_gradients_reach_student_but_never_teacher(loss_fn):
    s, y, t = _random()
    s.requires_grad_()
    t.requires_grad_()
    loss_fn(s, y, t, temperature=4.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_dkd_rejects_bad_inputs():
    s, y, t = _random()
    with pytest.raises(ValueError, match="teacher logits are required"):
        dkd_loss(s, y, None, temperature=4.0)
    with pytest.raises(ValueError, match="does not match"):
        dkd_loss(s, y, t[:, :5], temperature=4.0)
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(s, y, t, temperature=0.0)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        dkd_loss(s, y, t, temperature=1.0, nckd_weight=-1.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        shorthand("dkd", s, y, t, temperature=1.0, alpha=-0.1)


# ---- logit standardization ----


@pytest.mark.parametrize(("temperature", "pinned"), [(1.0, 0.07376756519079208), (2.0, 0.10568159818649292), (4.0, 0.1206355094909668)])
def test_kd_ls_matches_reference_and_pinned_value(temperature, pinned):
    loss = kd_soft_loss(_t(STUDENT), _t(TEACHER), temperature=temperature, standardize=True)
    assert loss.item() == pytest.approx(ref_kd_soft(STUDENT, TEACHER, temperature, standardize=True), rel=2e-5)
    assert loss.item() == pytest.approx(pinned, abs=1e-6)


def test_standardize_logits_rows_are_zero_mean_unit_std_and_equal_logits_stay_finite():
    s, _, _ = _random()
    z = standardize_logits(s)
    assert torch.allclose(z.mean(1), torch.zeros(16), atol=1e-6)
    assert torch.allclose(z.std(1), torch.ones(16), atol=1e-5)
    flat = standardize_logits(torch.full((2, 5), 3.0))
    assert torch.equal(flat, torch.zeros(2, 5))  # equal logits: uniform softmax, not NaN
    assert torch.equal(standardize_logits(torch.ones(1, 1)), torch.zeros(1, 1))  # one class
    with pytest.raises(ValueError, match="finite"):
        standardize_logits(_t([[0.0, -INF]]))


def test_ls_is_invariant_to_shift_and_scale_of_either_side():
    # The point of Sun et al.: the student need not match the teacher's logit range.
    s, y, t = _random(seed=5)
    base = kd_soft_loss(s, t, temperature=2.0, standardize=True)
    assert kd_soft_loss(3.0 * s - 1.0, 0.5 * t + 7.0, temperature=2.0, standardize=True).item() == pytest.approx(base.item(), rel=1e-4)
    assert kd_soft_loss(s, 3.0 * s + 2.0, temperature=2.0, standardize=True).item() == pytest.approx(0.0, abs=1e-5)
    # ...which plain KD is not.
    assert kd_soft_loss(s, 3.0 * s, temperature=2.0).item() > 0.1


def test_kd_ls_shorthand_alpha_zero_one_and_without_standardize_equals_kd():
    s, y, t = _random(seed=2)
    assert torch.equal(shorthand("kd_ls", s, y, t, temperature=4.0, alpha=0.0), F.cross_entropy(s, y))
    assert torch.equal(shorthand("kd_ls", s, y, t, temperature=4.0, alpha=1.0), kd_soft_loss(s, t, temperature=4.0, standardize=True))
    assert kd_soft_loss(s, t, temperature=4.0).item() == pytest.approx(hinton_kd(s, y, t, temperature=4.0, alpha=1.0).item(), rel=1e-6)
    one = kd_soft_loss(_t(STUDENT[:1]), _t(TEACHER[:1]), temperature=1.0, standardize=True)
    assert one.item() == pytest.approx(ref_kd_soft(STUDENT[:1], TEACHER[:1], 1.0, standardize=True), rel=2e-5)


# ---- DML ----


def test_mutual_learning_loss_is_mean_kl_to_detached_peers():
    s, _, t = _random(seed=4)
    peer_b, peer_c = t, t.flip(0)
    got = mutual_learning_loss(s, [peer_b, peer_c], temperature=1.0)
    expected = (ref_kd_soft(s.tolist(), peer_b.tolist(), 1.0) + ref_kd_soft(s.tolist(), peer_c.tolist(), 1.0)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert mutual_learning_loss(_t(STUDENT), [_t(TEACHER)]).item() == pytest.approx(0.16166894137859344, abs=1e-6)
    assert mutual_learning_loss(s, [s.clone()]).item() == pytest.approx(0.0, abs=1e-6)
    x, peer = s.clone().requires_grad_(), t.clone().requires_grad_()
    mutual_learning_loss(x, [peer], temperature=2.0).backward()
    assert x.grad.abs().sum() > 0 and peer.grad is None
    with pytest.raises(ValueError, match="at least one peer"):
        mutual_learning_loss(s, [])


# ---- registry ----


def test_string_losses_read_the_teacher_and_dkd_the_labels():
    for name in ("dkd", "kd_ls", "dkd_ls"):
        assert TEACHER_LOGITS in loss_needs(name)
    # Without labels a shorthand keeps only its soft term (alpha 1): kd then reads no label, dkd still does.
    assert READS_LABELS in loss_needs("dkd") and READS_LABELS in loss_needs("dkd_ls") and READS_LABELS not in loss_needs("kd_ls")
