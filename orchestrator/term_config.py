"""Composable student losses: `students[].loss` as a weighted list of terms (validation only; no torch here).

    loss: kd                                   # string form: a name from losses.LOSSES, mixed with CE by kd.alpha
    loss:                                      # list form: the sum of weight * term
      - {name: ce, weight: 0.1}
      - {name: kd, weight: 0.9, temperature: 4}
      - {name: fitnet, weight: 1.0, layers: {features.relu1: features.relu2}}

Terms (what each computes is in `orchestrator.objectives`):
    ce      cross-entropy on the labels
    kd      T^2 KL(teacher || student) at T (Hinton); `standardize` = logit standardization (Sun 2024)
    dkd     decoupled KD (Zhao 2022): tckd_weight * TCKD + nckd_weight * NCKD; `standardize` as kd
    fitnet  FitNets hints (Romero 2015) through a learned adapter; layers {student_module: teacher_module}
    at      attention transfer (Zagoruyko 2017); layers as fitnet, (N, C, H, W) maps on both sides
    rkd     relational KD (Park 2019), distance_weight * RKD-D + angle_weight * RKD-A; on the logits,
            or on one layer pair given in layers
    dml     deep mutual learning (Zhang 2018): mean KL from the other students with a dml term
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Parameters each term accepts beyond name and weight; giving another is an error, not ignored.
TERM_PARAMS: dict[str, frozenset[str]] = {
    "ce": frozenset(),
    "kd": frozenset({"temperature", "standardize"}),
    "dkd": frozenset({"temperature", "standardize", "tckd_weight", "nckd_weight", "warmup_epochs"}),
    "fitnet": frozenset({"layers"}),
    "at": frozenset({"layers", "p"}),
    "rkd": frozenset({"layers", "distance_weight", "angle_weight"}),
    "dml": frozenset({"temperature"}),
}
# Terms that need the teacher's internal features for the very input the student sees.
FEATURE_TERMS = frozenset({"fitnet", "at"})
# Terms that read the teacher's logits (cached soft targets, or the online teacher).
LOGIT_TERMS = frozenset({"kd", "dkd"})


class LossTerm(BaseModel):
    """One weighted term of a student's loss."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str = Field(description="`ce`, `kd`, `dkd`, `fitnet`, `at`, `rkd` or `dml`")
    weight: float = Field(1.0, ge=0.0, description="the term's weight in the sum (0 skips it)")
    temperature: float | None = Field(None, gt=0.0, description="kd, dkd, dml: the term's own T (default: kd.temperature; dml: 1)")
    standardize: bool = Field(False, description="kd, dkd: z-score both logit vectors first (logit standardization, Sun et al. 2024)")
    tckd_weight: float = Field(1.0, ge=0.0, description="dkd: weight of the target-class term (DKD's alpha; Zhao et al. use 1)")
    nckd_weight: float = Field(8.0, ge=0.0, description="dkd: weight of the non-target term (DKD's beta; 8 on CIFAR-100 in the paper)")
    layers: dict[str, str] = Field(default_factory=dict, description="fitnet, at, rkd: {student module: teacher module} (rkd: one pair, or none for the logits)")
    p: float = Field(2.0, gt=0.0, description="at: the exponent of the attention maps")
    distance_weight: float = Field(1.0, ge=0.0, description="rkd: weight of the distance-wise term")
    angle_weight: float = Field(2.0, ge=0.0, description="rkd: weight of the angle-wise term")
    warmup_epochs: int = Field(0, ge=0, description="dkd: ramp the term's weight linearly over the first N epochs (Zhao et al. 2022 use 20 on CIFAR-100; 0: off)")

    @model_validator(mode="after")
    def _params_fit_the_term(self) -> "LossTerm":
        if self.name not in TERM_PARAMS:
            raise ValueError(f"unknown term {self.name!r} (known: {', '.join(TERM_PARAMS)})")
        allowed = TERM_PARAMS[self.name]
        # Judged by value, not by presence: a dumped config (every field written out) must reload.
        defaults = {k: f.get_default(call_default_factory=True) for k, f in type(self).model_fields.items() if k not in ("name", "weight")}
        extra = sorted(k for k, default in defaults.items() if k not in allowed and getattr(self, k) != default)
        if extra:
            takes = ", ".join(sorted(allowed)) or "nothing but weight"
            raise ValueError(f"{self.name} does not take {extra[0]!r} (it takes {takes})")
        if self.name in FEATURE_TERMS and not self.layers:
            raise ValueError(f"{self.name} needs layers: {{student_module: teacher_module}}")
        if self.name == "rkd" and len(self.layers) > 1:
            raise ValueError("rkd takes one layer pair (or none: on the logits)")
        return self

    @property
    def needs_teacher_features(self) -> bool:
        return self.name in FEATURE_TERMS or (self.name == "rkd" and bool(self.layers))

    @property
    def reads_teacher_logits(self) -> bool:
        return self.name in LOGIT_TERMS or (self.name == "rkd" and not self.layers)


def parse_loss(value: Any) -> str | list[LossTerm]:
    """`students[].loss` before validation: a name stays a name, a list becomes LossTerms; one-line errors."""
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("must be a loss name (ce, kd, dkd, ...) or a non-empty list of {name, weight, ...} terms")
    terms = []
    for i, item in enumerate(value):
        if isinstance(item, LossTerm):
            terms.append(item)
            continue
        if isinstance(item, str):
            item = {"name": item}
        try:
            terms.append(LossTerm.model_validate(item))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            raise ValueError(f"term {i}{' ' + where if where else ''}: {message}") from None
    names = [t.name for t in terms]
    if len(names) != len(set(names)):
        raise ValueError(f"each term at most once, got {names}")
    return terms


def terms_of(loss: str | list[LossTerm]) -> list[LossTerm]:
    return [] if isinstance(loss, str) else list(loss)


def reads_cached_teacher(loss: str | list[LossTerm], needs_teacher: frozenset[str]) -> bool:
    """Whether the loss reads teacher logits (so cached soft targets, in cached mode)."""
    if isinstance(loss, str):
        return loss in needs_teacher
    return any(t.reads_teacher_logits for t in loss)


def needs_online_teacher(loss: str | list[LossTerm]) -> bool:
    return any(t.needs_teacher_features for t in terms_of(loss))


def uses_dml(loss: str | list[LossTerm]) -> bool:
    return any(t.name == "dml" for t in terms_of(loss))


def check_students(cfg: Any) -> None:
    """Whole-job checks of the loss terms (called from JobConfig validation); ValueError naming the field."""
    for i, student in enumerate(cfg.students):
        for j, term in enumerate(terms_of(student.loss)):
            where = f"students.{i}.loss.{j}"
            if term.needs_teacher_features and cfg.teacher_mode != "online":
                raise ValueError(f"{where}: {term.name} needs the teacher's features for the student's own input; set teacher_mode: online")
            if term.standardize and cfg.teacher_mode == "cached" and cfg.soft_targets.encoding == "topk":
                raise ValueError(f"{where}: standardize needs every teacher logit; soft_targets.encoding topk drops them (use fp16 or fp32)")
    dml = [s.name for s in cfg.students if uses_dml(s.loss)]
    if len(dml) == 1:
        raise ValueError(f"students: dml needs two or more students with a dml term, only {dml[0]!r} has one")
    if cfg.sweep is not None:
        # A trial trains one student: no peers, no later generations. An online teacher runs in direct
        # trials only: each assistant of a chain learns from the cached soft targets of the stage before.
        if cfg.teacher_mode == "online":
            for i, chain in enumerate(cfg.sweep.chains()):
                if chain:
                    raise ValueError(f"sweep.space.chain.{i}: teacher_mode online runs the teacher in every trial, "
                                     "which is built for direct KD only; use [] chains or teacher_mode cached")
        for i, student in enumerate(cfg.students):
            if uses_dml(student.loss):
                raise ValueError(f"students.{i}.loss: dml needs peers trained together; a sweep trial trains one student")
            if student.generations > 1:
                raise ValueError(f"students.{i}.generations: born-again generations are not supported in sweeps yet")
    for field in ("input_jitter", "flip"):
        if getattr(cfg.train, field):
            # Students augment through views, which the soft-target cache holds per view; a random shift
            # of their own would no longer match the teacher's logits.
            raise ValueError(f"train.{field}: students train on views; set views.max_shift (and views.flip) instead "
                             f"(teachers keep teachers.N.train.{field})")
    if not cfg.transfer.labels:
        for i, student in enumerate(cfg.students):
            names = [student.loss] if isinstance(student.loss, str) else [t.name for t in student.loss]
            if reads := [n for n in names if n in LABEL_READERS]:
                raise ValueError(f"students.{i}.loss: {reads[0]} reads labels, and transfer.labels is false (use kd, or terms without ce/dkd)")


# Losses that read the labels (dkd: its target-class split needs the true class).
LABEL_READERS = frozenset({"ce", "dkd", "dkd_ls"})


def describe_loss(loss: str | list[LossTerm]) -> str:
    """Short label for tables and MLflow params: 'kd', '0.1*ce+0.9*kd', or '0.1*ce+0.9*kd@T2.5' for a
    term with its own temperature (without one, a term uses kd.temperature)."""
    if isinstance(loss, str):
        return loss
    return "+".join(f"{t.weight:g}*{t.name}{'_ls' if t.standardize else ''}{f'@T{t.temperature:g}' if t.temperature else ''}" for t in loss)


def uses_kd_section(loss: str | list[LossTerm]) -> bool:
    """Whether `kd.temperature` / `kd.alpha` shape this loss (so belong in its run's params)."""
    if isinstance(loss, str):
        return loss != "ce"
    return any(t.temperature is None and "temperature" in TERM_PARAMS[t.name] for t in loss)
