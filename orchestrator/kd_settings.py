"""Per-student KD settings: the job's `kd` values where given, otherwise values that fit the student.

One temperature and alpha for every student is wrong for small ones. At a high T the soft term is
close to matching all logits (Hinton et al. 2015, section 2.1), and a 16- or 30-unit net spends its
capacity on the nine wrong-class logits it cannot fit: measured here, a 2x30 MLP on MNIST trained
worse at T = 4-8, alpha = 0.9 than on labels alone, and better at T = 1-2, alpha = 0.5. Hinton et al.
report the same direction ("when the distilled net had 300 or more units in each of its two hidden
layers, all temperatures above 8 gave fairly similar results ... radically lowering this to 30
units per layer caused temperatures in the range 2.5 to 4 to work significantly better"). Large
students take a high T and most of the weight on the teacher.

`auto_kd` maps the student's parameter count to (T, alpha) by the table below, measured on this
project's benchmarks (README, results: quality). A student whose loss is a list of terms with their
own temperatures and weights takes nothing from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.config import JobConfig, KDConfig, StudentConfig

# (fewest parameters, temperature, alpha): the last row whose bound the student reaches applies.
AUTO_KD_TABLE: Sequence[tuple[int, float, float]] = (
    # tiny (MNIST 2x30: 24k, Fashion MLP16: 13k). Plain-loop check on MNIST 2x30, 25 views, 20 epochs, one
    # seed: labels only 318 errors; T/alpha 1/0.5 306, 2/0.5 281, 4/0.5 279, 2/0.7 292, 4/0.9 299.
    (0, 4.0, 0.5),
    (100_000, 4.0, 0.7),
    # large (MNIST 2x800: 1.3M). Same check, 15 epochs: labels only 92; 4/0.7 69, 4/0.9 70, 8/0.9 65; the
    # paper: "all temperatures above 8 gave fairly similar results" for 300+ units per layer.
    (1_000_000, 8.0, 0.9),
)


def auto_kd(params: int) -> KDConfig:
    """(T, alpha) for a student of `params` parameters."""
    if params < 0:
        raise ValueError(f"a parameter count is >= 0, got {params}")
    _, temperature, alpha = [row for row in AUTO_KD_TABLE if params >= row[0]][-1]
    return KDConfig(temperature=temperature, alpha=alpha)


def student_kd(cfg: JobConfig, student: StudentConfig, params: int) -> KDConfig:
    """This student's T and alpha: the job's `kd` values where set, the rest from `auto_kd`; without labels
    (transfer.labels false) all the weight is on the teacher."""
    auto = auto_kd(params)
    temperature = cfg.kd.temperature if cfg.kd.temperature is not None else auto.temperature
    alpha = cfg.kd.alpha if cfg.kd.alpha is not None else auto.alpha
    if not cfg.transfer.labels:
        alpha = 1.0
    return KDConfig(temperature=temperature, alpha=alpha)


def is_auto(cfg: JobConfig) -> dict[str, bool]:
    """Which of T and alpha were left to `auto_kd` (for the run's params and the console)."""
    return {"temperature": cfg.kd.temperature is None, "alpha": cfg.kd.alpha is None}
