"""A train worker's shard as batches (ShardBatches), joined by id to its rows' soft targets: from the columns
the job put in the object store, or read by the worker itself from the cache's files (own_rows_reader)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import ray
import torch

from orchestrator.teachers.cache_manifest import CacheEntry
from orchestrator.teachers.soft_target_columns import OwnSoftTargets, gather_soft_targets, read_own_soft_targets
from orchestrator.tracking.progress import emit


class ShardBatches:
    """Batches of one dataset shard, each epoch reshuffled.

    With `in_memory` the shard is pulled from the object store once and kept as
    tensors: later epochs are plain tensor indexing, which is what brings a Ray
    Train epoch close to a plain PyTorch loop.

    `soft_columns` (the cache's logit columns, read from the object store) are joined to the images here by
    row id: the shard itself carries only id, image and label, so no joined copy is made before training. Or a
    reader (own_rows_reader) that the first collected shard's ids are handed to: it reads their soft targets.
    """

    def __init__(self, shard, *, batch_size: int, in_memory: bool, seed: int,
                 soft_columns: dict[str, np.ndarray] | Callable[[np.ndarray], OwnSoftTargets] | None = None) -> None:
        self.shard, self.batch_size, self.in_memory, self.seed = shard, batch_size, in_memory, seed
        self.soft_columns = soft_columns or {}
        self.tensors: dict[str, torch.Tensor] | None = None

    def _with_soft_targets(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.soft_columns:
            return batch
        if callable(self.soft_columns):  # read from the cache's files, once, for every id of the collected shard
            self.soft_columns = self.soft_columns(batch["id"].numpy())
        joined = gather_soft_targets(self.soft_columns, batch["id"].numpy())  # ids index the train split, as the columns' rows do
        return {**batch, **{name: torch.from_numpy(values) for name, values in joined.items()}}

    def collect(self) -> dict[str, torch.Tensor]:
        if self.tensors is None:
            parts: dict[str, list[torch.Tensor]] = {}
            # On the host (device="cpu"), pinned when a GPU will read it: the shard (with every view's soft targets)
            # stays out of GPU memory; each batch crosses on its own (train_one_epoch).
            for batch in self.shard.iter_torch_batches(batch_size=8192, device="cpu"):
                for key, value in batch.items():
                    parts.setdefault(key, []).append(value)
            tensors = {key: torch.cat(values) for key, values in parts.items()}
            # Blocks reach a worker in whatever order Ray Data finishes them; sorting by id makes the
            # epoch permutations below, and so the whole run, the same on every rerun.
            if "id" in tensors and len(tensors["id"]):
                order = torch.argsort(tensors["id"])
                tensors = {key: value[order] for key, value in tensors.items()}
            if "id" in tensors:
                tensors = self._with_soft_targets(tensors)
            if torch.cuda.is_available():
                tensors = {key: value.pin_memory() for key, value in tensors.items()}
            self.tensors = tensors
        return self.tensors

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if not self.in_memory:
            for batch in self.shard.iter_torch_batches(
                batch_size=self.batch_size, local_shuffle_buffer_size=self.batch_size * 8, local_shuffle_seed=self.seed + epoch, device="cpu"
            ):
                yield self._with_soft_targets(batch)
            return
        tensors = self.collect()
        n = len(next(iter(tensors.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))  # on the host, like the shard
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield {key: value[index] for key, value in tensors.items()}


def own_rows_reader(entry: CacheEntry, logit_names: Sequence[str], stage: str, sink: str | None, rank: int) -> Callable[[np.ndarray], OwnSoftTargets]:
    """ids -> their soft targets, read by this worker from the files of the cache entry that hold them
    (soft_targets.worker_reads: cache); it says on the job's console how many files it read, and on which node."""
    def read(ids: np.ndarray) -> OwnSoftTargets:
        own, counts = read_own_soft_targets(entry, list(logit_names), ids)
        emit(sink, f"[{stage}] worker {rank} on node {ray.get_runtime_context().get_node_id()[:8]}: soft targets of "
                   f"{len(own.ids):,} rows from {counts['files_read']} of {counts['files']} cache files")
        return own

    return read
