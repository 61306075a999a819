"""Per-student KD settings (orchestrator/losses/kd_settings.py) and the per-step schedules (train_loop.lr_factor)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator.config import load_config
from orchestrator.losses.kd_settings import AUTO_KD_TABLE, auto_kd, fitting_temperature, mean_top1, student_kd
from orchestrator.losses.objective import apply_max_norm
from orchestrator.train.optim import lr_factor, steps_per_epoch

DIGITS = Path(__file__).resolve().parents[1] / "configs/digits_kd.yaml"


def _peaked(top_logit: float, rows: int = 4) -> torch.Tensor:
    """Logits whose top-1 probability at T is e^(a/T) / (e^(a/T) + 9), the same on every row."""
    logits = torch.zeros(rows, 10)
    logits[:, 0] = top_logit
    return logits


def test_temperature_is_the_flattest_that_keeps_the_teachers_top1():
    a = 9.0  # top-1 at T=2: e^4.5 / (e^4.5 + 9) = 0.9261; at T=3: e^3 / (e^3 + 9) = 0.6906
    assert mean_top1(_peaked(a), 2.0) == pytest.approx(math.exp(4.5) / (math.exp(4.5) + 9))
    assert fitting_temperature(_peaked(a), 0.9) == 2.0
    assert fitting_temperature(_peaked(a), 0.5) == 4.0  # e^2.25 / (e^2.25 + 9) = 0.5275; at T=6 0.3287
    assert fitting_temperature(_peaked(0.1), 0.9) == 1.0  # a teacher that is never that sure: no flatter than T=1
    assert fitting_temperature(None, 0.9) == 4.0


def test_auto_kd_follows_the_table():
    a = 9.0
    tiny, large = auto_kd(12_730, _peaked(a)), auto_kd(1_276_810, _peaked(a))  # Fashion MLP16, MNIST 2x800
    assert (tiny.temperature, tiny.alpha) == (2.0, 0.7) and (large.temperature, large.alpha) == (4.0, 0.9)
    assert auto_kd(250_000).alpha == 0.8
    assert [row[0] for row in AUTO_KD_TABLE] == sorted(row[0] for row in AUTO_KD_TABLE)
    with pytest.raises(ValueError):
        auto_kd(-1)


def test_job_values_win_and_unset_ones_are_fitted():
    cfg = load_config(DIGITS, ["kd.temperature=null", "kd.alpha=0.2"])
    kd = student_kd(cfg, cfg.students[0], params=2_000)
    assert (kd.temperature, kd.alpha) == (4.0, 0.2)
    cfg = load_config(DIGITS, ["kd.temperature=3", "kd.alpha=null"])
    kd = student_kd(cfg, cfg.students[0], params=2_000_000, teacher_logits=_peaked(9.0))
    assert (kd.temperature, kd.alpha) == (3.0, 0.9)


def test_lr_schedules():
    assert lr_factor("constant", 50, 100) == 1.0
    assert lr_factor("cosine", 0, 100) == 1.0 and lr_factor("cosine", 50, 100) == pytest.approx(0.5) and lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert lr_factor("onecycle", 0, 100) == pytest.approx(0.04)
    assert lr_factor("onecycle", 15, 100) == pytest.approx(1.0)
    assert lr_factor("onecycle", 100, 100) == pytest.approx(0.0, abs=1e-12)
    warm = [lr_factor("onecycle", s, 100) for s in range(16)]
    assert warm == sorted(warm)  # rising to the peak, then falling
    decay = [lr_factor("onecycle", s, 100) for s in range(15, 101)]
    assert decay == sorted(decay, reverse=True)
    assert lr_factor("onecycle", 130, 100) == lr_factor("onecycle", 100, 100)  # past the end: clamped, not an error


def test_steps_per_epoch():
    assert steps_per_epoch(1000, 1, 128) == 8
    assert steps_per_epoch(1000, 2, 128) == 4  # 500 rows each
    assert steps_per_epoch(1, 4, 128) == 1


def test_max_norm_caps_rows_of_linear_weights_only():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(10.0)
        model[2].weight.fill_(0.01)
    apply_max_norm(model, 2.0)
    assert torch.allclose(model[0].weight.norm(dim=1), torch.full((3,), 2.0))
    assert torch.allclose(model[2].weight, torch.full((2, 3), 0.01))  # already inside the ball: untouched


def test_students_of_one_architecture_share_one_twin():
    from types import SimpleNamespace

    from orchestrator.flows.stages import student_members

    cfg = load_config(DIGITS, ["students=[{name: a, family: mlp, hidden: [8]}, {name: b, family: mlp, hidden: [8], loss: dkd},"
                               " {name: c, family: mlp, hidden: [4]}]"])
    data = SimpleNamespace(input_shape=(1, 8, 8), num_classes=10)
    members = student_members(cfg, {}, data, None)
    assert [(m.name, m.role, m.twin) for m in members] == [
        ("a", "student", "a-baseline"), ("a-baseline", "baseline", None), ("b", "student", "a-baseline"),
        ("c", "student", "c-baseline"), ("c-baseline", "baseline", None)]
