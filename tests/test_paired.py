"""Paired evidence (orchestrator/flows/paired.py, scoring.py): McNemar against pinned values, the verdict lines, the bias fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.flows.paired import Paired, exact_p, mcnemar, mean_sd, pooled_mcnemar
from orchestrator.flows.scoring import choose_bias_shift, class_errors, output_layer, pair_with_twin, verdicts


def test_exact_mcnemar_pinned():
    # Two-sided exact binomial: 2 * P(X <= 2 | n = 12, p = 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert exact_p(10, 2) == pytest.approx(158 / 4096)
    assert exact_p(2, 10) == pytest.approx(158 / 4096)
    assert exact_p(5, 5) == pytest.approx(1.0)
    assert exact_p(0, 0) == 1.0
    with pytest.raises(ValueError):
        exact_p(-1, 3)


def test_mcnemar_counts_only_discordant_images():
    student = np.array([1, 1, 1, 0, 0, 1, 1, 0], dtype=bool)
    twin = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    paired = mcnemar(student, twin)
    assert (paired.b, paired.c, paired.errors_saved) == (3, 1, 2)
    assert paired.p_value == pytest.approx(exact_p(3, 1))
    with pytest.raises(ValueError):
        mcnemar(student, twin[:4])


def test_pooled_sums_strata():
    pooled = pooled_mcnemar([Paired(10, 2, exact_p(10, 2)), Paired(8, 4, exact_p(8, 4))])
    assert (pooled.b, pooled.c) == (18, 6) and pooled.p_value == pytest.approx(exact_p(18, 6))
    assert pooled.p_value < min(exact_p(8, 4), 0.05)


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5]) == (5.0, 0.0)


def _row(role, name, errors):
    return {"role": role, "name": name, "test_errors": errors}


def test_pair_with_twin_and_verdicts():
    correct = {"s": np.array([1, 1, 0, 1], dtype=bool), "s-baseline": np.array([1, 0, 1, 0], dtype=bool)}
    rows = [_row("teacher", "t", 3), pair_with_twin(_row("student", "s", 1), "s-baseline", correct, {"s": 1, "s-baseline": 2}), _row("baseline", "s-baseline", 2)]
    assert rows[1]["errors_saved"] == 1 and rows[1]["twin_errors"] == 2 and rows[1]["discordant_student_only"] == 2
    lines = verdicts(rows)
    # The student won, but the teacher (3 errors) is worse than the twin (2): one warning, about the teacher.
    assert len(lines) == 1 and "teacher t" in lines[0] and "nothing to teach" in lines[0]
    rows[1] = rows[1] | {"errors_saved": -4, "mcnemar_p": 0.01}
    assert any("lost to its label-only twin by 4" in line and "significant" in line for line in verdicts(rows))
    assert pair_with_twin(_row("student", "lonely", 1), None, correct, {}) == _row("student", "lonely", 1)


def test_bias_shift_recovers_a_suppressed_class():
    labels = torch.tensor([0, 1, 2, 2, 2, 1])
    logits = torch.nn.functional.one_hot(labels, 3).float() * 2.0
    logits[:, 2] -= 3.0  # class 2 pushed down, as a class left out of the transfer set is
    assert class_errors(logits.argmax(1), labels, [2]) == 3
    shift = choose_bias_shift(logits, labels, [2])
    assert 1.0 < shift <= 3.0
    shifted = logits.clone()
    shifted[:, 2] += shift
    assert class_errors(shifted.argmax(1), labels, [2]) == 0 and int((shifted.argmax(1) != labels).sum()) == 0


def test_output_layer_is_the_last_linear():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert output_layer(model) is model[2]
    with pytest.raises(ValueError):
        output_layer(nn.Sequential(nn.ReLU()))
