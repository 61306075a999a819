"""Scoring finished students on the test set: each against its label-only twin, and the transfer-set bias fix.

`pair_with_twin` adds to a student's row what distillation did: the twin's errors, the errors saved
(positive: the student made fewer), the discordant counts and the exact McNemar p-value (paired.py).
`verdicts` turns the rows into the one-line warnings a user must not miss: a student that lost to its
twin, and a teacher that is no better than the twin (nothing to distil).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from orchestrator.flows.paired import mcnemar
from orchestrator.train.evaluate import predict_logits

SIGNIFICANT = 0.05
# Candidate shifts for an excluded class's output bias (Hinton et al. raised the 3's bias by 3.5).
BIAS_SHIFTS = np.arange(0.0, 10.01, 0.25)


def pair_with_twin(row: dict, twin: str | None, correct: Mapping[str, np.ndarray], errors: Mapping[str, int]) -> dict:
    """A student's row with its twin's errors and the paired test added (unchanged when it has no twin)."""
    if row["role"] != "student" or twin not in correct:
        return row
    paired = mcnemar(correct[row["name"]], correct[twin])
    return row | {
        "twin": twin, "twin_errors": errors[twin], "errors_saved": paired.errors_saved, "discordant_student_only": paired.b,
        "discordant_twin_only": paired.c, "mcnemar_p": round(paired.p_value, 6),
    }


def verdicts(rows: Sequence[Mapping]) -> list[str]:
    """One line per student that lost to its twin, and per teacher no better than a twin."""
    lines = []
    teachers = [r for r in rows if r["role"] == "teacher"]
    for row in rows:
        if "errors_saved" not in row:
            continue
        if row["errors_saved"] < 0:
            sig = "significant" if row["mcnemar_p"] < SIGNIFICANT else "not significant"
            lines.append(f"warning: {row['name']} lost to its label-only twin by {-row['errors_saved']} test errors "
                         f"(McNemar p={row['mcnemar_p']:.3g}, {sig}); try a lower kd.temperature or alpha, or a stronger teacher")
        for teacher in teachers:
            if teacher["test_errors"] >= row["twin_errors"]:
                lines.append(f"warning: teacher {teacher['name']} ({teacher['test_errors']} test errors) is no better than "
                             f"{row['name']}'s label-only twin ({row['twin_errors']}): it has nothing to teach; train it longer or bigger")
    return lines


def output_layer(model: nn.Module) -> nn.Linear:
    """The last Linear layer: the one whose bias gives each class's prior."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no Linear output layer whose bias could be corrected")
    return linears[-1]


def choose_bias_shift(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> float:
    """The shift added to the logits of `classes` that maximises accuracy on (logits, labels); the smallest on ties."""
    best, best_correct = 0.0, -1
    index = torch.as_tensor(list(classes), dtype=torch.int64)
    for shift in BIAS_SHIFTS:
        shifted = logits.clone()
        shifted[:, index] += float(shift)
        correct = int((shifted.argmax(1) == labels).sum())
        if correct > best_correct:
            best, best_correct = float(shift), correct
    return best


@torch.no_grad()
def correct_bias(model: nn.Module, val_images: np.ndarray, val_labels: np.ndarray, classes: Sequence[int], *, mean, std) -> float:
    """Raise the output bias of `classes` (left out of the transfer set) by the validation-best shift; returns it."""
    logits = predict_logits(model, val_images, mean=mean, std=std)
    shift = choose_bias_shift(logits, torch.from_numpy(val_labels), classes)
    layer = output_layer(model)
    layer.bias[torch.as_tensor(list(classes), dtype=torch.int64, device=layer.bias.device)] += shift
    return shift


def class_errors(predictions: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> int:
    """Errors on the test examples whose true class is in `classes`."""
    mask = torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))
    return int((predictions[mask] != labels[mask]).sum())
