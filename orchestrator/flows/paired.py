"""Paired evidence for "did distillation help": a student against its label-only twin on the same test set.

Two models scored on the same N test images are paired observations. What matters is only the
discordant images: `b` the student gets right and the twin wrong, `c` the other way round. Under
"no difference" each discordant image is a fair coin, so the exact McNemar test is a two-sided
binomial test of b successes in b + c trials (McNemar 1947; the exact form avoids the chi-square
approximation's trouble with small b + c). On MNIST a difference of d errors with b + c = 150
discordant images has sd sqrt(150) ~ 12: the noise that makes one seed prove nothing.

Across seeds, each seed is its own stratum on the same test set; summing b and c over strata is
the Mantel-Haenszel form of McNemar for matched pairs, which `pooled_mcnemar` computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Paired:
    """Student vs twin on one test set: b = only the student right, c = only the twin right."""

    b: int
    c: int
    p_value: float

    @property
    def errors_saved(self) -> int:
        """Twin errors minus student errors (positive: distillation helped)."""
        return self.b - self.c


def mcnemar(student_correct: np.ndarray, twin_correct: np.ndarray) -> Paired:
    """Exact two-sided McNemar test from two boolean (N,) arrays of per-image correctness."""
    student_correct = np.asarray(student_correct, dtype=bool)
    twin_correct = np.asarray(twin_correct, dtype=bool)
    if student_correct.shape != twin_correct.shape or student_correct.ndim != 1:
        raise ValueError(f"need two (N,) arrays on the same images, got {student_correct.shape} and {twin_correct.shape}")
    b = int(np.sum(student_correct & ~twin_correct))
    c = int(np.sum(~student_correct & twin_correct))
    return Paired(b, c, exact_p(b, c))


def exact_p(b: int, c: int) -> float:
    """Two-sided exact binomial p-value of b vs c discordant pairs (1.0 when there are none)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    # Imported here: scipy.stats costs 0.6 s of every `distill` process's and sweep trial's start-up, and only a
    # finished job's summary needs it.
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def pooled_mcnemar(pairs: Iterable[Paired]) -> Paired:
    """One test over several seeds: discordant counts summed over the strata."""
    pairs = list(pairs)
    b, c = sum(p.b for p in pairs), sum(p.c for p in pairs)
    return Paired(b, c, exact_p(b, c))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd of nothing")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
