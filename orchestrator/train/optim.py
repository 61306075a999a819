"""The optimiser and the learning-rate schedule of every trained model (teachers, students, twins)."""

from __future__ import annotations

import functools
import math

import torch

from orchestrator.config import TrainConfig


def build_optimizer(params, optim: TrainConfig) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov and optim.momentum > 0,
                               weight_decay=optim.weight_decay)
    cls = torch.optim.AdamW if optim.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay)


ONECYCLE_WARMUP = 0.15  # fraction of all steps spent warming up
ONECYCLE_START = 0.04  # the first step's lr, as a fraction of lr (OneCycleLR's div_factor 25)


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The multiple of the base lr at optimizer step `step` of `total_steps` (clamped past the end, so a
    shard with a batch more than planned cannot crash a run)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        if progress < ONECYCLE_WARMUP:
            return ONECYCLE_START + (1.0 - ONECYCLE_START) * progress / ONECYCLE_WARMUP
        return 0.5 * (1.0 + math.cos(math.pi * (progress - ONECYCLE_WARMUP) / (1.0 - ONECYCLE_WARMUP)))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def build_scheduler(optimizer, optim: TrainConfig, steps_per_epoch: int):
    """A per-step schedule over the whole run (stepped after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, optim.lr_schedule, total_steps=optim.epochs * steps_per_epoch))


def steps_per_epoch(train_rows: int, world_size: int, batch_size: int) -> int:
    """Batches one worker draws per epoch: its share of the rows (Ray Train splits them equally), in batches."""
    return max(1, math.ceil(math.ceil(train_rows / max(world_size, 1)) / batch_size))
