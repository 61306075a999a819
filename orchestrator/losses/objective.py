"""A student's training objective inside the worker: the weighted sum of its loss terms.

    loss = sum_i weight_i * ramp_i(epoch) * term_i(student, teacher, peers)

A shorthand (`kd`, `dkd`, ...) is first expanded into its terms with the student's T and alpha
(terms.SHORTHANDS); every term computes itself from one `StepInputs` per batch (terms.py). The
objective owns the FitNets adapters, so they are optimised with the student, saved in its
checkpoints and dropped when training ends.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from orchestrator.config import KDConfig
from orchestrator.losses.feature import HintAdapter
from orchestrator.losses.terms import PEERS, TEACHER_LOGITS, FitNet, StepInputs, Term, expand
from orchestrator.teachers.online import OnlineTeacher, tap_features
from orchestrator.train.precision import autocast


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each Linear layer's incoming weight vectors (rows) to L2 norm <= max_norm, in place
    (Srivastava et al. 2014; Hinton et al. 2015 trained their MNIST nets with it)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.renorm_(p=2, dim=0, maxnorm=max_norm)


class Objective(nn.Module):
    """One member's loss. Parameters: the FitNets adapters (none for other losses)."""

    def __init__(self, loss: str | list[Term], kd: KDConfig, *, student_shapes: dict[str, tuple] | None = None,
                 teacher_shapes: dict[str, tuple] | None = None) -> None:
        super().__init__()
        self.temperature = kd.temperature  # for terms without their own T
        self.terms = expand(loss, kd.temperature, kd.alpha)
        self.uses_dml = any(PEERS in t.needs() for t in self.terms)
        pairs = [pair for t in self.terms for pair in t.layer_pairs()]
        self.student_layers = [s for s, _ in pairs]
        self.teacher_layers = [t for _, t in pairs]
        self.epoch = 0  # set by the train loop at each epoch's start: term warm-ups read it
        self.adapters = nn.ModuleDict()
        for j, term in enumerate(self.terms):
            if isinstance(term, FitNet):
                for k, (s_name, t_name) in enumerate(term.layers.items()):
                    self.adapters[f"{j}_{k}"] = HintAdapter(student_shapes[s_name], teacher_shapes[t_name])
        # Each term's adapters, looked up once here, not per step (a plain list: the ModuleDict above owns them).
        self.term_adapters = [[a for key, a in self.adapters.items() if key.split("_")[0] == str(j)] for j in range(len(self.terms))]

    def forward(self, x: StepInputs) -> Tensor:
        total = x.logits.new_zeros(())
        for j, term in enumerate(self.terms):
            if term.weight > 0:  # a zero weight skips the term, so it cannot bring in inf or NaN
                if TEACHER_LOGITS in term.needs() and x.teacher_logits is None:
                    raise ValueError(f"loss term {term.name}: no teacher logits in this stage")
                total = total + term.weight * term.ramp(self.epoch) * term.compute(x, self.temperature, self.term_adapters[j])
        return total


def build_objective(loss: Any, kd: KDConfig, model: nn.Module, input_shape, teacher: OnlineTeacher | None) -> Objective:
    """The member's Objective; adapter sizes come from one probe forward of the student and the teacher's shapes."""
    from orchestrator.teachers.online import feature_shapes

    fitnet_layers = [s for t in expand(loss, kd.temperature, kd.alpha) if isinstance(t, FitNet) for s in t.layers]
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
            with tap_features(member.plain_model, member.loss_fn.student_layers, where=member.config.name) as features:
                logits = member.model(images)
            outputs.append((logits, dict(features)))
        peers = {m.config.name: out[0].detach() for m, out in zip(members, outputs) if m.loss_fn.uses_dml}
        losses = {}
        for member, (logits, features) in zip(members, outputs):
            inputs = StepInputs(logits, labels, teacher_logits, features, teacher_features,
                                [v for k, v in peers.items() if k != member.config.name] if member.loss_fn.uses_dml else [])
            losses[member.config.name] = member.loss_fn(inputs)
    for member in members:
        loss = losses[member.config.name]
        scaler = getattr(member, "scaler", None)
        member.optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if len(member.loss_fn.adapters):
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
