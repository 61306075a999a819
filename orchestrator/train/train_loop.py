"""`train_loop_per_worker`: the explicit loop Ray Train runs on every worker.

One loop serves teacher training (one model, `ce`) and distillation (several
students and their baselines at once): every batch is read once and fed to all
models, so N students cost one data pass, not N.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray.data
import ray.train
import ray.train.torch
import torch
from pydantic import BaseModel, ConfigDict

from orchestrator.config import KDConfig, ModelSpec, TrainConfig
from orchestrator.data.datasets import normalize_images
from orchestrator.data.views import ViewPolicy, epoch_views, random_views, views_of
from orchestrator.losses.objective import build_objective, step_members
from orchestrator.losses.terms import LossTerm, uses_dml
from orchestrator.teachers.online import OnlineTeacher, layer_pairs
from orchestrator.teachers.soft_targets import decode_logits, logit_columns
from orchestrator.tracking.progress import emit
from orchestrator.train.evaluate import classification_metrics
from orchestrator.train.memory import peak_rss_mb
from orchestrator.train.models import build_model
from orchestrator.train.optim import build_optimizer, build_scheduler, steps_per_epoch
from orchestrator.train.precision import autocast, grad_scaler
from orchestrator.train.shard_batches import ShardBatches, own_rows_reader

STATE_FILE = "state.pt"
# Key of the train_loop_config entry holding Ray object refs (online teachers' weights, the soft-target
# columns): popped before the typed LoopConfig is rebuilt, since arrays are not JSON.
OBJECTS_KEY = "_objects"
SOFT_COLUMNS = "soft_columns"  # -> {name: (n_train, V, ...)}: the encoded logits of train row i at row i
SOFT_CACHE = "soft_cache"  # the cache entry (soft_targets.worker_reads: cache): each worker reads its own rows from its files


class MemberConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    role: str  # teacher | baseline | student | assistant | generation
    spec: ModelSpec
    loss: str | list[LossTerm]
    run_id: str | None = None
    kd: KDConfig = KDConfig(temperature=1.0, alpha=0.0)  # this member's resolved T and alpha (kd_settings.py)
    twin: str | None = None  # a student's label-only twin (the member it is compared with)


class LoopConfig(BaseModel):
    """Everything a worker needs, rebuilt from the dict Ray hands over."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stage: str
    members: list[MemberConfig]
    optim: TrainConfig
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fill: int = 0  # background value: what shifted views are padded with
    encoding: str | None  # soft-target encoding; None when no teacher logits are present
    seed: int
    train_rows: int  # rows of the whole train dataset (all workers): sizes the per-step LR schedule
    has_val: bool = True  # False with dataset.val_fraction 0: no "val" dataset, no per-epoch validation
    progress_sink: str | None = None  # the job's progress.ProgressSink; None: print (Ray forwards it when verbose)
    views: dict[str, Any] = {}  # the ViewPolicy students draw from (views.py); the cache holds the same views in cached mode
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
    loss_fn: Any  # its losses.objective.Objective (with any adapters)
    scaler: Any = None  # a torch.amp.GradScaler when training in fp16 on a GPU

    @property
    def plain_model(self) -> torch.nn.Module:
        """The module without its DDP wrapper (what is evaluated and saved)."""
        return getattr(self.model, "module", self.model)


def cached_teacher_logits(batch: dict[str, torch.Tensor], loop: LoopConfig, views: torch.Tensor | None) -> torch.Tensor | None:
    """The cached teacher logits of each row's view (view 0 when `views` is None), decoded to float32 (B, K)."""
    if loop.encoding is None:
        return None
    columns = {}
    for name in logit_columns(loop.encoding):
        per_view = batch[name]  # (B, V, ...): every cached view of the row
        index = torch.zeros(len(per_view), dtype=torch.int64, device=per_view.device) if views is None else views.to(per_view.device)
        columns[name] = per_view[torch.arange(len(per_view), device=per_view.device), index]
    return decode_logits(columns, num_classes=loop.num_classes)


def train_one_epoch(members: list[Member], batches, loop: LoopConfig, *, epoch: int, device, generator: torch.Generator,
                    teacher_model: OnlineTeacher | None = None) -> dict[str, float]:
    """One pass over `batches`, every member stepping on every batch. Returns mean train loss per member.

    Teachers in training see a fresh random view of every image (their own augmentation). Students and their
    twins see view `epoch_views(seed, epoch, id)` of each example (views.py), with the cached teacher logits of
    exactly that view, or the online teacher run on it. Views are cut from the uint8 images on `device`.
    """
    for member in members:
        member.model.train()
        if hasattr(member.loss_fn, "epoch"):
            member.loss_fn.epoch = epoch  # loss-term warm-ups (dkd warmup_epochs)
    policy = ViewPolicy(**loop.views) if loop.views else ViewPolicy(fill=loop.fill)
    own_augmentation = ViewPolicy(max_shift=loop.optim.input_jitter, flip=loop.optim.flip, fill=loop.fill)
    totals = {m.config.name: torch.zeros((), dtype=torch.float64, device=device) for m in members}
    rows = 0
    for batch in batches:
        # uint8 crosses to the device (a quarter of float32's bytes, from pinned memory: non-blocking);
        # views and normalisation happen there.
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        images = batch["image"]
        labels = batch["label"].long()
        teacher = None
        if loop.encoding is None:  # a teacher training on labels
            images = random_views(images, own_augmentation, generator)
        else:
            ids = batch["id"].to(device)
            views = epoch_views(loop.seed, epoch, ids, policy.count)
            images = views_of(images, ids, views, policy)
            if loop.teacher_mode == "cached":
                teacher = cached_teacher_logits(batch, loop, views).to(device)
        x = normalize_images(images, loop.mean, loop.std)
        # The online teacher (or None) sees the same view as the students.
        losses = step_members(members, x, labels, teacher, teacher_model, max_norm=loop.optim.max_norm, precision=loop.optim.precision)
        for name, loss in losses.items():
            totals[name] += loss.double() * len(labels)  # stays on the device: no host sync per step
        rows += len(labels)
    return {name: float(total) / max(rows, 1) for name, total in totals.items()}


@torch.inference_mode()
def validate(members: list[Member], val: dict[str, torch.Tensor], loop: LoopConfig, *, device) -> dict[str, dict[str, float]]:
    """Validation on view 0 (the untouched images), metrics computed on the CPU from CPU tensors."""
    images, labels = val["image"], val["label"].long().cpu()
    teacher = cached_teacher_logits(val, loop, None)
    teacher = teacher.cpu() if teacher is not None else None
    results = {}
    for member in members:
        model = member.plain_model.eval()
        with autocast(loop.optim.precision, device):
            logits = torch.cat([
                model(normalize_images(images[i : i + 4096].to(device, non_blocking=True), loop.mean, loop.std)).float().cpu()
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


def initial_seeds(seed: int, members: list[MemberConfig]) -> dict[str, int]:
    """The seed each member's initial weights are drawn with: the loop's for all, so a student and its twin
    start from the same weights (a paired comparison), except that the k-th DML peer draws with seed + k:
    peers that start equal and see the same batches stay equal, and their mutual term is 0 (Zhang et al.
    2018 start each peer from its own initialisation). The first peer keeps its twin's start."""
    peers = [m.name for m in members if uses_dml(m.loss)]
    return {m.name: seed + (peers.index(m.name) if m.name in peers else 0) for m in members}


def build_members(loop: LoopConfig, state: dict | None, teacher: OnlineTeacher | None = None, *, steps: int = 1) -> list[Member]:
    members = []
    seeds = initial_seeds(loop.seed, loop.members)
    for config in loop.members:
        torch.manual_seed(seeds[config.name])  # the same initial weights on every rank and every run
        model = build_model(config.spec, loop.input_shape, loop.num_classes)
        # After the model, so its initial weights do not depend on the loss; adapters are seeded by this order too.
        objective = build_objective(config.loss, config.kd, model, loop.input_shape, teacher)
        if state is not None:
            model.load_state_dict(state["models"][config.name])
            if config.name in state.get("objectives", {}):
                objective.load_state_dict(state["objectives"][config.name])
        model = ray.train.torch.prepare_model(model)
        objective.to(ray.train.torch.get_device())
        optimizer = build_optimizer([*model.parameters(), *objective.parameters()], loop.optim)
        scheduler = build_scheduler(optimizer, loop.optim, steps)
        if state is not None:
            optimizer.load_state_dict(state["optimizers"][config.name])
            scheduler.load_state_dict(state["schedulers"][config.name])
        members.append(Member(config, model, optimizer, scheduler, objective, grad_scaler(loop.optim.precision, ray.train.torch.get_device())))
    return members


def all_workers_sum(value: int, device) -> int:
    """`value` summed over the Ray Train workers (every rank must call it at the same point)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


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
    ingest progress bars of every epoch would bury it (distill -v keeps them)."""
    if os.environ.get("KD_VERBOSE"):
        return
    from ray.train.v2._internal.execution import context

    # Ray Train's "Reporting training result N: TrainingReport(...)" comes from a logger named after its
    # file path, outside the "ray.train" tree that RunConfig's LoggingConfig filters.
    for name in ("ray.train", context.__file__):
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
    soft_columns = ray.get(objects[SOFT_COLUMNS]) if SOFT_COLUMNS in objects else None  # mapped from shared memory, not copied
    if SOFT_CACHE in objects:
        soft_columns = own_rows_reader(objects[SOFT_CACHE], logit_columns(loop.encoding), loop.stage, loop.progress_sink, rank)
    train = ShardBatches(ray.train.get_dataset_shard("train"), batch_size=loop.optim.batch_size, in_memory=loop.optim.cache_shard_in_memory,
                         seed=loop.seed + 7919 * rank, soft_columns=soft_columns)
    if loop.optim.cache_shard_in_memory:  # the exact number of batches this worker will draw
        steps = max(1, math.ceil(len(train.collect()["label"]) / loop.optim.batch_size))
    else:
        steps = steps_per_epoch(loop.train_rows, context.get_world_size(), loop.optim.batch_size)
    members = build_members(loop, state, teacher_model, steps=steps)
    # Identical initial weights on every rank (above), but not identical dropout masks: each rank its own stream.
    torch.manual_seed(loop.seed * 7919 + rank + 1)
    val = (ShardBatches(ray.train.get_dataset_shard("val"), batch_size=4096, in_memory=True, seed=0, soft_columns=soft_columns)
           if loop.has_val and rank == 0 else None)
    generator = torch.Generator().manual_seed(loop.seed + rank)

    for epoch in range(start_epoch, loop.optim.epochs):
        started = time.perf_counter()
        train_loss = train_one_epoch(members, train.epoch(epoch), loop, epoch=epoch, device=device, generator=generator, teacher_model=teacher_model)
        train_s = time.perf_counter() - started
        val_metrics = validate(members, val.collect(), loop, device=device) if val is not None and len(val.collect()) else {}
        seconds = time.perf_counter() - started
        # epoch_s: training and validation; train_s: the training pass alone (what a plain loop's epoch compares with).
        metrics: dict[str, float] = {"epoch": epoch, "epoch_s": seconds, "train_s": train_s, "worker_peak_rss_mb": peak_rss_mb()}
        if teacher_model is not None:  # every worker's online-teacher rows so far (this run; a restart counts afresh)
            metrics["online_teacher_rows"] = all_workers_sum(teacher_model.rows, device)
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
                emit(loop.progress_sink, _format_line(loop.stage, name, epoch, loop.optim.epochs, train_loss[name], val_metrics.get(name, {}), seconds))
            with tempfile.TemporaryDirectory() as directory:
                save_state(members, epoch, Path(directory))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report({}, checkpoint=None)


def _log_epoch(loop: LoopConfig, members: list[Member], metrics: dict[str, float], epoch: int) -> None:
    if not loop.tracking_uri:
        return
    from orchestrator.tracking import runs as tracking  # rank 0 only; keeps mlflow out of other workers

    for member in members:
        if member.config.run_id is None:
            continue
        prefix = member.config.name + "/"
        own = {key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}
        own |= {key: metrics[key] for key in ("epoch_s", "train_s", "worker_peak_rss_mb")}  # rank 0's process
        tracking.log_metrics(loop.tracking_uri, member.config.run_id, own, step=epoch)
