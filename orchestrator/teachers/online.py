"""Online teacher mode: the teachers run inside the train workers, on the student's own batch.

Feature methods (FitNets, attention transfer, RKD on a layer) need the teacher's internal
activations for exactly the input the student sees, which a cache of logits cannot give;
and with random input jitter even the logits must come from the shifted image. Features
are taken with forward hooks on modules chosen by name (`model.named_modules()`), and the
hooks are removed as soon as the forward pass is over.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from orchestrator.config import ConfigError, ModelSpec
from orchestrator.losses.terms import TEACHER_FEATURES, terms_of
from orchestrator.teachers.pool import ensemble_logits
from orchestrator.train.models import build_model, load_weights

__all__ = ["OnlineTeacher", "check_feature_layers", "feature_shapes", "tap_features"]


def _module(model: nn.Module, name: str, *, where: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ConfigError(f"{where}: no module {name!r} (modules: {shown})") from None


@contextmanager
def tap_features(model: nn.Module, names: Sequence[str], *, where: str = "model") -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that record the outputs of the named submodules of `model` into the yielded dict.

    The hooks are removed when the block ends, also on an exception, so a model handed
    back (saved, evaluated, logged to MLflow) carries none.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in dict.fromkeys(names):  # a layer used by two terms is hooked once
            def hook(_module, _inputs, output, name=name):
                captured[name] = output
            handles.append(_module(model, name, where=where).register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def feature_shapes(model: nn.Module, names: Sequence[str], input_shape: Sequence[int], *, where: str = "model") -> dict[str, tuple[int, ...]]:
    """Per-example shapes of the named layers' outputs, from one forward pass on zeros in eval mode."""
    if not names:
        return {}
    was_training = model.training
    model.eval()  # no BatchNorm statistics are updated by the probe
    try:
        with tap_features(model, names, where=where) as features:
            # On the model's own device: a CUDA teacher probed with CPU zeros would fail.
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return {name: tuple(value.shape[1:]) for name, value in features.items()}


def layer_pairs(loss: Any) -> list[tuple[str, str]]:
    """(student layer, teacher layer) pairs of every feature term of a loss, in order."""
    return [pair for term in terms_of(loss) for pair in term.layer_pairs()]


def check_feature_layers(cfg: Any, data: Any) -> None:
    """Before Ray starts: every named layer exists, and each term can use the shapes it gets (ConfigError)."""
    if not any(layer_pairs(s.loss) for s in cfg.students):
        return
    teacher = build_model(cfg.teachers[0], data.input_shape, data.num_classes)
    for i, student in enumerate(cfg.students):
        model = build_model(student, data.input_shape, data.num_classes)
        for j, term in enumerate(terms_of(student.loss)):
            if TEACHER_FEATURES not in term.needs():
                continue
            where = f"students.{i}.loss.{j}"
            s_shapes = feature_shapes(model, list(term.layers), data.input_shape, where=f"{where} student")
            t_shapes = feature_shapes(teacher, list(term.layers.values()), data.input_shape, where=f"{where} teacher")
            if term.name == "at":
                for s_name, t_name in term.layers.items():
                    if len(s_shapes[s_name]) != 3 or len(t_shapes[t_name]) != 3:
                        raise ConfigError(
                            f"{where}: attention transfer needs (C, H, W) feature maps on both sides, "
                            f"got {s_name} {s_shapes[s_name]} and {t_name} {t_shapes[t_name]}"
                        )


class OnlineTeacher:
    """The job's teachers inside a train worker: frozen, in eval mode, never given to an optimizer.

    `__call__(images)` returns (logits, features): the logits combined exactly as the
    soft-target stage combines them (one teacher, or `ensemble_logits` with the same
    weights and rule), and the hooked features of the first teacher.
    """

    def __init__(self, teachers: Sequence[Mapping[str, Any]], states: Sequence[Mapping[str, torch.Tensor]], *,
                 input_shape: Sequence[int], num_classes: int, ensemble: str, layers: Sequence[str], device: Any) -> None:
        self.models = []
        for teacher, state in zip(teachers, states, strict=True):
            model = build_model(ModelSpec.model_validate(teacher["spec"]), tuple(input_shape), num_classes)
            load_weights(model, dict(state), where=f"teacher {teacher['name']}")
            model.requires_grad_(False)
            self.models.append(model.to(device).eval())
        self.weights = [float(t["weight"]) for t in teachers]
        self.ensemble, self.layers = ensemble, list(dict.fromkeys(layers))
        self.shapes = feature_shapes(self.models[0], self.layers, input_shape, where="teacher") if self.layers else {}
        self.rows = 0  # rows this worker's teachers ran on: the job's teacher_forward_rows, measured

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with tap_features(self.models[0], self.layers, where="teacher") as features:
            outputs = [model(images) for model in self.models]
        logits = outputs[0] if len(outputs) == 1 else ensemble_logits(outputs, self.weights, rule=self.ensemble)
        self.rows += len(images)
        return logits.float(), dict(features)
