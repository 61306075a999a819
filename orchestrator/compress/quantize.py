"""After distillation: int8 quantization, size and CPU latency measurement, export, teacher pruning.

Quantization (post-training, CPU, the `x86` engine = fbgemm + oneDNN kernels):
    dynamic   torch.ao.quantization.quantize_dynamic on every nn.Linear: int8 weights,
              activations quantized on the fly per batch. Used for models without
              convolutions (the mlp family) and as the fallback.
    static_fx FX graph mode (prepare_fx -> calibrate on train images -> convert_fx) with
              the default x86 QConfigMapping: int8 weights and activations, Conv-BN-ReLU
              fused. Tried first for any model with a Conv2d; if tracing or conversion
              fails the model is quantized dynamically and the reason is recorded.
torch 2.14 marks torch.ao.quantization deprecated in favour of torchao (eager `quantize_`
and pt2e). torchao's pt2e path produces q/dq graphs that only become int8 kernels after
torch.compile lowering (a C++ toolchain at run time); torch.ao still ships and runs real
int8 CPU kernels in eager mode, so it is what we use. Its DeprecationWarnings are silenced here.

Sizes are files written to disk and measured with os.path.getsize, in MB of 1e6 bytes:
`size_mb_disk` is torch.save(state_dict) for float and quantized models alike (a quantized
state dict loads into the same architecture after the same quantize call), and
`size_mb_torchscript` is the self-contained TorchScript file (code + weights).
Latency is the median wall time of a forward pass at batch 1, throughput 256 / the median
time of a batch of 256, warm-up passes excluded, with torch's intra-op threads fixed
(`threads`, default 1: shared machines make multi-thread timings noisy); models compared
in one report are timed interleaved, round by round (`timing`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

QUANT_ENGINE = "x86"
TORCHSCRIPT_ATOL = 1e-5  # same kernels, same order: a traced model must reproduce eager output
ONNX_ATOL = 1e-4  # onnxruntime's float32 kernels sum in another order than torch's
ONNX_RTOL = 1e-4
LATENCY_REPEATS, LATENCY_WARMUP = 200, 20  # batch 1
THROUGHPUT_BATCH, THROUGHPUT_REPEATS, THROUGHPUT_WARMUP = 256, 20, 3  # warm-up per round
TIMING_ROUNDS = 5
K = TypeVar("K")


@contextlib.contextmanager
def _quiet():
    """torch.ao quantization and torch.jit warn that they are deprecated in torch 2.14; both work."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        yield


@contextlib.contextmanager
def torch_threads(n: int):
    """Fix torch's intra-op thread count for a measurement, then restore it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------- quantization


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear replaced by a dynamically quantized int8 Linear."""
    torch.backends.quantized.engine = QUANT_ENGINE
    with _quiet():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def quantize_static_int8(model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 256) -> nn.Module:
    """FX graph mode static int8 copy of `model`, observers calibrated on `calibration` (normalised float images)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = QUANT_ENGINE
    with _quiet():
        float_copy = copy.deepcopy(model).eval()
        prepared = prepare_fx(float_copy, get_default_qconfig_mapping(QUANT_ENGINE), example_inputs=(calibration[:1],))
        with torch.no_grad():
            for start in range(0, len(calibration), batch_size):
                prepared(calibration[start : start + batch_size])
        return convert_fx(prepared)


def quantize_int8(model: nn.Module, calibration: torch.Tensor) -> tuple[nn.Module, str]:
    """(int8 model, method): static FX for models with convolutions, else (and on failure) dynamic.

    method is "static_fx", "dynamic", or "dynamic (static_fx failed: <reason>)".
    """
    if has_conv(model):
        try:
            quantized = quantize_static_int8(model, calibration)
            with torch.no_grad():
                quantized(calibration[:2])  # conversion can succeed and the first forward still fail
            return quantized, "static_fx"
        except Exception as exc:  # any FX tracing / conversion failure: fall back, say why
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}" if str(exc).strip() else type(exc).__name__
            return quantize_dynamic_int8(model), f"dynamic (static_fx failed: {reason})"
    return quantize_dynamic_int8(model), "dynamic"


# ---------------------------------------------------------------------------------------------- measurement


def save_state_dict(model: nn.Module, path: str | Path) -> float:
    """torch.save the state dict to `path`; returns its size on disk in MB (1e6 bytes)."""
    torch.save(model.state_dict(), path)
    return os.path.getsize(path) / 1e6


def save_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path) -> float:
    """Trace `model` on `example`, save it to `path`; returns its size on disk in MB (1e6 bytes)."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model.eval(), example)
        torch.jit.save(traced, str(path))
    return os.path.getsize(path) / 1e6


def forward_times(model: nn.Module, x: torch.Tensor, *, repeats: int, warmup: int) -> list[float]:
    """Wall seconds of `repeats` forward passes of `x` after `warmup` untimed ones."""
    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    return times


def timing(models: Mapping[K, nn.Module], images: torch.Tensor, *, threads: int = 1, rounds: int = TIMING_ROUNDS) -> dict[K, dict[str, float]]:
    """Per model: latency_ms_b1, latency_ms_b256 (one batch) and throughput_b256 (images/s), medians, warm-up excluded.

    Interleaved: each of `rounds` rounds times every model in turn (LATENCY_REPEATS / rounds
    batch-1 passes, THROUGHPUT_REPEATS / rounds batch-256 passes, each after its own short
    warm-up), so a burst of load on a shared machine lands on all models alike instead of
    on whichever one was being timed. Medians are over all rounds.
    """
    batch = images[:THROUGHPUT_BATCH]
    if len(batch) < THROUGHPUT_BATCH:  # small test sets: cycle the images up to a full batch
        batch = batch.repeat((THROUGHPUT_BATCH + len(batch) - 1) // len(batch), 1, 1, 1)[:THROUGHPUT_BATCH]
    one: dict[K, list[float]] = {name: [] for name in models}
    full: dict[K, list[float]] = {name: [] for name in models}
    with torch_threads(threads):
        for _ in range(rounds):
            for name, model in models.items():
                one[name] += forward_times(model, images[:1], repeats=max(1, LATENCY_REPEATS // rounds), warmup=max(1, LATENCY_WARMUP // rounds))
                full[name] += forward_times(model, batch, repeats=max(1, THROUGHPUT_REPEATS // rounds), warmup=THROUGHPUT_WARMUP)
    result = {}
    for name in models:
        b1, b256 = statistics.median(one[name]), statistics.median(full[name])
        result[name] = {"latency_ms_b1": b1 * 1e3, "latency_ms_b256": b256 * 1e3, "throughput_b256": THROUGHPUT_BATCH / b256}
    return result


def measure(model: nn.Module, test_inputs: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
            *, params: int, example: torch.Tensor, threads: int = 1, timed: bool = True, eval_batch: int = 2048) -> dict[str, float]:  # fmt: skip
    """Every figure of one model, measured now: sizes on disk, test accuracy, agreement with the teacher, and
    (unless `timed` is False, for callers that time several models together with `timing`) latency and throughput.

    `test_inputs` are normalised float images; `params` is passed in because a quantized
    model's packed weights are not nn.Parameters (the count of its float source is used).
    """
    with torch.inference_mode():
        logits = torch.cat([model(test_inputs[s : s + eval_batch]).float() for s in range(0, len(test_inputs), eval_batch)])
    predictions = logits.argmax(dim=1)
    figures: dict[str, float] = {"params": params, "test_accuracy": float((predictions == labels).float().mean())}
    if teacher_logits is not None:
        figures["agreement"] = float((predictions == teacher_logits.argmax(dim=1)).float().mean())
    with tempfile.TemporaryDirectory(prefix="kd-size-") as tmp:
        figures["size_mb_disk"] = save_state_dict(model, Path(tmp) / "state_dict.pt")
        figures["size_mb_torchscript"] = save_torchscript(model, example, Path(tmp) / "model.torchscript.pt")
    if timed:
        figures |= timing({"model": model}, test_inputs, threads=threads)["model"]
    return figures


# ---------------------------------------------------------------------------------------------- export


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def export_torchscript(model: nn.Module, check: torch.Tensor, path: str | Path, *, reference: torch.Tensor | None = None) -> dict:
    """Trace to `path`, reload with torch.jit.load, compare with `reference` (default: eager output) on `check`."""
    with torch.inference_mode():
        expected = model.eval()(check) if reference is None else reference
    size = save_torchscript(model, check[:1], path)
    with _quiet(), torch.inference_mode():
        got = torch.jit.load(str(path), map_location="cpu")(check)
    diff = _max_abs_diff(got, expected)
    return {"format": "torchscript", "file": Path(path).name, "size_mb": size, "max_abs_diff": diff, "atol": TORCHSCRIPT_ATOL, "ok": diff <= TORCHSCRIPT_ATOL}


def onnx_available() -> str | None:
    """None when ONNX export can run here, else why not."""
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if not _importable(name)]
    return f"ONNX export skipped: {', '.join(missing)} not installed (pip install -e '.[test]')" if missing else None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def export_onnx(model: nn.Module, check: torch.Tensor, path: str | Path) -> dict:
    """torch.onnx.export (the torch.export-based exporter, dynamic batch axis, weights inside the file) to `path`, reload it
    with onnxruntime (CPU) and compare with eager output on `check`: |ort - torch| <= atol + rtol * |torch|."""
    skipped = onnx_available()
    if skipped:
        return {"format": "onnx", "skipped": skipped, "ok": None}
    import onnxruntime

    model.eval()
    with torch.inference_mode():
        expected = model(check)
    with _quiet(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        torch.onnx.export(
            model, (check[:1],), str(path), input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,  # one self-contained file
        )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": check.numpy()})[0])
    diff = _max_abs_diff(got, expected)
    bound = ONNX_ATOL + ONNX_RTOL * float(expected.abs().max())
    return {
        "format": "onnx", "file": Path(path).name, "size_mb": os.path.getsize(path) / 1e6, "max_abs_diff": diff,
        "atol": ONNX_ATOL, "rtol": ONNX_RTOL, "ok": diff <= bound, "opset": _onnx_opset(path),
    }  # fmt: skip


def _onnx_opset(path: str | Path) -> int | None:
    import onnx

    opsets = [o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")]
    return opsets[0] if opsets else None


# ---------------------------------------------------------------------------------------------- pruning


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear and Conv2d except the last Linear (the class logits are left whole)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    last_linear = max((i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
    return [layer for i, layer in enumerate(layers) if i != last_linear]


def prune_model(model: nn.Module, amount: float, *, structured: bool = False) -> nn.Module:
    """Magnitude-prune `model` in place with torch.nn.utils.prune and make it permanent (no masks left).

    unstructured: the `amount` fraction of weights with the smallest |w| in each layer set to 0
    (l1_unstructured). structured: the `amount` fraction of output rows / filters with the
    smallest L1 norm set to 0 (ln_structured, n=1, dim=0). Shapes do not change, so the
    float checkpoint keeps its size; the zeros are what a sparse format or a later channel
    removal would exploit. Returns `model`.
    """
    from torch.nn.utils import prune

    if not 0.0 <= amount < 1.0:
        raise ValueError(f"prune amount must be in [0, 1), got {amount}")
    if amount == 0.0:
        return model
    for _, layer in prunable_layers(model):
        if structured:
            prune.ln_structured(layer, "weight", amount=amount, n=1, dim=0)
        else:
            prune.l1_unstructured(layer, "weight", amount=amount)
        prune.remove(layer, "weight")
    return model


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over the prunable layers."""
    weights = [m.weight for _, m in prunable_layers(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0
