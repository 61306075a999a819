"""Model families, checkpoint loading (safely), output-size checks, size and fingerprint helpers."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from orchestrator.config import ConfigError, ModelSpec
from orchestrator.train.models import (
    build_model,
    check_output_size,
    count_params,
    load_state_dict_file,
    load_weights,
    model_size_mb,
    state_dict_fingerprint,
)

SHAPES = [((1, 28, 28), 10), ((1, 8, 8), 10), ((3, 32, 32), 100)]
# sha256-based digest of a fixed two-tensor dict, computed once and pinned.
PINNED_FINGERPRINT = "cc804548cad62ebb"
HINTON_TEACHER = ModelSpec(family="mlp", hidden=[1200, 1200], dropout=0.5, input_dropout=0.2)


@pytest.fixture
def tiny_module(tmp_path, monkeypatch) -> str:
    """An importable module `kd_test_tiny_models` with a small model class, removed afterwards."""
    name = "kd_test_tiny_models"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class TinyNet(nn.Sequential):
                def __init__(self, in_features, out_features):
                    super().__init__(nn.Flatten(), nn.Linear(in_features, out_features))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


# ---- families ----


@pytest.mark.parametrize(("input_shape", "num_classes"), SHAPES)
@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(family="mlp"),
        ModelSpec(family="mlp", hidden=[], dropout=0.3),
        ModelSpec(family="cnn"),
        ModelSpec(family="cnn", channels=[8, 8, 8, 8], hidden=[], dropout=0.1),
    ],
    ids=["mlp", "mlp-linear", "cnn", "cnn-deep"],
)
def test_mlp_and_cnn_build_and_give_logits(spec, input_shape, num_classes):
    model = build_model(spec, input_shape, num_classes)
    assert model.training
    check_output_size(model, input_shape, num_classes, where="test")
    assert model.training  # check_output_size restores the mode
    assert model(torch.randn(3, *input_shape)).shape == (3, num_classes)


# torchvision models are slow on 2 CPU cores: two shapes each, one forward.
@pytest.mark.parametrize(
    ("arch", "input_shape", "num_classes"),
    [
        ("resnet18", (1, 28, 28), 10),
        ("resnet18", (3, 32, 32), 100),
        ("mobilenet_v3_small", (1, 8, 8), 10),
        ("mobilenet_v3_small", (3, 32, 32), 100),
    ],
)
def test_torchvision_builds_and_gives_logits(arch, input_shape, num_classes):
    model = build_model(ModelSpec(family=f"torchvision:{arch}"), input_shape, num_classes)
    check_output_size(model, input_shape, num_classes, where="test")


def test_hinton_teacher_param_count_and_layers():
    model = build_model(HINTON_TEACHER, (1, 28, 28), 10)
    assert count_params(model) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.2, 0.5, 0.5]  # input, then after each hidden layer
    assert [name for name, _ in model.named_children()][:3] == ["flatten", "input_drop", "fc1"]


def test_cnn_has_named_features_and_classifier_for_hooks():
    model = build_model(ModelSpec(family="cnn", channels=[4, 8], hidden=[16]), (1, 28, 28), 10)
    assert isinstance(model.get_submodule("features"), nn.Sequential)
    assert isinstance(model.get_submodule("classifier"), nn.Sequential)
    assert isinstance(model.get_submodule("features.conv2"), nn.Conv2d)
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = output.shape

    model.get_submodule("features").register_forward_hook(hook)
    model(torch.zeros(2, 1, 28, 28))
    assert seen["shape"] == (2, 8, 7, 7)


def test_cnn_stops_pooling_at_one_pixel():
    model = build_model(ModelSpec(family="cnn", channels=[4] * 5, hidden=[]), (1, 8, 8), 10)
    pools = [m for m in model.get_submodule("features") if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3  # 8 -> 4 -> 2 -> 1, then no more


def test_resnet_gets_cifar_stem_on_small_images_only():
    small = build_model(ModelSpec(family="torchvision:resnet18"), (1, 28, 28), 10)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    large = build_model(ModelSpec(family="torchvision:resnet18"), (3, 64, 64), 10)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    gray = build_model(ModelSpec(family="torchvision:resnet18"), (1, 64, 64), 10)
    assert gray.conv1.in_channels == 1 and gray.conv1.kernel_size == (7, 7)


def test_torchvision_first_conv_adapted_to_input_channels():
    model = build_model(ModelSpec(family="torchvision:mobilenet_v3_small"), (1, 28, 28), 10)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1 and first.stride == (2, 2)


def test_torchvision_kwargs_pass_through():
    model = build_model(ModelSpec(family="torchvision:mobilenet_v3_small", kwargs={"dropout": 0.5}), (3, 32, 32), 10)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec(family="torchvision:resnet999"), r"unknown torchvision classification model 'resnet999'.*list_models"),
        (ModelSpec(family="torchvision:fasterrcnn_resnet50_fpn"), "unknown torchvision classification model"),
        (ModelSpec(family="torchvision:resnet18", kwargs={"weights": "IMAGENET1K_V1"}), "would download"),
        (ModelSpec(family="torchvision:resnet18", kwargs={"num_classes": 5}), "num_classes is set by the dataset"),
        (ModelSpec(family="torchvision:resnet18", kwargs={"bogus": 1}), "cannot construct"),
        (ModelSpec(family="import:no_such_module_kd:Net"), r"cannot import 'no_such_module_kd' \(ModuleNotFoundError"),
        (ModelSpec(family="import:torch.nn:NoSuchLayer"), "has no attribute 'NoSuchLayer'"),
        (ModelSpec(family="import:torch.nn:Linear", kwargs={"bogus": 1}), r"Linear\(\*\*\{'bogus': 1\}\) failed"),
        (ModelSpec(family="import:collections:OrderedDict"), "not an nn.Module"),
        (ModelSpec(family="import:torch.nn"), r"expected import:<module>:<Class>"),
        (ModelSpec.model_construct(family="rnn", kwargs={}, weights=None), "unknown model family 'rnn'"),
    ],
)
def test_build_model_errors_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_model(spec, (1, 28, 28), 10)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("input_shape", "num_classes"), [((1, 28), 10), ((1, 0, 28), 10), ((1, 28, 28), 0)])
def test_build_model_rejects_bad_shapes(input_shape, num_classes):
    with pytest.raises(ConfigError, match="input shape|num_classes"):
        build_model(ModelSpec(), input_shape, num_classes)


# ---- import: family, weights and output-size checks ----


def test_import_family_builds_and_loads_weights(tiny_module, tmp_path):
    family = f"import:{tiny_module}:TinyNet"
    kwargs = {"in_features": 4, "out_features": 10}
    model = build_model(ModelSpec(family=family, kwargs=kwargs), (1, 1, 4), 10)
    check_output_size(model, (1, 1, 4), 10, where="teacher t")
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = build_model(ModelSpec(family=family, kwargs=kwargs, weights=str(path)), (1, 1, 4), 10)
    assert state_dict_fingerprint(loaded.state_dict()) == state_dict_fingerprint(model.state_dict())


def test_check_output_size_names_class_mismatch(tiny_module):
    spec = ModelSpec(family=f"import:{tiny_module}:TinyNet", kwargs={"in_features": 4, "out_features": 3})
    model = build_model(spec, (1, 1, 4), 10)
    with pytest.raises(ConfigError, match=r"^teacher t: model outputs 3 classes but the dataset has 10$"):
        check_output_size(model, (1, 1, 4), 10, where="teacher t")


def test_check_output_size_reports_models_that_cannot_run_and_restores_mode():
    model = build_model(ModelSpec(family="mlp", dropout=0.5), (1, 28, 28), 10)
    with pytest.raises(ConfigError, match=r"^s: model cannot run on inputs of shape \(1, 8, 8\) \(RuntimeError"):
        check_output_size(model, (1, 8, 8), 10, where="s")
    assert model.training
    # torch.nn.Linear on (N, 1, 1, 4) keeps the spatial dims: not a logits matrix.
    linear = ModelSpec(family="import:torch.nn:Linear", kwargs={"in_features": 4, "out_features": 10})
    spatial = build_model(linear, (1, 1, 4), 10)
    with pytest.raises(ConfigError, match=r"output has shape \(2, 1, 1, 10\)"):
        check_output_size(spatial, (1, 1, 4), 10, where="s")


# ---- checkpoints ----


class _PickledCode:
    """Any custom class: unpickling it would import and run code from this module."""

    ran = False

    def __setstate__(self, state):
        type(self).ran = True


def test_load_state_dict_file_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _PickledCode(), "w": torch.zeros(2)}, path)
    with pytest.raises(ConfigError) as info:
        load_state_dict_file(str(path))
    assert str(info.value) == f"checkpoint {path} is not a plain state dict (refusing to unpickle code)"
    assert not _PickledCode.ran


def test_load_state_dict_file_layouts_and_errors(tmp_path):
    sd = build_model(ModelSpec(hidden=[8]), (1, 2, 2), 3).state_dict()
    for i, payload in enumerate([sd, {"model": sd}, {"state_dict": sd, "epoch": 3}]):
        torch.save(payload, tmp_path / f"{i}.pt")
        loaded = load_state_dict_file(str(tmp_path / f"{i}.pt"))
        assert state_dict_fingerprint(loaded) == state_dict_fingerprint(sd)
    with pytest.raises(ConfigError, match=f"^checkpoint not found: {tmp_path / 'missing.pt'}$"):
        load_state_dict_file(str(tmp_path / "missing.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="does not hold a state dict"):
        load_state_dict_file(str(tmp_path / "list.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_state_dict_file(str(tmp_path / "junk.pt"))


def test_wrong_checkpoint_names_the_mismatch(tmp_path):
    ten = build_model(ModelSpec(hidden=[32]), (1, 28, 28), 10)
    five = build_model(ModelSpec(hidden=[32]), (1, 28, 28), 5)
    with pytest.raises(ConfigError) as info:
        load_weights(five, ten.state_dict(), where="teacher big")
    assert str(info.value) == (
        "teacher big: checkpoint does not fit the model: "
        "'out.weight' has shape (10, 32) in the checkpoint but (5, 32) in the model (and 1 more)"
    )
    partial = {k: v for k, v in five.state_dict().items() if k != "fc1.bias"}
    with pytest.raises(ConfigError, match=r"missing key 'fc1.bias'$"):
        load_weights(five, partial, where="x")
    extra = {**five.state_dict(), "head.weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"unexpected key 'head.weight'$"):
        load_weights(five, extra, where="x")
    path = tmp_path / "ten.pt"
    torch.save(ten.state_dict(), path)
    with pytest.raises(ConfigError, match="^model mlp: checkpoint does not fit the model: 'out.weight'"):
        build_model(ModelSpec(hidden=[32], weights=str(path)), (1, 28, 28), 5)


# ---- sizes and fingerprints ----


def test_count_params_and_model_size_are_plausible():
    model = build_model(HINTON_TEACHER, (1, 28, 28), 10)
    n = count_params(model)
    size = model_size_mb(model)
    assert n * 4 / 1e6 <= size <= n * 4 / 1e6 * 1.01 + 0.01  # float32 payload plus a little framing
    small = build_model(ModelSpec(hidden=[16]), (1, 28, 28), 10)
    assert count_params(small) == 784 * 16 + 16 + 16 * 10 + 10
    assert model_size_mb(small) < size


def test_fingerprint_is_pinned_and_stable_across_save_load(tmp_path):
    # A literal: proves the digest depends on contents only, not on the process.
    fixed = {"b": torch.tensor(7), "a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert state_dict_fingerprint(fixed) == PINNED_FINGERPRINT
    assert state_dict_fingerprint(dict(reversed(list(fixed.items())))) == PINNED_FINGERPRINT

    torch.manual_seed(0)
    model = build_model(ModelSpec(family="cnn", channels=[4], hidden=[8]), (1, 8, 8), 10)
    before = state_dict_fingerprint(model.state_dict())
    assert len(before) == 16 and int(before, 16) >= 0
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert state_dict_fingerprint(load_state_dict_file(str(tmp_path / "m.pt"))) == before

    with torch.no_grad():
        model.classifier.fc1.weight[0, 0] += 1e-3
    assert state_dict_fingerprint(model.state_dict()) != before


def test_fingerprint_sees_dtype_shape_and_key_changes():
    base = {"w": torch.arange(6, dtype=torch.float32)}
    fp = state_dict_fingerprint(base)
    assert state_dict_fingerprint({"w": base["w"].reshape(2, 3)}) != fp
    assert state_dict_fingerprint({"w": base["w"].double()}) != fp
    assert state_dict_fingerprint({"v": base["w"]}) != fp
    assert state_dict_fingerprint({"w": base["w"].to(torch.bfloat16)}) != fp  # no numpy dtype needed

