"""A student's training objective inside the worker: one registered loss, or a weighted sum of terms.

    loss = sum_i weight_i * term_i(student, teacher, peers)

A string loss (`kd`, `dkd`, ...) is called exactly as before: `LOSSES[name](student_logits,
labels, teacher_logits, temperature=kd.temperature, alpha=kd.alpha)`. A list of terms
(`term_config.LossTerm`) is evaluated term by term from one `StepInputs` per batch. The
objective owns the FitNets adapters, so they are optimised with the student, saved in its
checkpoints and dropped when training ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from orchestrator.config import KDConfig
from orchestrator.feature_losses import HintAdapter, attention_transfer_loss, fitnet_loss, rkd_loss
from orchestrator.logit_losses import dkd_loss, kd_soft_loss, mutual_learning_loss
from orchestrator.losses import get_loss
from orchestrator.online import OnlineTeacher, tap_features
from orchestrator.precision import autocast
from orchestrator.term_config import LossTerm, terms_of, uses_dml


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each Linear layer's incoming weight vectors (rows) to L2 norm <= max_norm, in place
    (Srivastava et al. 2014; Hinton et al. 2015 trained their MNIST nets with it)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.renorm_(p=2, dim=0, maxnorm=max_norm)

# DML's paper runs at T = 1; a dml term without its own temperature uses that, not kd.temperature.
DML_TEMPERATURE = 1.0


@dataclass
class StepInputs:
    """What one member's loss may read for one batch."""

    logits: Tensor  # (N, C) the member's own output, with grad
    labels: Tensor  # (N,)
    teacher_logits: Tensor | None  # (N, C) cached soft targets or the online teacher's; None if neither
    features: dict[str, Tensor] = field(default_factory=dict)  # the member's hooked layers
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    peer_logits: list[Tensor] = field(default_factory=list)  # other dml students' logits, detached


class Objective(nn.Module):
    """One member's loss. Parameters: the FitNets adapters (none for other losses)."""

    def __init__(self, loss: str | list[LossTerm], kd: KDConfig, *, student_shapes: dict[str, tuple] | None = None,
                 teacher_shapes: dict[str, tuple] | None = None) -> None:
        super().__init__()
        self.kd = kd
        self.loss_fn = get_loss(loss) if isinstance(loss, str) else None
        self.terms = terms_of(loss)
        self.uses_dml = uses_dml(loss)
        self.student_layers = [s for t in self.terms if t.needs_teacher_features for s in t.layers]
        self.teacher_layers = [t_name for t in self.terms if t.needs_teacher_features for t_name in t.layers.values()]
        self.epoch = 0  # set by the train loop at each epoch's start: term warm-ups read it
        self.adapters = nn.ModuleDict()
        for j, term in enumerate(self.terms):
            if term.name == "fitnet":
                for k, (s_name, t_name) in enumerate(term.layers.items()):
                    self.adapters[f"{j}_{k}"] = HintAdapter(student_shapes[s_name], teacher_shapes[t_name])

    def forward(self, x: StepInputs) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(x.logits, x.labels, x.teacher_logits, temperature=self.kd.temperature, alpha=self.kd.alpha)
        total = x.logits.new_zeros(())
        for j, term in enumerate(self.terms):
            if term.weight > 0:  # a zero weight skips the term, so it cannot bring in inf or NaN
                ramp = min(1.0, (self.epoch + 1) / term.warmup_epochs) if term.warmup_epochs else 1.0
                total = total + term.weight * ramp * self._term(j, term, x)
        return total

    def _term(self, j: int, term: LossTerm, x: StepInputs) -> Tensor:
        temperature = term.temperature or self.kd.temperature
        if term.name == "ce":
            return F.cross_entropy(x.logits, x.labels)
        if term.name == "dml":
            return mutual_learning_loss(x.logits, x.peer_logits, temperature=term.temperature or DML_TEMPERATURE)
        if term.reads_teacher_logits and x.teacher_logits is None:
            raise ValueError(f"loss term {term.name}: no teacher logits in this stage")
        if term.name == "kd":
            return kd_soft_loss(x.logits, x.teacher_logits, temperature=temperature, standardize=term.standardize)
        if term.name == "dkd":
            return dkd_loss(x.logits, x.labels, x.teacher_logits, temperature=temperature, tckd_weight=term.tckd_weight,
                            nckd_weight=term.nckd_weight, standardize=term.standardize)
        pairs = list(term.layers.items())
        if term.name == "fitnet":
            return sum(fitnet_loss(self.adapters[f"{j}_{k}"](x.features[s]), x.teacher_features[t]) for k, (s, t) in enumerate(pairs))
        if term.name == "at":
            return sum(attention_transfer_loss(x.features[s], x.teacher_features[t], p=term.p) for s, t in pairs)
        if term.name == "rkd":
            student, teacher = (x.features[pairs[0][0]], x.teacher_features[pairs[0][1]]) if pairs else (x.logits, x.teacher_logits)
            return rkd_loss(student, teacher, distance_weight=term.distance_weight, angle_weight=term.angle_weight)
        raise ValueError(f"unknown loss term {term.name!r}")


def build_objective(loss: Any, kd: KDConfig, model: nn.Module, input_shape, teacher: OnlineTeacher | None) -> Objective:
    """The member's Objective; adapter sizes come from one probe forward of the student and the teacher's shapes."""
    from orchestrator.online import feature_shapes

    terms = terms_of(loss)
    fitnet_layers = [s for t in terms if t.name == "fitnet" for s in t.layers]
    student_shapes = feature_shapes(model, fitnet_layers, input_shape, where="student") if fitnet_layers else {}
    return Objective(loss, kd, student_shapes=student_shapes, teacher_shapes=teacher.shapes if teacher is not None else {})


def _average_gradients(module: nn.Module) -> None:
    """Adapters live outside the DDP-wrapped student, so their gradients are averaged here."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= dist.get_world_size()


def step_members(members, images: Tensor, labels: Tensor, teacher_logits: Tensor | None, teacher: OnlineTeacher | None, *,
                 max_norm: float | None = None, precision: str = "fp32") -> dict[str, Tensor]:
    """One optimisation step of every member on one batch (then its per-step LR schedule, then the max-norm
    constraint); returns each member's (detached) loss.

    All members run forward first, then each steps: DML peers see each other's
    predictions on the same batch (Zhang et al.'s simultaneous variant). Members are
    independent otherwise, and the order of random draws (dropout) is unchanged.
    Forward passes and losses run under autocast at `precision` (precision.py); a member
    with a GradScaler (fp16 on a GPU) scales its loss before backward.
    """
    teacher_features: dict[str, Tensor] = {}
    with autocast(precision, images.device):
        if teacher is not None:
            teacher_logits, teacher_features = teacher(images)
        outputs = []
        for member in members:
            objective = member.loss_fn if isinstance(member.loss_fn, Objective) else None
            layers = objective.student_layers if objective is not None else []
            with tap_features(member.plain_model, layers, where=member.config.name) as features:
                logits = member.model(images)
            outputs.append((logits, dict(features)))
        peers = {m.config.name: out[0].detach() for m, out in zip(members, outputs)
                 if isinstance(m.loss_fn, Objective) and m.loss_fn.uses_dml}
        losses = {}
        for member, (logits, features) in zip(members, outputs):
            if isinstance(member.loss_fn, Objective):
                inputs = StepInputs(logits, labels, teacher_logits, features, teacher_features,
                                    [v for k, v in peers.items() if k != member.config.name] if member.loss_fn.uses_dml else [])
                losses[member.config.name] = member.loss_fn(inputs)
            else:  # a bare LOSSES function (benchmarks build members this way)
                kd = member.config.kd
                losses[member.config.name] = member.loss_fn(logits, labels, teacher_logits, temperature=kd.temperature, alpha=kd.alpha)
    for member in members:
        loss = losses[member.config.name]
        scaler = getattr(member, "scaler", None)
        member.optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if isinstance(member.loss_fn, Objective) and len(member.loss_fn.adapters):
            _average_gradients(member.loss_fn)
        if scaler is not None:
            scaler.step(member.optimizer)
            scaler.update()
        else:
            member.optimizer.step()
        member.scheduler.step()
        if max_norm is not None:
            apply_max_norm(member.plain_model, max_norm)
        losses[member.config.name] = loss.detach()
    return losses
