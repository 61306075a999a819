"""Mixed precision: which dtype autocast runs in, on which device, and whether gradients need a scaler.

`auto` is bf16 on a CUDA device that supports it (Ampere and later), fp16 on an older one, and fp32
on the CPU: CPU autocast is slower than fp32 on most CPUs. Explicit `bf16`/`fp16` apply anywhere.
fp16 training needs a GradScaler (its small gradients underflow); bf16 has fp32's range and does not.
Losses are computed by autocast's own rules: softmax, log_softmax and kl_div run in fp32.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The dtype autocast runs in, or None for plain fp32."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    return DTYPES[precision]


def autocast(precision: str, device: torch.device | str):
    """A context manager: torch.autocast in the resolved dtype, or nothing for fp32."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler when training runs in fp16 on a GPU, else None."""
    device = torch.device(device)
    if autocast_dtype(precision, device) is torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def resolved_name(precision: str, device: torch.device | str) -> str:
    """What `precision` means on `device`: fp32, bf16 or fp16 (for logs and fingerprints)."""
    dtype = autocast_dtype(precision, device)
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
