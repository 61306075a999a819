"""The job's teacher actors, started once and kept warm: every soft-target pass of a job or sweep (its teachers',
each chain assistant's, each born-again generation's) runs on the same actor processes.

Why actors of our own, fed block references, rather than `map_batches(..., compute=ActorPoolStrategy)`: Ray
Data starts its actor pool with each execution and stops it after, so every pass paid new processes and a
torch import before its first row (at 60,000 rows that was most of the pass: 0.25x a plain loop). Here the
driver starts the actors when the job starts (`start_teacher_pool`, beside the teacher stage and the MLflow
set-up), puts the image blocks in the object store, and hands each actor block references; each call returns
the reference of its output block (id, view, logits). Rows go from the object store to the actors and back,
never through the driver; an actor killed mid-pass is restarted by Ray and its calls retried. Given a shard
directory, each call also writes its block there as one parquet file of the soft-target cache (`Shards`), from
the actor that computed it: the cache is written by the pool, not by a pass over its output afterwards.

Resources: the actors ask Ray for no CPU. They compute only during a pass, while the driver waits for it, and
holding CPUs for the job's life would keep the job's own train workers from starting on a small cluster; their
torch threads are `soft_targets.num_cpus_per_actor`. On a GPU cluster a pass starts its own actors with the
configured GPU share and ends them after (`release`), so train workers can have whole GPUs: not warm there.
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from orchestrator.teachers.pool import COUNTER_NAMESPACE, TeacherPredictor

POOL_NAME = "kd-teacher"
# Predictors an actor keeps built, by pass key: concurrent passes (two sweep trials' assistants) interleave calls.
KEPT_PREDICTORS = 2


# max_restarts / max_task_retries: a killed actor comes back and its calls run again (a pass is idempotent).
@ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)
class TeacherActor:
    """One warm process: torch imported, threads set; it builds a pass's teachers on that pass's first block."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        _warm_up_kernels()
        self.predictors: OrderedDict[str, TeacherPredictor] = OrderedDict()

    def ready(self) -> int:
        """This process's id: a warm actor answers every pass with the same one."""
        return os.getpid()

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` in this warm process: the job's test-set scoring (flows/finished.py)."""
        return fn(*args, **kwargs)

    def predict(self, key: str, predictor_kwargs: Mapping[str, Any], block: Mapping[str, np.ndarray],
                shard: tuple[Shards, int] | None = None) -> pa.Table:
        """One block of images (columns id, image) -> its soft-target rows (id, view, encoded logits); with `shard`
        (the pass's shard directory, this block's index), also written there as that block's parquet file."""
        if key not in self.predictors:
            self.predictors[key] = TeacherPredictor(**predictor_kwargs)
            while len(self.predictors) > KEPT_PREDICTORS:
                self.predictors.popitem(last=False)
        self.predictors.move_to_end(key)
        table = _table(self.predictors[key](dict(block)))
        if shard is not None:
            shards, index = shard
            shards.write(index, table)
        return table


@dataclass(frozen=True)
class Shards:
    """Where a pass's actors write the cache's parquet files: `directory` in `filesystem` (a local path when None;
    then every node must see it at that path, as for the local cache), each block as `part-<index>.parquet`,
    holding `columns`. A retried call rewrites its own file, so a pass that an actor restart interrupted still
    leaves one file per block."""

    directory: str
    columns: Sequence[str]
    filesystem: pafs.FileSystem | None = None

    def path(self, index: int) -> str:
        return f"{self.directory}/part-{index:06d}.parquet"

    def write(self, index: int, table: pa.Table) -> None:
        filesystem = self.filesystem or pafs.LocalFileSystem()
        if isinstance(filesystem, pafs.LocalFileSystem):  # an object store has no directories to make
            filesystem.create_dir(self.directory, recursive=True)
        pq.write_table(table.select(list(self.columns)), self.path(index), filesystem=filesystem)


def _warm_up_kernels() -> None:
    """A matmul and a convolution on throw-away tensors, so the intra-op thread pool and the CPU kernels' one-time
    set-up happen while the job starts (the actor is started at job start), not inside its first pass."""
    with torch.inference_mode():
        torch.ones(256, 512) @ torch.ones(512, 256)
        torch.nn.functional.conv2d(torch.ones(64, 8, 16, 16), torch.ones(8, 8, 3, 3), padding=1)


def _table(columns: Mapping[str, np.ndarray]) -> pa.Table:
    """Numpy columns as an Arrow table: (N, K) columns as Arrow's own fixed_shape_tensor, which Ray Data reads too.
    Not Ray's tensor extension: importing it (ray.data, pandas) cost each new actor 0.7 s of CPU as it started."""
    return pa.table({name: pa.FixedShapeTensorArray.from_numpy_ndarray(values) if values.ndim > 1 else pa.array(values)
                     for name, values in columns.items()})


_POOLS: dict[tuple, list] = {}  # held here: a non-detached actor ends when the last handle to it goes


def _this_job() -> tuple[str, str]:
    """(the node id, the actor-name prefix of the current job): a restarted Ray numbers its jobs from 1 again,
    on a new node id, so the pair names one job's pools in `_POOLS`."""
    context = ray.get_runtime_context()
    return context.get_node_id(), f"{POOL_NAME}-{context.get_job_id()}-"


def teacher_pool(size: int, threads: int, gpus: float = 0.0) -> list:
    """This job's `size` warm teacher actors (started by the first call; later calls, in the driver or in a sweep
    trial's actor, get the same processes by name). With `gpus`, new unnamed actors for one pass (see `release`)."""
    if gpus > 0:
        return [TeacherActor.options(num_gpus=gpus, scheduling_strategy="SPREAD").remote(threads) for _ in range(size)]
    node, job_prefix = _this_job()
    prefix = f"{job_prefix}t{threads}"
    actors = _POOLS.setdefault((node, prefix), [])
    while len(actors) < size:
        actors.append(TeacherActor.options(name=f"{prefix}-{len(actors)}", namespace=COUNTER_NAMESPACE, get_if_exists=True,
                                           scheduling_strategy="SPREAD").remote(threads))
    return actors[:size]


def warm_actor() -> Any | None:
    """One of the current job's warm CPU actors that this process started or found, else None."""
    node, prefix = _this_job()
    return next((actors[0] for (node_id, name), actors in _POOLS.items() if node_id == node and name.startswith(prefix) and actors), None)


def start_teacher_pool(size: int, threads: int, gpus: float = 0.0) -> None:
    """At job start: the warm actors' processes start (and import torch) while the job does other things."""
    if gpus <= 0:
        teacher_pool(size, threads)


def release(actors: list, gpus: float, *, interrupted: bool = False) -> None:
    """After a pass: a GPU pass's actors end (their GPU share goes back); warm CPU actors stay, unless the pass was
    interrupted (Ctrl-C, SIGTERM): then they end too, unrestarted, before Ray goes down with their calls in flight
    (else Ray retries those calls on restarted actors while it shuts down, and logs an error after the job's last
    line). A pass that failed otherwise leaves them up: a sweep's other trials may be using them."""
    if gpus > 0 or interrupted:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    if interrupted:
        for pool in _POOLS.values():
            pool[:] = [actor for actor in pool if actor not in actors]


def run_pass(actors: list, predictor_kwargs: Mapping[str, Any], blocks: list, shards: Shards | None = None) -> list:
    """Each image block's reference to an actor, round robin (blocks are of equal size); returns the output blocks'
    references, in block order. Each actor builds the pass's teachers on its first block of the pass, and with
    `shards` writes each output block there too."""
    key = uuid.uuid4().hex
    kwargs = ray.put(dict(predictor_kwargs))  # once, not once per block
    return [actors[i % len(actors)].predict.remote(key, kwargs, block, None if shards is None else (shards, i))
            for i, block in enumerate(blocks)]
