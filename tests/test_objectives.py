"""Composed loss terms, the online teacher, forward hooks and DML steps, in-process (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from orchestrator.config import ConfigError, KDConfig, ModelSpec, StudentConfig, TeacherConfig, TrainConfig, validate_config
from orchestrator.losses.feature import attention_transfer_loss, fitnet_loss, rkd_loss
from orchestrator.losses.hinton import hinton_kd
from orchestrator.losses.logit import dkd_loss, kd_soft_loss, mutual_learning_loss
from orchestrator.losses.objective import Objective, StepInputs, build_objective, step_members
from orchestrator.losses.terms import parse_loss
from orchestrator.teachers.online import OnlineTeacher, check_feature_layers, feature_shapes, tap_features
from orchestrator.train.models import build_model
from orchestrator.train.optim import build_optimizer, build_scheduler
from orchestrator.train.train_loop import Member, MemberConfig

SHAPE = (1, 8, 8)
TEACHER = ModelSpec(family="cnn", channels=[8, 16], hidden=[32])
STUDENT = ModelSpec(family="cnn", channels=[4, 8], hidden=[16])
KD = KDConfig(temperature=4.0, alpha=0.9)


def _batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def _logits(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g) * 2, torch.randint(0, 10, (n,), generator=g), torch.randn(n, 10, generator=g) * 3


def _teacher() -> OnlineTeacher:
    torch.manual_seed(1)
    state = build_model(TEACHER, SHAPE, 10).state_dict()
    return OnlineTeacher([{"name": "t", "spec": TEACHER.model_dump(), "weight": 1.0}], [state], input_shape=SHAPE, num_classes=10,
                         ensemble="logits", layers=["features.relu1", "features.relu2", "classifier.relu1"], device="cpu")


def _member(name: str, loss, teacher: OnlineTeacher | None, spec: ModelSpec = STUDENT) -> Member:
    torch.manual_seed(0)
    model = build_model(spec, SHAPE, 10)
    objective = build_objective(parse_loss(loss), KD, model, SHAPE, teacher)
    optimizer = build_optimizer([*model.parameters(), *objective.parameters()], TrainConfig(lr=0.01))
    return Member(MemberConfig(name=name, role="student", spec=spec, loss=parse_loss(loss), kd=KD), model, optimizer, build_scheduler(optimizer, TrainConfig(), 1), objective)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_string_and_term_forms_agree_with_the_pure_losses():
    s, y, t = _logits()
    x = StepInputs(s, y, t)
    assert torch.equal(Objective("kd", KD)(x), hinton_kd(s, y, t, temperature=4.0, alpha=0.9))
    composed = Objective(parse_loss([{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}]), KD)(x)
    assert composed.item() == pytest.approx(hinton_kd(s, y, t, temperature=4.0, alpha=0.9).item(), rel=1e-6)
    terms = parse_loss([{"name": "kd", "weight": 2.0, "temperature": 2.0, "standardize": True},
                        {"name": "dkd", "weight": 0.5, "tckd_weight": 2.0, "nckd_weight": 3.0}, {"name": "rkd", "weight": 0.25}])
    expected = (2.0 * kd_soft_loss(s, t, temperature=2.0, standardize=True) + 0.5 * dkd_loss(s, y, t, temperature=4.0, tckd_weight=2.0, nckd_weight=3.0)
                + 0.25 * rkd_loss(s, t))
    assert Objective(terms, KD)(x).item() == pytest.approx(expected.item(), rel=1e-6)
    # A zero weight skips its term entirely, even when that term could not be computed.
    assert torch.equal(Objective(parse_loss([{"name": "ce"}, {"name": "kd", "weight": 0.0}]), KD)(StepInputs(s, y, None)), nn.functional.cross_entropy(s, y))
    with pytest.raises(ValueError, match="no teacher logits"):
        Objective(parse_loss(["ce", "kd"]), KD)(StepInputs(s, y, None))


def test_tap_features_captures_named_layers_and_always_removes_hooks():
    model = build_model(STUDENT, SHAPE, 10)
    with tap_features(model, ["features.relu2", "classifier.fc1"]) as features:
        model(torch.zeros(3, *SHAPE))
        assert _hooks(model) == 2
    assert features["features.relu2"].shape == (3, 8, 4, 4) and features["classifier.fc1"].shape == (3, 16)
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with tap_features(model, ["features.relu1"]):
            raise RuntimeError("boom")
    assert _hooks(model) == 0
    with pytest.raises(ConfigError, match="no module 'features.nope'"):
        with tap_features(model, ["features.nope"]):
            pass
    assert feature_shapes(model, ["features.relu1"], SHAPE) == {"features.relu1": (4, 8, 8)} and model.training


def test_online_feature_step_trains_student_and_adapters_never_the_teacher():
    teacher = _teacher()
    before = [p.clone() for p in teacher.models[0].parameters()]
    loss = [{"name": "ce"}, {"name": "fitnet", "weight": 1.0, "layers": {"features.relu2": "features.relu2"}},
            {"name": "at", "weight": 100.0, "layers": {"features.relu1": "features.relu1"}},
            {"name": "rkd", "layers": {"classifier.relu1": "classifier.relu1"}}]
    member = _member("s", loss, teacher)
    adapter = member.loss_fn.adapters["1_0"]
    assert isinstance(adapter.proj, nn.Conv2d) and (adapter.proj.in_channels, adapter.proj.out_channels) == (8, 16)
    adapter_before, student_before = adapter.proj.weight.clone(), member.model.features.conv1.weight.clone()
    images, labels = _batch()
    losses = step_members([member], images, labels, None, teacher)
    assert torch.isfinite(losses["s"]) and losses["s"].requires_grad is False
    assert not torch.equal(adapter.proj.weight, adapter_before) and not torch.equal(member.model.features.conv1.weight, student_before)
    assert all(torch.equal(a, b) and not a.requires_grad and a.grad is None for a, b in zip(teacher.models[0].parameters(), before))
    assert _hooks(member.model) == 0 and _hooks(teacher.models[0]) == 0
    # The composed value is the sum of the pure losses on the same features.
    with torch.no_grad():
        t_logits, t_feats = teacher(images)
        with tap_features(member.model, ["features.relu1", "features.relu2", "classifier.relu1"]) as f:
            logits = member.model(images)
        expected = (nn.functional.cross_entropy(logits, labels) + fitnet_loss(adapter(f["features.relu2"]), t_feats["features.relu2"])
                    + 100.0 * attention_transfer_loss(f["features.relu1"], t_feats["features.relu1"])
                    + rkd_loss(f["classifier.relu1"], t_feats["classifier.relu1"]))
        got = member.loss_fn(StepInputs(logits, labels, t_logits, dict(f), t_feats))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # MLP student guided by a conv hint: a Linear adapter on the flattened features.
    mlp = _member("m", [{"name": "fitnet", "layers": {"fc1": "features.relu2"}}], teacher, spec=ModelSpec(family="mlp", hidden=[24]))
    assert isinstance(mlp.loss_fn.adapters["0_0"].proj, nn.Linear) and mlp.loss_fn.adapters["0_0"].proj.out_features == 16 * 4 * 4


def test_dml_members_learn_from_each_others_detached_predictions():
    a, b = _member("a", ["ce", "dml"], None), _member("b", ["ce", "dml"], None)
    base = _member("base", "ce", None)
    images, labels = _batch()
    with torch.no_grad():
        la, lb = a.model(images), b.model(images)
    expected_a = nn.functional.cross_entropy(la, labels) + mutual_learning_loss(la, [lb])
    losses = step_members([a, b, base], images, labels, None, None)
    assert losses["a"].item() == pytest.approx(expected_a.item(), rel=1e-6)
    assert losses["base"].item() == pytest.approx(nn.functional.cross_entropy(la, labels).item(), rel=1e-6)  # same init, plain ce


def test_config_checks_layers_before_ray():
    data = SimpleNamespace(input_shape=SHAPE, num_classes=10)

    def job(loss, student=STUDENT):
        return validate_config({"teachers": [TeacherConfig(**TEACHER.model_dump()).model_dump()], "teacher_mode": "online",
                                "students": [StudentConfig(**student.model_dump(), loss=loss).model_dump()]})

    check_feature_layers(job([{"name": "at", "layers": {"features.relu1": "features.relu2"}}]), data)
    with pytest.raises(ConfigError, match=r"^students.0.loss.0 student: no module 'features.relu9' \(modules: features, "):
        check_feature_layers(job([{"name": "fitnet", "layers": {"features.relu9": "features.relu2"}}]), data)
    with pytest.raises(ConfigError, match=r"^students.0.loss.1 teacher: no module 'x'"):
        check_feature_layers(job(["ce", {"name": "rkd", "layers": {"fc1": "x"}}], ModelSpec(family="mlp", hidden=[8])), data)
    with pytest.raises(ConfigError, match=r"^students.0.loss.0: attention transfer needs \(C, H, W\) feature maps on both sides"):
        check_feature_layers(job([{"name": "at", "layers": {"fc1": "features.relu2"}}], ModelSpec(family="mlp", hidden=[8])), data)


def test_checkpoint_keeps_adapters_apart_from_the_student(tmp_path):
    """A restarted worker resumes the FitNets adapters too; the saved student itself carries none."""
    from orchestrator.train.train_loop import STATE_FILE, save_state

    teacher = _teacher()
    member = _member("s", ["ce", {"name": "fitnet", "layers": {"features.relu2": "features.relu2"}}], teacher)
    images, labels = _batch()
    step_members([member], images, labels, None, teacher)
    save_state([member], 0, tmp_path)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert not any("adapter" in key for key in state["models"]["s"])
    assert set(state["objectives"]["s"]) == {"adapters.1_0.proj.weight"}
    fresh = _member("s", ["ce", {"name": "fitnet", "layers": {"features.relu2": "features.relu2"}}], teacher)
    fresh.loss_fn.load_state_dict(state["objectives"]["s"])
    fresh.optimizer.load_state_dict(state["optimizers"]["s"])  # same parameter list: student, then adapters
    assert torch.equal(fresh.loss_fn.adapters["1_0"].proj.weight, member.loss_fn.adapters["1_0"].proj.weight)


def test_dkd_warm_up_ramps_its_weight_over_the_first_epochs():
    s, y, t = _logits()
    terms = parse_loss([{"name": "ce"}, {"name": "dkd", "weight": 2.0, "warmup_epochs": 4}])
    objective = Objective(terms, KD)
    full = 2.0 * dkd_loss(s, y, t, temperature=4.0, tckd_weight=1.0, nckd_weight=8.0)
    ce = nn.functional.cross_entropy(s, y)
    for epoch, share in ((0, 0.25), (1, 0.5), (3, 1.0), (9, 1.0)):
        objective.epoch = epoch
        assert objective(StepInputs(s, y, t)).item() == pytest.approx((ce + share * full).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="kd does not take 'warmup_epochs'"):
        validate_config({"students": [{"name": "s", "loss": [{"name": "kd", "warmup_epochs": 3}]}]})


def test_dml_peers_start_apart_while_a_student_starts_where_its_twin_does():
    from orchestrator.train.train_loop import initial_seeds

    spec = ModelSpec(family="mlp", hidden=[8])
    members = [MemberConfig(name=n, role=r, spec=spec, loss=parse_loss(l) if isinstance(l, list) else l)
               for n, r, l in [("kd", "student", "kd"), ("kd-baseline", "baseline", "ce"), ("a", "student", ["ce", "dml"]),
                               ("b", "student", ["ce", "dml"])]]
    seeds = initial_seeds(5, members)
    # Equal starts and equal batches keep two peers equal, and the mutual term at 0: DML would be CE.
    assert seeds == {"kd": 5, "kd-baseline": 5, "a": 5, "b": 6}
