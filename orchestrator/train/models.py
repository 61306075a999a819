"""Model construction from a `ModelSpec`, checkpoint loading, and size/fingerprint helpers.

Families:
    mlp                      Flatten -> [Dropout] -> (Linear, ReLU, [Dropout])* -> Linear.
                             Hinton et al. (2015), arXiv:1503.02531, use a 784-1200-1200-10
                             teacher with dropout 0.5 (0.2 on the input): hidden [1200, 1200].
    cnn                      `features` (Conv3x3-BN-ReLU-[MaxPool])* -> `pool` -> `classifier`.
    torchvision:<arch>       any classification model of torchvision.models, random init.
    import:<module>:<Class>  Class(**kwargs) from an importable module.

Images are (C, H, W); models map (N, C, H, W) float -> (N, num_classes) logits.
Weights are never downloaded: `weights` is only ever a local state-dict file.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from orchestrator.config import ConfigError, ModelSpec

__all__ = [
    "build_model", "check_output_size", "count_params", "load_state_dict_file",
    "load_weights", "model_size_mb", "state_dict_fingerprint",
]  # fmt: skip

# Keep a flattened feature map to at most this many cells per channel, so the first
# classifier Linear stays small even on large images while keeping coarse layout.
_CNN_POOLED_SIDE = 4
# Below this side length ImageNet stems (7x7 stride-2 conv + maxpool) throw away
# most of the image; see `_adapt_torchvision`.
_SMALL_IMAGE_SIDE = 64
_WEIGHT_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _check_shape(input_shape: tuple[int, int, int], num_classes: int) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ConfigError(f"input shape must be three positive ints (C, H, W), got {input_shape!r}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    return shape  # type: ignore[return-value]


def _dense_layers(in_features: int, hidden: list[int], dropout: float) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = []
    for i, width in enumerate(hidden, start=1):
        layers += [(f"fc{i}", nn.Linear(in_features, width)), (f"relu{i}", nn.ReLU())]
        if dropout > 0:
            layers.append((f"drop{i}", nn.Dropout(dropout)))
        in_features = width
    return layers


def _build_mlp(spec: ModelSpec, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = shape
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    if spec.input_dropout > 0:
        layers.append(("input_drop", nn.Dropout(spec.input_dropout)))
    layers += _dense_layers(c * h * w, spec.hidden, spec.dropout)
    layers.append(("out", nn.Linear(spec.hidden[-1] if spec.hidden else c * h * w, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def _build_cnn(spec: ModelSpec, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = shape
    features: list[tuple[str, nn.Module]] = []
    in_ch = c
    for i, width in enumerate(spec.channels, start=1):
        features += [
            (f"conv{i}", nn.Conv2d(in_ch, width, kernel_size=3, padding=1, bias=False)),  # BN has the bias
            (f"bn{i}", nn.BatchNorm2d(width)),
            (f"relu{i}", nn.ReLU()),
        ]
        # Pool only while there is something left to pool, so deep stacks still run on 8x8 digits.
        if min(h, w) >= 2:
            features.append((f"pool{i}", nn.MaxPool2d(2)))
            h, w = h // 2, w // 2
        in_ch = width
    ph, pw = min(h, _CNN_POOLED_SIDE), min(w, _CNN_POOLED_SIDE)
    classifier: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    classifier += _dense_layers(in_ch * ph * pw, spec.hidden, spec.dropout)
    classifier.append(("out", nn.Linear(spec.hidden[-1] if spec.hidden else in_ch * ph * pw, num_classes)))
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(OrderedDict(features)),
            # Identity on maps already <= 4x4 (digits, CIFAR after 3 pools); bounds size otherwise.
            pool=nn.AdaptiveAvgPool2d((ph, pw)),
            classifier=nn.Sequential(OrderedDict(classifier)),
        )
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _adapt_torchvision(model: nn.Module, shape: tuple[int, int, int], family: str) -> nn.Module:
    """Fit an ImageNet-shaped torchvision model to C input channels and small images.

    ResNets on images smaller than 64 px get the usual CIFAR stem (He et al. 2016,
    arXiv:1512.03385, Section 4.2): a 3x3 stride-1 first conv and no max-pool, so a
    32x32 image is not cut to 8x8 before the first residual block. Other
    architectures keep their stem; `check_output_size` reports any that cannot run
    on the input. For C != 3 the first Conv2d is replaced by a freshly initialised
    one with C input channels and otherwise the same geometry.
    """
    from torchvision.models import ResNet

    c, h, w = shape
    if isinstance(model, ResNet) and min(h, w) < _SMALL_IMAGE_SIDE:
        model.conv1 = nn.Conv2d(c, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        # Same init torchvision's ResNet gives its convs.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        if c != 3:
            raise ConfigError(f"model {family}: no Conv2d found to adapt to {c} input channels")
        return model
    name, conv = first
    if conv.in_channels != c:
        if conv.groups != 1:
            raise ConfigError(f"model {family}: first conv {name!r} is grouped; cannot adapt to {c} input channels")
        new = nn.Conv2d(
            c, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        )  # fmt: skip
        _set_submodule(model, name, new)
    return model


def _build_torchvision(spec: ModelSpec, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    import torchvision

    arch = spec.family.split(":", 1)[1]
    known = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if arch not in known:
        raise ConfigError(
            f"model {spec.family}: unknown torchvision classification model {arch!r} "
            f"(list them with torchvision.models.list_models(module=torchvision.models))"
        )
    asked = [k for k in _WEIGHT_KWARGS if spec.kwargs.get(k)]
    if asked:
        raise ConfigError(
            f"model {spec.family}: kwargs {', '.join(asked)} would download pretrained weights; "
            "use `weights: <path to a local state dict>` instead"
        )
    if "num_classes" in spec.kwargs:
        raise ConfigError(f"model {spec.family}: num_classes is set by the dataset, remove it from kwargs")
    kwargs = {k: v for k, v in spec.kwargs.items() if k not in _WEIGHT_KWARGS}
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {spec.family}: cannot construct with kwargs {kwargs} ({_first_line(exc)})") from None
    return _adapt_torchvision(model, shape, spec.family)


def _build_import(spec: ModelSpec) -> nn.Module:
    parts = spec.family.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ConfigError(f"model {spec.family}: expected import:<module>:<Class>")
    _, module_name, attr_path = parts
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is a config problem
        raise ConfigError(f"model {spec.family}: cannot import {module_name!r} ({_first_line(exc)})") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"model {spec.family}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"model {spec.family}: {attr_path!r} is not callable")
    try:
        model = obj(**spec.kwargs)
    except Exception as exc:
        raise ConfigError(f"model {spec.family}: {attr_path}(**{spec.kwargs}) failed ({_first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec.family}: {attr_path} returned a {type(model).__name__}, not an nn.Module")
    return model


def build_model(spec: ModelSpec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A freshly built model for images of `input_shape` (C, H, W) and `num_classes` classes.

    If `spec.weights` is a path, that state dict is loaded strictly (any family).
    Returns a module in training mode mapping (N, C, H, W) -> (N, num_classes).
    """
    shape = _check_shape(input_shape, num_classes)
    family = spec.family
    if family == "mlp":
        model = _build_mlp(spec, shape, num_classes)
    elif family == "cnn":
        model = _build_cnn(spec, shape, num_classes)
    elif family.startswith("torchvision:"):
        model = _build_torchvision(spec, shape, num_classes)
    elif family.startswith("import:"):
        model = _build_import(spec)
    else:
        raise ConfigError(f"unknown model family {family!r} (mlp, cnn, torchvision:<arch>, import:<module>:<Class>)")
    if spec.weights:
        load_weights(model, load_state_dict_file(spec.weights), where=f"model {family}")
    return model


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, on CPU, without ever unpickling code.

    Accepts a bare state dict or a dict holding one under "model" or "state_dict"
    (common training-script layouts).
    """
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint is data; a pickled object could run code on load.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports both refused globals/reduce calls and byte garbage as
        # UnpicklingError; only an unknown opcode means the stream itself is broken.
        if "Unsupported operand" not in str(exc):
            raise ConfigError(f"checkpoint {path} is not a plain state dict (refusing to unpickle code)") from None
        raise ConfigError(f"checkpoint {path} cannot be read (not a torch.save file)") from None
    except Exception as exc:
        raise ConfigError(f"checkpoint {path} cannot be read ({_first_line(exc)})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ConfigError(f"checkpoint {path} does not hold a state dict of named tensors")
    return obj


def _first_mismatch(model: nn.Module, state_dict: dict) -> str:
    expected = model.state_dict()
    problems = [f"missing key {k!r}" for k in expected if k not in state_dict]
    problems += [f"unexpected key {k!r}" for k in state_dict if k not in expected]
    problems += [
        f"{k!r} has shape {tuple(v.shape)} in the checkpoint but {tuple(expected[k].shape)} in the model"
        for k, v in state_dict.items()
        if k in expected and torch.is_tensor(v) and v.shape != expected[k].shape
    ]
    if not problems:
        return "load_state_dict refused it"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def load_weights(model: nn.Module, state_dict: dict, *, where: str) -> None:
    """Strictly load `state_dict` into `model`; ConfigError naming the first mismatch."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        # load_state_dict's own message is many lines; diagnose it ourselves, but only
        # after it failed, so modules with custom loading hooks are never rejected early.
        raise ConfigError(f"{where}: checkpoint does not fit the model: {_first_mismatch(model, state_dict)}") from exc


def check_output_size(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, *, where: str) -> None:
    """Run a zero batch (2, C, H, W) through `model`; ConfigError unless it gives (2, num_classes).

    Eval mode (BatchNorm must not need batch statistics) and no_grad; the model's
    previous training mode is restored.
    """
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), device=device, dtype=dtype))
    except Exception as exc:
        shape = tuple(input_shape)
        raise ConfigError(f"{where}: model cannot run on inputs of shape {shape} ({_first_line(exc)})") from None
    finally:
        model.train(was_training)
    if not torch.is_tensor(out):
        raise ConfigError(f"{where}: model returns a {type(out).__name__}, not a logits tensor")
    if out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape)
        raise ConfigError(f"{where}: model output has shape {shape} for a batch of 2, expected (2, {num_classes})")
    if out.shape[1] != num_classes:
        raise ConfigError(f"{where}: model outputs {out.shape[1]} classes but the dataset has {num_classes}")


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; shared ones counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """Size of the serialized state dict (what a checkpoint costs on disk) in MB of 1e6 bytes."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 1e6


def state_dict_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """First 16 hex digits of a sha256 over every (key, dtype, shape, raw bytes), keys sorted.

    Depends only on tensor contents, not on pickling, device or dict order, so it is
    stable across processes and across save/load.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not torch.is_tensor(tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(tensor).__name__}, not a tensor")
        # reshape(-1) first: view(uint8) cannot reinterpret a 0-dim tensor. Bytes are in
        # native order (little-endian on every platform we run on).
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header = f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{len(raw)}\0".encode()
        digest.update(len(header).to_bytes(8, "little") + header + raw)
    return digest.hexdigest()[:16]
