"""build_trainer: a TorchTrainer for one stage (teacher training or student distillation)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from orchestrator.cluster.interrupts import train_fit_noticing_ctrl_c
from orchestrator.config import TrainConfig
from orchestrator.train.train_loop import OBJECTS_KEY, LoopConfig, load_state, train_loop_per_worker

# Ray Train V2 workers hand each report to a queue of size 1 that the controller drains
# once per health check (2 s by default), so every epoch's report waited up to 2 s:
# measured 1.6-2.0 s per report, 0.1 s at 0.1 s. The driver propagates these to the
# controller and workers. The print patch echoes every worker print twice on the console.
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Ray Train starts a preemption watcher actor per run (1.7 s of CPU each, measured here, beside the run's start).
# On a one-node cluster (the embedded local Ray) the node it watches is the driver's own: its preemption ends
# the job whatever is watching. Off there, on by Ray's default elsewhere; a value the user set wins.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_USER_SET_PREEMPTION_WATCHER = PREEMPTION_WATCHER_ENV in os.environ


def _set_preemption_watcher() -> None:
    if not _USER_SET_PREEMPTION_WATCHER:
        one_node = sum(node["Alive"] for node in ray.nodes()) == 1
        os.environ[PREEMPTION_WATCHER_ENV] = "0" if one_node else "1"


def build_trainer(loop: LoopConfig, datasets: dict[str, ray.data.Dataset], *, run_name: str, callbacks: Sequence = (),
                  objects: dict | None = None) -> TorchTrainer:
    """Train shard per worker, validation whole on rank 0, a checkpoint per epoch, restarts on failure.

    `objects`: Ray object refs the workers fetch themselves (online teachers' weights), kept out of the JSON config.
    """
    for key, value in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    _set_preemption_watcher()
    optim: TrainConfig = loop.optim
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop.model_dump(mode="json"), **({OBJECTS_KEY: objects} if objects else {})},
        scaling_config=ray.train.ScalingConfig(
            num_workers=optim.num_workers,
            use_gpu=optim.use_gpu,
            resources_per_worker={"CPU": optim.cpus_per_worker, **({"GPU": 1} if optim.use_gpu else {})},
        ),
        datasets=datasets,
        # Only "train" is sharded: every worker may read all of "val", and rank 0 evaluates it whole. One worker
        # reads it whole too: a split of one would only add Ray Data's split coordinator (an actor process) per run.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if optim.num_workers > 1 else []),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(Path(optim.storage_path).resolve()) if "://" not in optim.storage_path else optim.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=optim.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            # Ray Train's own INFO lines (a TrainingReport dump per epoch) stay in its log files, not the console;
            # KD_VERBOSE=1 (distill -v) brings them back.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if os.environ.get("KD_VERBOSE") else "WARNING"),
        ),
    )


def fit_and_load(loop: LoopConfig, datasets: dict[str, ray.data.Dataset], *, run_name: str, callbacks: Sequence = (),
                 objects: dict | None = None) -> tuple[dict, dict]:
    """Run the stage; returns (final state dicts by member name, last reported metrics)."""
    result = train_fit_noticing_ctrl_c(build_trainer(loop, datasets, run_name=run_name, callbacks=callbacks, objects=objects))
    if result.checkpoint is None:
        raise RuntimeError(f"stage {loop.stage}: training finished without a checkpoint")
    state = load_state(result.checkpoint)
    return state["models"], dict(result.metrics or {})
