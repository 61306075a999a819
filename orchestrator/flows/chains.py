"""Teacher-assistant chains (Mirzadeh et al., AAAI 2020): teacher -> assistant(s) -> student.

A chain is a list of stages run in a loop. Every assistant stage is memoized: its key
is (parent teacher fingerprint, stage architecture, training settings, data, seed), so
a stage trained by one trial is reused by every later trial and sweep that needs it,
and concurrent trials that need the same stage wait for one producer instead of racing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import ray

from orchestrator.config import JobConfig, ModelSpec, TeacherConfig
from orchestrator.teachers.soft_targets import fingerprint

REGISTRY_NAME = "kd-stage-registry"
REGISTRY_NAMESPACE = "kd-orchestrator"


@dataclass(frozen=True)
class Stage:
    """One model of a chain that learns from the stage before it: an assistant (loss kd at the job's kd
    settings) or a born-again generation (the student's own loss)."""

    name: str
    spec: ModelSpec
    loss: Any = "kd"  # a shorthand or a list of losses.terms terms
    role: str = "assistant"  # or "generation"


def assistant_stages(assistants: list[ModelSpec]) -> list[Stage]:
    """teacher -> assistant1 -> ... -> (the students): the assistants, in the order they are trained."""
    return [Stage(f"assistant{i + 1}", spec) for i, spec in enumerate(assistants)]


def chain_label(assistants: list[ModelSpec]) -> str:
    """Short human name of a chain for tables and plots: 'direct' or 'mlp512x512>cnn32-64'."""
    if not assistants:
        return "direct"
    return ">".join(describe(spec) for spec in assistants)


def describe(spec: ModelSpec) -> str:
    if spec.family == "mlp":
        return "mlp" + "x".join(map(str, spec.hidden))
    if spec.family == "cnn":
        return "cnn" + "-".join(map(str, spec.channels))
    return spec.family.split(":")[-1]


def assistant_as_teacher(stage: Stage) -> TeacherConfig:
    """An assistant teaches the next stage exactly like a teacher does."""
    return TeacherConfig.model_validate({**stage.spec.model_dump(), "name": stage.name})


def stage_key(cfg: JobConfig, parent_fingerprint: str, stage: Stage, dataset_fingerprint: str) -> str:
    """The memo key of a trained stage: what it learned from, its architecture and loss, how it trained, on what."""
    # Assistants train with the job's base kd/train settings (not a trial's sampled ones),
    # so trials that sample different final-stage hyperparameters still share them.
    # The loss enters only where it is not the assistants' kd, so assistant keys (and caches) stay as they were.
    loss = {} if stage.loss == "kd" else {"loss": stage.loss if isinstance(stage.loss, str) else [t.model_dump(mode="json") for t in stage.loss]}
    return fingerprint({
        **loss,
        "parent": parent_fingerprint,
        "spec": stage.spec.model_dump(mode="json"),
        "kd": cfg.kd.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", exclude={"num_workers", "cpus_per_worker", "use_gpu", "max_failures", "storage_path"}),
        "encoding": cfg.soft_targets.encoding,
        "dataset": dataset_fingerprint,
        "val_fraction": cfg.dataset.val_fraction,
        "seed": cfg.seed,
    })


@ray.remote(num_cpus=0)
class StageRegistry:
    """Decides which trial trains a chain stage; the others wait for its result.

    State lives in this actor for one cluster; the trained stages themselves live in
    the on-disk stage cache, so reuse also works across sweeps and restarts.
    """

    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.events: dict[str, asyncio.Event] = {}
        self.counts = {"produced": 0, "reused": 0, "waited": 0}

    async def claim(self, key: str) -> bool:
        """True: the caller must produce the stage. False: someone else is, or did."""
        if self.state.get(key) in (None, "failed"):
            self.state[key] = "running"
            self.events[key] = asyncio.Event()
            return True
        return False

    async def wait(self, key: str) -> str:
        event = self.events.get(key)
        if event is not None and self.state.get(key) == "running":
            self.counts["waited"] += 1
            await event.wait()
        return self.state.get(key, "unknown")

    async def publish(self, key: str, ok: bool) -> None:
        self.state[key] = "done" if ok else "failed"
        if ok:
            self.counts["produced"] += 1
        event = self.events.get(key)
        if event is not None:
            event.set()

    async def count_reuse(self) -> None:
        self.counts["reused"] += 1

    async def stats(self) -> dict[str, int]:
        return dict(self.counts)

    async def reset_running(self) -> int:
        """After a driver restart the producers of 'running' stages are dead: let the next claimer redo them."""
        stale = [key for key, state in self.state.items() if state == "running"]
        for key in stale:
            await self.publish(key, False)
        return len(stale)


def stage_registry(sweep_id: str):
    """The registry of one sweep (detached, so a resumed driver finds the same one)."""
    return StageRegistry.options(name=f"{REGISTRY_NAME}-{sweep_id}", namespace=REGISTRY_NAMESPACE, get_if_exists=True, lifetime="detached").remote()
