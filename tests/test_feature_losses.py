"""FitNets, attention transfer and RKD against an independent numpy float64 reference and pinned values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.losses.feature import (
    HintAdapter,
    attention_map,
    attention_transfer_loss,
    fitnet_loss,
    pairwise_distances,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
)


def _wave(*shape: int, freq: float, scale: float = 1.0) -> torch.Tensor:
    """Deterministic inputs from a formula, so pinned numbers cannot move with a random generator."""
    n = int(np.prod(shape))
    return (torch.sin(torch.arange(n, dtype=torch.float64) * freq) * scale).float().view(*shape)


S_MAP, T_MAP, T_SMALL = _wave(4, 3, 4, 4, freq=0.37, scale=2.0), _wave(4, 5, 4, 4, freq=0.53), _wave(4, 5, 2, 2, freq=0.91, scale=3.0)
S_EMB, T_EMB = _wave(5, 3, freq=0.71), _wave(5, 6, freq=1.13, scale=2.0)


# ---- independent reference: numpy float64, explicit loops over pairs and triplets ----


def ref_attention(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    a = (np.abs(x) ** 2).mean(1).reshape(len(x), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def ref_at(s, t) -> float:
    return float(((ref_attention(s) - ref_attention(t)) ** 2).mean())


def _huber(x: float) -> float:
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def _ref_distances(e) -> np.ndarray:
    e = np.asarray(e, np.float64)
    n = len(e)
    d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
    return d / d[~np.eye(n, dtype=bool)].mean()


def ref_rkd_distance(s, t) -> float:
    return float(np.mean([_huber(a - b) for a, b in zip(_ref_distances(s).ravel(), _ref_distances(t).ravel())]))


def _ref_angles(e) -> list[float]:
    e = np.asarray(e, np.float64)
    out = []
    for j in range(len(e)):
        for i in range(len(e)):
            for k in range(len(e)):
                u, v = e[i] - e[j], e[k] - e[j]
                nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                out.append(0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv)))
    return out


def ref_rkd_angle(s, t) -> float:
    return float(np.mean([_huber(a - b) for a, b in zip(_ref_angles(s), _ref_angles(t))]))


# ---- FitNets ----


def test_fitnet_loss_is_elementwise_mse_and_adapter_shapes():
    adapted, hint = _wave(4, 6, freq=0.3), _wave(4, 6, freq=0.8, scale=2.0)
    expected = float(((np.asarray(adapted, np.float64) - np.asarray(hint, np.float64)) ** 2).mean())
    assert fitnet_loss(adapted, hint).item() == pytest.approx(expected, rel=1e-6)
    assert fitnet_loss(adapted, hint).item() == pytest.approx(2.593557596206665, abs=1e-6)
    assert fitnet_loss(hint, hint.clone()).item() == 0.0
    conv = HintAdapter((3, 4, 4), (5, 2, 2))
    assert isinstance(conv.proj, torch.nn.Conv2d) and conv.proj.kernel_size == (1, 1)
    assert conv(S_MAP).shape == (4, 5, 2, 2)
    linear = HintAdapter((32,), (5, 2, 2))  # an MLP student guided by a conv hint: flattened
    assert linear(torch.zeros(4, 32)).shape == (4, 20)
    assert fitnet_loss(linear(torch.zeros(4, 32)), T_SMALL).shape == ()
    with pytest.raises(ValueError, match="do not match the hint"):
        fitnet_loss(adapted, T_SMALL)


def test_fitnet_gradients_reach_student_and_adapter_never_teacher():
    adapter = HintAdapter((3, 4, 4), (5, 4, 4))
    student, teacher = S_MAP.clone().requires_grad_(), T_MAP.clone().requires_grad_()
    fitnet_loss(adapter(student), teacher).backward()
    assert student.grad.abs().sum() > 0 and adapter.proj.weight.grad.abs().sum() > 0
    assert teacher.grad is None


# ---- attention transfer ----


def test_attention_transfer_matches_reference_and_pinned_value():
    assert attention_transfer_loss(S_MAP, T_MAP).item() == pytest.approx(ref_at(S_MAP, T_MAP), rel=1e-5)
    assert attention_transfer_loss(S_MAP, T_MAP).item() == pytest.approx(0.01816524751484394, abs=1e-7)
    # Different spatial sizes: the larger map is average-pooled to the smaller one.
    pooled = torch.nn.functional.adaptive_avg_pool2d(S_MAP, 2)
    assert attention_transfer_loss(S_MAP, T_SMALL).item() == pytest.approx(ref_at(pooled, T_SMALL), rel=1e-5)
    # Channel count does not matter; equal maps give 0; a batch of one works.
    assert attention_transfer_loss(T_MAP, T_MAP.repeat(1, 2, 1, 1)).item() == pytest.approx(0.0, abs=1e-7)
    assert attention_transfer_loss(S_MAP[:1], T_MAP[:1]).item() == pytest.approx(ref_at(S_MAP[:1], T_MAP[:1]), rel=1e-5)
    assert torch.allclose(attention_map(S_MAP).norm(dim=1), torch.ones(4))


def test_attention_transfer_gradients_and_bad_input():
    s, t = S_MAP.clone().requires_grad_(), T_MAP.clone().requires_grad_()
    attention_transfer_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match=r"needs \(N, C, H, W\)"):
        attention_transfer_loss(S_EMB, T_EMB)
    with pytest.raises(ValueError, match="batch"):
        attention_transfer_loss(S_MAP, T_MAP[:2])


# ---- RKD ----


def test_rkd_matches_reference_and_pinned_values():
    assert rkd_distance_loss(S_EMB, T_EMB).item() == pytest.approx(ref_rkd_distance(S_EMB, T_EMB), rel=1e-5)
    assert rkd_angle_loss(S_EMB, T_EMB).item() == pytest.approx(ref_rkd_angle(S_EMB, T_EMB), rel=1e-5)
    assert rkd_distance_loss(S_EMB, T_EMB).item() == pytest.approx(0.26318779587745667, abs=1e-7)
    assert rkd_angle_loss(S_EMB, T_EMB).item() == pytest.approx(0.23426412045955658, abs=1e-7)
    combined = rkd_loss(S_EMB, T_EMB, distance_weight=1.0, angle_weight=2.0)
    assert combined.item() == pytest.approx(ref_rkd_distance(S_EMB, T_EMB) + 2 * ref_rkd_angle(S_EMB, T_EMB), rel=1e-5)
    # 4-D features are flattened per row.
    assert rkd_distance_loss(S_MAP, T_MAP).item() == pytest.approx(ref_rkd_distance(S_MAP.flatten(1), T_MAP.flatten(1)), rel=1e-5)


def test_rkd_is_invariant_to_scale_and_rotation_of_the_embedding():
    # Relations, not coordinates: a scaled, rotated copy of the teacher's embedding has loss 0.
    q, _ = torch.linalg.qr(_wave(6, 6, freq=0.29).double())
    copy = (3.0 * T_EMB.double() @ q).float()
    assert rkd_loss(copy, T_EMB).item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_edge_cases_batch_of_one_identical_rows_and_gradients():
    assert rkd_loss(S_EMB[:1], T_EMB[:1]).item() == 0.0
    same = torch.ones(4, 3)
    assert torch.isfinite(rkd_loss(same, T_EMB[:4]))
    s, t = same.clone().requires_grad_(), T_EMB[:4].clone().requires_grad_()
    rkd_loss(s, t).backward()
    assert torch.isfinite(s.grad).all() and t.grad is None  # identical rows: no NaN through sqrt(0)
    s = S_EMB.clone().requires_grad_()
    rkd_loss(s, T_EMB).backward()
    assert s.grad.abs().sum() > 0
    d = pairwise_distances(S_EMB)
    assert torch.equal(d.diagonal(), torch.zeros(5)) and torch.allclose(d, d.t())
