"""The one registry of student loss terms: each term is a class that declares its parameters, what it
reads and what it computes (no torch at import: the config validates with it).

    loss: kd                                   # shorthand: SHORTHANDS["kd"] -> [kd at alpha, ce at 1 - alpha]
    loss:                                      # the sum of weight * term
      - {name: ce, weight: 0.1}
      - {name: kd, weight: 0.9, temperature: 4}
      - {name: fitnet, weight: 1.0, layers: {features.relu1: features.relu2}}

A term list is a pydantic union discriminated on `name`, so a field another term takes is an error,
not silently ignored. Terms (their tensor functions: losses/logit.py, losses/feature.py):
    ce      cross-entropy on the labels
    kd      T^2 KL(teacher || student) at T (Hinton 2015); `standardize` = logit standardization (Sun 2024)
    dkd     decoupled KD (Zhao 2022): tckd_weight * TCKD + nckd_weight * NCKD; `standardize` as kd
    fitnet  FitNets hints (Romero 2015) through a learned adapter; layers {student_module: teacher_module}
    at      attention transfer (Zagoruyko 2017); layers as fitnet, (N, C, H, W) maps on both sides
    rkd     relational KD (Park 2019), distance_weight * RKD-D + angle_weight * RKD-A; on the logits,
            or on one layer pair given in layers
    dml     deep mutual learning (Zhang 2018): mean KL from the other students with a dml term

Adding a term: one class here (fields, `reads`, `compute`) added to TERM_CLASSES, its tensor function
in losses/, a pinned test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

if TYPE_CHECKING:  # torch only where a term computes
    from torch import Tensor, nn

@dataclass
class StepInputs:
    """What one member's loss may read for one batch."""

    logits: Tensor  # (N, C) the member's own output, with grad
    labels: Tensor  # (N,)
    teacher_logits: Tensor | None  # (N, C) cached soft targets or the online teacher's; None if neither
    features: dict[str, Tensor] = field(default_factory=dict)  # the member's hooked layers
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    peer_logits: list[Tensor] = field(default_factory=list)  # other dml students' logits, detached


# What a term may read beyond the student's own logits.
LABELS, TEACHER_LOGITS, TEACHER_FEATURES, PEERS = "labels", "teacher_logits", "teacher_features", "peers"
# DML's paper runs at T = 1; a dml term without its own temperature uses that, not kd.temperature.
DML_TEMPERATURE = 1.0


class Term(BaseModel):
    """One weighted term of a student's loss."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    weight: float = Field(1.0, ge=0.0, description="the term's weight in the sum (0 skips it)")
    reads: ClassVar[frozenset[str]] = frozenset()

    name: ClassVar[str]  # each term's Literal field, the union's tag

    def needs(self) -> frozenset[str]:
        """What this term reads (LABELS, TEACHER_LOGITS, TEACHER_FEATURES, PEERS)."""
        return self.reads

    def layer_pairs(self) -> list[tuple[str, str]]:
        """(student module, teacher module) pairs whose teacher features this term reads."""
        return list(getattr(self, "layers", {}).items()) if TEACHER_FEATURES in self.needs() else []

    def ramp(self, epoch: int) -> float:
        """The factor on the weight at `epoch` (0-based): 1 unless the term warms up."""
        return 1.0

    def compute(self, x: StepInputs, temperature: float, adapters: Sequence[nn.Module]) -> Tensor:
        """The unweighted term for one batch; `temperature` is kd.temperature (the student's T) for terms
        without their own; `adapters` are this term's learned modules (fitnet)."""
        raise NotImplementedError


class CE(Term):
    name: Literal["ce"] = Field("ce", description="cross-entropy on the labels")
    reads: ClassVar[frozenset[str]] = frozenset({LABELS})

    def compute(self, x, temperature, adapters):
        import torch.nn.functional as F

        return F.cross_entropy(x.logits, x.labels)


class KD(Term):
    name: Literal["kd"] = Field("kd", description="Hinton KD's soft term: T^2 KL(teacher || student) at T (Hinton et al. 2015)")
    temperature: float | None = Field(None, gt=0.0, description="the term's own T (default: kd.temperature)")
    standardize: bool = Field(False, description="z-score both logit vectors first (logit standardization, Sun et al. 2024)")
    reads: ClassVar[frozenset[str]] = frozenset({TEACHER_LOGITS})

    def compute(self, x, temperature, adapters):
        from orchestrator.losses.logit import kd_soft_loss

        return kd_soft_loss(x.logits, x.teacher_logits, temperature=self.temperature or temperature, standardize=self.standardize)


class DKD(Term):
    name: Literal["dkd"] = Field("dkd", description="decoupled KD (Zhao et al. 2022): T^2 (tckd_weight TCKD + nckd_weight NCKD)")
    temperature: float | None = Field(None, gt=0.0, description="the term's own T (default: kd.temperature)")
    standardize: bool = Field(False, description="z-score both logit vectors first (DKD + LS)")
    tckd_weight: float = Field(1.0, ge=0.0, description="weight of the target-class term (DKD's alpha; Zhao et al. use 1)")
    nckd_weight: float = Field(8.0, ge=0.0, description="weight of the non-target term (DKD's beta; 8 on CIFAR-100 in the paper)")
    warmup_epochs: int = Field(0, ge=0, description="ramp the term's weight linearly over the first N epochs (Zhao et al. 2022 use 20 on CIFAR-100; 0: off)")
    reads: ClassVar[frozenset[str]] = frozenset({LABELS, TEACHER_LOGITS})  # the target-class split needs the true class

    def ramp(self, epoch):
        return min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs else 1.0

    def compute(self, x, temperature, adapters):
        from orchestrator.losses.logit import dkd_loss

        return dkd_loss(x.logits, x.labels, x.teacher_logits, temperature=self.temperature or temperature,
                        tckd_weight=self.tckd_weight, nckd_weight=self.nckd_weight, standardize=self.standardize)


class _LayerTerm(Term):
    layers: dict[str, str] = Field(default_factory=dict, description="{student module: teacher module}")

    @model_validator(mode="after")
    def _has_layers(self):
        if not self.layers:
            raise ValueError(f"{self.name} needs layers: {{student_module: teacher_module}}")
        return self


class FitNet(_LayerTerm):
    name: Literal["fitnet"] = Field("fitnet", description="FitNets hints (Romero et al. 2015): MSE between teacher features and a learned 1x1/linear adapter of the student's")
    reads: ClassVar[frozenset[str]] = frozenset({TEACHER_FEATURES})

    def compute(self, x, temperature, adapters):
        from orchestrator.losses.feature import fitnet_loss

        return sum(fitnet_loss(adapter(x.features[s]), x.teacher_features[t]) for adapter, (s, t) in zip(adapters, self.layers.items()))


class AT(_LayerTerm):
    name: Literal["at"] = Field("at", description="attention transfer (Zagoruyko and Komodakis 2017) between (C, H, W) feature maps")
    p: float = Field(2.0, gt=0.0, description="the exponent of the attention maps")
    reads: ClassVar[frozenset[str]] = frozenset({TEACHER_FEATURES})

    def compute(self, x, temperature, adapters):
        from orchestrator.losses.feature import attention_transfer_loss

        return sum(attention_transfer_loss(x.features[s], x.teacher_features[t], p=self.p) for s, t in self.layers.items())


class RKD(Term):
    name: Literal["rkd"] = Field("rkd", description="relational KD (Park et al. 2019): distance- and angle-wise structure of a batch")
    layers: dict[str, str] = Field(default_factory=dict, description="one {student module: teacher module} pair, or none for the logits")
    distance_weight: float = Field(1.0, ge=0.0, description="weight of the distance-wise term")
    angle_weight: float = Field(2.0, ge=0.0, description="weight of the angle-wise term")

    @model_validator(mode="after")
    def _one_pair(self):
        if len(self.layers) > 1:
            raise ValueError("rkd takes one layer pair (or none: on the logits)")
        return self

    def needs(self):
        return frozenset({TEACHER_FEATURES if self.layers else TEACHER_LOGITS})

    def compute(self, x, temperature, adapters):
        from orchestrator.losses.feature import rkd_loss

        (s, t), = self.layers.items() if self.layers else ((None, None),)
        student, teacher = (x.features[s], x.teacher_features[t]) if s else (x.logits, x.teacher_logits)
        return rkd_loss(student, teacher, distance_weight=self.distance_weight, angle_weight=self.angle_weight)


class DML(Term):
    name: Literal["dml"] = Field("dml", description="deep mutual learning (Zhang et al. 2018): mean KL from the other students with a dml term")
    temperature: float | None = Field(None, gt=0.0, description="the term's own T (default: 1, the paper's)")
    reads: ClassVar[frozenset[str]] = frozenset({PEERS})

    def compute(self, x, temperature, adapters):
        from orchestrator.losses.logit import mutual_learning_loss

        return mutual_learning_loss(x.logits, x.peer_logits, temperature=self.temperature or DML_TEMPERATURE)


TERM_CLASSES: tuple[type[Term], ...] = (CE, KD, DKD, FitNet, AT, RKD, DML)
TERMS: dict[str, type[Term]] = {cls.model_fields["name"].default: cls for cls in TERM_CLASSES}
LossTerm = Annotated[Union[CE, KD, DKD, FitNet, AT, RKD, DML], Field(discriminator="name")]
_TERM = TypeAdapter(LossTerm)


def _blend(soft: Term) -> Callable[[float, float], list[Term]]:
    """Hinton's blend: the soft term at alpha, cross-entropy at 1 - alpha (alpha = 1: no CE, 0: CE only)."""
    return lambda temperature, alpha: [soft.model_copy(update={"weight": alpha, "temperature": temperature}), CE(weight=1.0 - alpha)]


# The string form of `students[].loss`: a name for a term list built from the student's T and alpha
# (kd.temperature / kd.alpha, or auto_kd's), which are known only once the teacher's logits are.
SHORTHANDS: dict[str, Callable[[float, float], list[Term]]] = {
    "ce": lambda temperature, alpha: [CE()],
    "kd": _blend(KD()),
    "dkd": _blend(DKD()),  # DKD's CIFAR-100 weights; others: the term list form
    "kd_ls": _blend(KD(standardize=True)),
    "dkd_ls": _blend(DKD(standardize=True)),
}


def expand(loss: str | list[Term], temperature: float | None, alpha: float | None) -> list[Term]:
    """The terms a student's loss stands for; a shorthand needs the student's T and alpha."""
    if isinstance(loss, str):
        if loss != "ce" and (temperature is None or alpha is None):
            raise ValueError(f"loss {loss!r}: needs the student's kd temperature and alpha")
        return SHORTHANDS[loss](temperature, alpha)
    return list(loss)


def _term_error(err: ValidationError, item: Any) -> str:
    """': message' or ' field: message' for a term's first validation error, in one line."""
    first = err.errors()[0]
    if first["type"] == "union_tag_invalid":
        return f": unknown term {item.get('name')!r} (known: {', '.join(TERMS)})"
    if first["type"] == "union_tag_not_found":
        return ": needs a name (one of " + ", ".join(TERMS) + ")"
    name, *where = first["loc"]
    if first["type"] == "extra_forbidden" and len(where) == 1:
        takes = ", ".join(sorted(k for k in TERMS[name].model_fields if k not in ("name", "weight"))) or "nothing but weight"
        return f": {name} does not take {where[0]!r} (it takes {takes})"
    message = first["msg"].removeprefix("Value error, ")
    return f"{' ' + '.'.join(map(str, where)) if where else ''}: {message}"


def parse_loss(value: Any) -> str | list[Term]:
    """`students[].loss` before validation: a name stays a name, a list becomes LossTerms; one-line errors."""
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("must be a loss name (ce, kd, dkd, ...) or a non-empty list of {name, weight, ...} terms")
    terms = []
    for i, item in enumerate(value):
        if isinstance(item, Term):
            terms.append(item)
            continue
        if isinstance(item, str):
            item = {"name": item}
        try:
            terms.append(_TERM.validate_python(item))
        except ValidationError as err:
            raise ValueError(f"term {i}{_term_error(err, item)}") from None
    names = [t.name for t in terms]
    if len(names) != len(set(names)):
        raise ValueError(f"each term at most once, got {names}")
    return terms


def terms_of(loss: str | list[Term]) -> list[Term]:
    """A term list's terms; none for a shorthand (whose terms need the student's T and alpha: `expand`)."""
    return [] if isinstance(loss, str) else list(loss)


def shorthand_needs(name: str) -> frozenset[str]:
    """What a shorthand's soft term reads: its CE part is dropped where there are no labels (alpha 1,
    kd_settings.student_kd), so `kd` reads labels only through that part, `dkd` through DKD itself."""
    return frozenset().union(*(t.needs() for t in SHORTHANDS[name](1.0, 1.0) if t.weight > 0))


def loss_needs(loss: str | list[Term]) -> frozenset[str]:
    """Everything a student's loss reads: LABELS, TEACHER_LOGITS, TEACHER_FEATURES, PEERS."""
    if isinstance(loss, str):
        return shorthand_needs(loss)
    return frozenset().union(*(t.needs() for t in loss))


def needs_online_teacher(loss: str | list[Term]) -> bool:
    return TEACHER_FEATURES in loss_needs(loss)


def uses_dml(loss: str | list[Term]) -> bool:
    return PEERS in loss_needs(loss)


def check_students(cfg: Any) -> None:
    """Whole-job checks of the loss terms (called from JobConfig validation); ValueError naming the field."""
    for i, student in enumerate(cfg.students):
        for j, term in enumerate(terms_of(student.loss)):
            where = f"students.{i}.loss.{j}"
            if TEACHER_FEATURES in term.needs() and cfg.teacher_mode != "online":
                raise ValueError(f"{where}: {term.name} needs the teacher's features for the student's own input; set teacher_mode: online")
            if getattr(term, "standardize", False) and cfg.teacher_mode == "cached" and cfg.soft_targets.encoding == "topk":
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
    for name in ("input_jitter", "flip"):
        if getattr(cfg.train, name):
            # Students augment through views, which the soft-target cache holds per view; a random shift
            # of their own would no longer match the teacher's logits.
            raise ValueError(f"train.{name}: students train on views; set views.max_shift (and views.flip) instead "
                             f"(teachers keep teachers.N.train.{name})")
    if not cfg.transfer.labels:
        for i, student in enumerate(cfg.students):
            terms = [student.loss] if isinstance(student.loss, str) else [t.name for t in student.loss if LABELS in t.needs()]
            if reads := [name for name in terms if name not in SHORTHANDS or LABELS in shorthand_needs(name)]:
                raise ValueError(f"students.{i}.loss: {reads[0]} reads labels, and transfer.labels is false (use kd, or terms without ce/dkd)")


def describe_loss(loss: str | list[Term]) -> str:
    """Short label for tables and MLflow params: 'kd', '0.1*ce+0.9*kd', or '0.1*ce+0.9*kd@T2.5' for a
    term with its own temperature (without one, a term uses kd.temperature)."""
    if isinstance(loss, str):
        return loss
    return "+".join(f"{t.weight:g}*{t.name}{'_ls' if getattr(t, 'standardize', False) else ''}"
                    f"{f'@T{t.temperature:g}' if getattr(t, 'temperature', None) else ''}" for t in loss)


def uses_kd_section(loss: str | list[Term]) -> bool:
    """Whether `kd.temperature` / `kd.alpha` shape this loss (so belong in its run's params)."""
    if isinstance(loss, str):
        return loss != "ce"
    # dml's default T is its own (1), not kd.temperature
    return any(getattr(t, "temperature", 0) is None and t.name != "dml" for t in loss)
