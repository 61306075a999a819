"""Per-student KD settings: the job's `kd` values where given, otherwise values that fit the student and the teacher.

One temperature and alpha for every student is wrong. At a high T the soft term is close to matching
all logits (Hinton et al. 2015, section 2.1), and a 16- or 30-unit net spends its capacity on the
nine wrong-class logits it cannot fit; Hinton et al.: "when the distilled net had 300 or more units
in each of its two hidden layers, all temperatures above 8 gave fairly similar results ... radically
lowering this to 30 units per layer caused temperatures in the range 2.5 to 4 to work significantly
better". And the right T depends on the teacher: a 99.6%-accurate MNIST teacher is almost one-hot at
T = 1 and needs T = 2-4 to say anything, while a 93% Fashion-MNIST teacher is already soft at T = 1.

So `auto_kd` sets, per student:
- T: the flattest temperature at which the teacher, on its cached training views, still gives its top
  class a mean probability of at least `top1` (from the table, by the student's parameter count):
  small students get targets they can fit, large ones the flat targets that carry the most.
- alpha: the weight of the soft term, from the same table.

Measured with a plain loop before shipping (one seed each; 3-seed results: README "Results: quality"):
MNIST 2x30 (24k params, 25 views, 20 epochs): labels only 318 test errors; T/alpha 1/0.5 306, 2/0.5
281, 4/0.5 279, 2/0.7 292, 4/0.9 299 (teacher mean top-1: 0.995 at T=1, 0.964 at T=2, 0.873 at T=3).
Fashion MLP16 (13k, no views, 30 epochs): labels only 1314; 1/0.5 1306, 1/0.8 1289, 2/0.5 1340 (teacher
mean top-1: 0.937 at T=1, 0.843 at T=2). Fashion CNN 8-16 (10k, 16 views, 20 epochs): labels only
1124; 1/0.5 1095, 1/0.8 1082, 2/0.5 1130, 2/0.8 1117. MNIST 2x800 (1.3M, 15 epochs): labels only 92;
4/0.7 69, 4/0.9 70, 8/0.9 65. Between alpha 0.5 and 0.8 the tiny students differ by less than one
seed's noise (about 12 errors on MNIST); 0.7 is the middle. A student whose loss is a list of terms with their own temperatures and weights
takes nothing from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orchestrator.config import JobConfig, KDConfig, StudentConfig

# (fewest parameters, teacher mean top-1 probability to keep at T, alpha): the last row the student reaches.
AUTO_KD_TABLE: Sequence[tuple[int, float, float]] = (
    (0, 0.9, 0.7),  # tiny: MNIST 2x30 (24k), Fashion MLP16 (13k), Fashion CNN 8-16 (10k)
    (100_000, 0.75, 0.8),
    (1_000_000, 0.5, 0.9),  # large: MNIST 2x800 (1.3M)
)
TEMPERATURES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 20.0)
DEFAULT_TEMPERATURE = 4.0  # when there are no teacher logits to look at (the stage has none)


def mean_top1(teacher_logits: torch.Tensor, temperature: float) -> float:
    """Mean over rows of the teacher's largest class probability at `temperature`; (N, K) logits, -inf allowed."""
    return float(torch.softmax(teacher_logits.float() / temperature, dim=1).amax(dim=1).mean())


def fitting_temperature(teacher_logits: torch.Tensor | None, top1: float) -> float:
    """The largest of TEMPERATURES at which the teacher's mean top-1 probability stays >= top1 (at least 1)."""
    if teacher_logits is None or len(teacher_logits) == 0:
        return DEFAULT_TEMPERATURE
    chosen = TEMPERATURES[0]
    for temperature in TEMPERATURES:
        if mean_top1(teacher_logits, temperature) < top1:
            break
        chosen = temperature
    return chosen


def auto_kd(params: int, teacher_logits: torch.Tensor | None = None) -> KDConfig:
    """(T, alpha) for a student of `params` parameters taught by a teacher with these (sampled) logits."""
    if params < 0:
        raise ValueError(f"a parameter count is >= 0, got {params}")
    _, top1, alpha = [row for row in AUTO_KD_TABLE if params >= row[0]][-1]
    return KDConfig(temperature=fitting_temperature(teacher_logits, top1), alpha=alpha)


def student_kd(cfg: JobConfig, student: StudentConfig, params: int, teacher_logits: torch.Tensor | None = None) -> KDConfig:
    """This student's T and alpha: the job's `kd` values where set, the rest from `auto_kd`; without labels
    (transfer.labels false) all the weight is on the teacher."""
    auto = auto_kd(params, teacher_logits)
    temperature = cfg.kd.temperature if cfg.kd.temperature is not None else auto.temperature
    alpha = cfg.kd.alpha if cfg.kd.alpha is not None else auto.alpha
    if not cfg.transfer.labels:
        alpha = 1.0
    return KDConfig(temperature=temperature, alpha=alpha)


def is_auto(cfg: JobConfig) -> dict[str, bool]:
    """Which of T and alpha were left to `auto_kd` (for the run's params and the console)."""
    return {"temperature": cfg.kd.temperature is None, "alpha": cfg.kd.alpha is None}
