"""`train_loop_per_worker`: the explicit loop Ray Train runs on every worker.

One loop serves teacher training (one model, `ce`) and distillation (several
students and their baselines at once): every batch is read once and fed to all
models, so N students cost one data pass, not N.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray.data
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from orchestrator.config import KDConfig, ModelSpec, TrainConfig
from orchestrator.data import normalize_images
from orchestrator.evaluate import classification_metrics
from orchestrator.memory import peak_rss_mb
from orchestrator.models import build_model
from orchestrator.objectives import build_objective, step_members
from orchestrator.online import OnlineTeacher, layer_pairs
from orchestrator.soft_targets import decode_logits, logit_columns
from orchestrator.term_config import LossTerm

STATE_FILE = "state.pt"
# Key of the train_loop_config entry holding Ray object refs (online teachers' weights): popped
# before the typed LoopConfig is rebuilt, since weights are not JSON.
OBJECTS_KEY = "_objects"


class MemberConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    role: str  # teacher | baseline | student
    spec: ModelSpec
    loss: str | list[LossTerm]
    run_id: str | None = None


class LoopConfig(BaseModel):
    """Everything a worker needs, rebuilt from the dict Ray hands over."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stage: str
    members: list[MemberConfig]
    optim: TrainConfig
    kd: KDConfig
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    encoding: str | None  # soft-target encoding; None when no teacher logits are present
    seed: int
    tracking_uri: str | None = None
    # online: these teachers (name, spec, weight; weights via OBJECTS_KEY) run in the worker on every batch.
    teacher_mode: Literal["cached", "online"] = "cached"
    online_teachers: list[dict[str, Any]] = []
    ensemble: str = "logits"


@dataclass
class Member:
    config: MemberConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Any  # an objectives.Objective (with any adapters), or a bare LOSSES function

    @property
    def plain_model(self) -> torch.nn.Module:
        """The module without its DDP wrapper (what is evaluated and saved)."""
        return getattr(self.model, "module", self.model)


def build_optimizer(params, optim: TrainConfig) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    cls = torch.optim.AdamW if optim.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(optimizer, optim: TrainConfig):
    if optim.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=optim.epochs)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels (Hinton et al.'s input jitter), zero padded."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shifts[:, 0] * 2.0 / w
    theta[:, 1, 2] = shifts[:, 1] * 2.0 / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="nearest", padding_mode="zeros", align_corners=False)


class ShardBatches:
    """Batches of one dataset shard, each epoch reshuffled.

    With `in_memory` the shard is pulled from the object store once and kept as
    tensors: later epochs are plain tensor indexing, which is what brings a Ray
    Train epoch close to a plain PyTorch loop.
    """

    def __init__(self, shard, *, batch_size: int, in_memory: bool, seed: int) -> None:
        self.shard, self.batch_size, self.in_memory, self.seed = shard, batch_size, in_memory, seed
        self.tensors: dict[str, torch.Tensor] | None = None

    def collect(self) -> dict[str, torch.Tensor]:
        if self.tensors is None:
            parts: dict[str, list[torch.Tensor]] = {}
            for batch in self.shard.iter_torch_batches(batch_size=8192):
                for key, value in batch.items():
                    parts.setdefault(key, []).append(value)
            self.tensors = {key: torch.cat(values) for key, values in parts.items()}
        return self.tensors

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if not self.in_memory:
            yield from self.shard.iter_torch_batches(
                batch_size=self.batch_size, local_shuffle_buffer_size=self.batch_size * 8, local_shuffle_seed=self.seed + epoch
            )
            return
        tensors = self.collect()
        n = len(next(iter(tensors.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield {key: value[index] for key, value in tensors.items()}


def teacher_logits_of(batch: dict[str, torch.Tensor], loop: LoopConfig) -> torch.Tensor | None:
    if loop.encoding is None:
        return None
    columns = {name: batch[name] for name in logit_columns(loop.encoding)}
    return decode_logits(columns, num_classes=loop.num_classes)


def train_one_epoch(members: list[Member], batches, loop: LoopConfig, *, device, generator: torch.Generator,
                    teacher_model: OnlineTeacher | None = None) -> dict[str, float]:
    """One pass over `batches`, every member stepping on every batch. Returns mean train loss per member."""
    for member in members:
        member.model.train()
    totals = {m.config.name: torch.zeros((), dtype=torch.float64) for m in members}
    rows = 0
    for batch in batches:
        images = normalize_images(batch["image"], loop.mean, loop.std)
        images = random_translate(images, loop.optim.input_jitter, generator).to(device)
        labels = batch["label"].long().to(device)
        teacher = teacher_logits_of(batch, loop)
        teacher = teacher.to(device) if teacher is not None else None
        # The online teacher (or None) sees the same, possibly jittered, images as the students.
        losses = step_members(members, images, labels, teacher, teacher_model, temperature=loop.kd.temperature, alpha=loop.kd.alpha)
        for name, loss in losses.items():
            totals[name] += loss.double().cpu() * len(labels)
        rows += len(labels)
    for member in members:
        member.scheduler.step()
    return {name: float(total) / max(rows, 1) for name, total in totals.items()}


@torch.inference_mode()
def validate(members: list[Member], val: dict[str, torch.Tensor], loop: LoopConfig, *, device) -> dict[str, dict[str, float]]:
    images, labels = val["image"], val["label"].long()
    teacher = teacher_logits_of(val, loop)
    results = {}
    for member in members:
        model = member.plain_model.eval()
        logits = torch.cat([
            model(normalize_images(images[i : i + 4096], loop.mean, loop.std).to(device)).float().cpu()
            for i in range(0, len(images), 4096)
        ])
        results[member.config.name] = classification_metrics(logits, labels, teacher)
    return results


def save_state(members: list[Member], epoch: int, directory: Path) -> None:
    torch.save(
        {
            "epoch": epoch,
            "models": {m.config.name: m.plain_model.state_dict() for m in members},
            "optimizers": {m.config.name: m.optimizer.state_dict() for m in members},
            "schedulers": {m.config.name: m.scheduler.state_dict() for m in members},
            "objectives": {m.config.name: m.loss_fn.state_dict() for m in members if isinstance(m.loss_fn, torch.nn.Module)},
        },
        directory / STATE_FILE,
    )


def load_state(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def build_members(loop: LoopConfig, state: dict | None, teacher: OnlineTeacher | None = None) -> list[Member]:
    members = []
    for config in loop.members:
        torch.manual_seed(loop.seed)  # identical initial weights on every rank and every run
        model = build_model(config.spec, loop.input_shape, loop.num_classes)
        # After the model, so its initial weights do not depend on the loss; adapters are seeded by this order too.
        objective = build_objective(config.loss, loop.kd, model, loop.input_shape, teacher)
        if state is not None:
            model.load_state_dict(state["models"][config.name])
            if config.name in state.get("objectives", {}):
                objective.load_state_dict(state["objectives"][config.name])
        model = ray.train.torch.prepare_model(model)
        objective.to(ray.train.torch.get_device())
        optimizer = build_optimizer([*model.parameters(), *objective.parameters()], loop.optim)
        scheduler = build_scheduler(optimizer, loop.optim)
        if state is not None:
            optimizer.load_state_dict(state["optimizers"][config.name])
            scheduler.load_state_dict(state["schedulers"][config.name])
        members.append(Member(config, model, optimizer, scheduler, objective))
    return members


def _teacher_layers(loss) -> list[str]:
    return [teacher_layer for _, teacher_layer in layer_pairs(loss)]


def _format_line(stage: str, name: str, epoch: int, epochs: int, train_loss: float, val: dict[str, float], seconds: float) -> str:
    parts = [f"[{stage}:{name}] epoch {epoch + 1}/{epochs}", f"train_loss {train_loss:.4f}"]
    if val:
        parts.append(f"val_acc {val['accuracy']:.4f}")
        if "agreement" in val:
            parts += [f"agree {val['agreement']:.4f}", f"kl {val['kl_to_teacher']:.4f}"]
    parts.append(f"{seconds:.1f}s")
    return "  ".join(parts)


def _quiet_worker_logs() -> None:
    """One line per epoch per model is the progress; Ray's per-report INFO lines and the
    ingest progress bars of every epoch would bury it."""
    for name in ("ray.train", "ray.train.v2._internal.execution.context"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def train_loop_per_worker(config: dict) -> None:
    config = dict(config)
    objects = config.pop(OBJECTS_KEY, {})
    loop = LoopConfig.model_validate(config)
    _quiet_worker_logs()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(max(1, math.floor(loop.optim.cpus_per_worker)))
    device = ray.train.torch.get_device()

    checkpoint = ray.train.get_checkpoint()
    state = load_state(checkpoint) if checkpoint else None
    start_epoch = state["epoch"] + 1 if state else 0
    teacher_model = None
    if loop.teacher_mode == "online":
        layers = [layer for m in loop.members for layer in _teacher_layers(m.loss)]
        teacher_model = OnlineTeacher(loop.online_teachers, ray.get(objects["teacher_states"]), input_shape=loop.input_shape,
                                      num_classes=loop.num_classes, ensemble=loop.ensemble, layers=layers, device=device)
    members = build_members(loop, state, teacher_model)

    train = ShardBatches(
        ray.train.get_dataset_shard("train"), batch_size=loop.optim.batch_size, in_memory=loop.optim.cache_shard_in_memory, seed=loop.seed + 7919 * rank
    )
    val = ShardBatches(ray.train.get_dataset_shard("val"), batch_size=4096, in_memory=True, seed=0) if rank == 0 else None
    generator = torch.Generator().manual_seed(loop.seed + rank)

    for epoch in range(start_epoch, loop.optim.epochs):
        started = time.perf_counter()
        train_loss = train_one_epoch(members, train.epoch(epoch), loop, device=device, generator=generator, teacher_model=teacher_model)
        val_metrics = validate(members, val.collect(), loop, device=device) if val is not None and len(val.collect()) else {}
        seconds = time.perf_counter() - started
        metrics: dict[str, float] = {"epoch": epoch, "epoch_s": seconds, "worker_peak_rss_mb": peak_rss_mb()}
        for name, loss in train_loss.items():
            metrics[f"{name}/train_loss"] = loss
            for key, value in val_metrics.get(name, {}).items():
                metrics[f"{name}/val_{key}"] = value
        if len(members) == 1:  # one model (a teacher, a sweep trial): plain names, which Tune's metric refers to
            prefix = members[0].config.name + "/"
            metrics |= {key[len(prefix) :]: value for key, value in list(metrics.items()) if key.startswith(prefix)}
        if rank == 0:
            _log_epoch(loop, members, metrics, epoch)
            for member in members:
                name = member.config.name
                print(_format_line(loop.stage, name, epoch, loop.optim.epochs, train_loss[name], val_metrics.get(name, {}), seconds), flush=True)
            with tempfile.TemporaryDirectory() as directory:
                save_state(members, epoch, Path(directory))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report({}, checkpoint=None)


def _log_epoch(loop: LoopConfig, members: list[Member], metrics: dict[str, float], epoch: int) -> None:
    if not loop.tracking_uri:
        return
    from orchestrator import tracking  # rank 0 only; keeps mlflow out of other workers

    for member in members:
        if member.config.run_id is None:
            continue
        prefix = member.config.name + "/"
        own = {key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}
        own["epoch_s"], own["worker_peak_rss_mb"] = metrics["epoch_s"], metrics["worker_peak_rss_mb"]  # rank 0's process
        tracking.log_metrics(loop.tracking_uri, member.config.run_id, own, step=epoch)
