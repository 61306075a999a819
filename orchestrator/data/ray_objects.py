"""The driver's arrays as Ray objects: Ray Datasets for the train workers, image blocks for the teacher actors.

Each is one copy into the object store; nothing is read back into the driver. `put_once` keeps the copies on
the dataset, so every stage of a job and every trial of a sweep shares the driver's references."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray

from orchestrator.data.datasets import DatasetArrays, Split, ids_digest

T = TypeVar("T")

# At least this many Ray blocks, so two train workers (or a 2-actor pool) have work for both even on a small split.
MIN_RAY_BLOCKS = 4


def to_ray_dataset(split: Split, ids: np.ndarray | None = None, *, rows_per_block: int = 8192) -> ray.data.Dataset:
    """A Ray Dataset with columns id (row index into `split`), image (uint8 tensor C,H,W) and label.

    Built from Arrow tables, one per block, so parallel workers get several blocks to share.
    `from_blocks` takes each block's metadata from the table in hand; `from_arrow` would run a
    remote task per block to read it (up to a second on a fresh cluster, more while workers start).
    Runs of consecutive ids are sliced rather than gathered: the only copy is into the object store.
    """
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
    if ids is None:
        ids = np.arange(len(split), dtype=np.int64)
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() >= len(split)):
        raise ValueError(f"ids must lie in [0, {len(split)}), got [{ids.min()}, {ids.max()}]")

    def rows(block_ids: np.ndarray) -> slice | np.ndarray:
        consecutive = block_ids.size and int(block_ids[-1]) - int(block_ids[0]) == block_ids.size - 1 and bool(np.all(np.diff(block_ids) == 1))
        return slice(int(block_ids[0]), int(block_ids[-1]) + 1) if consecutive else block_ids

    num_blocks = max(-(-len(ids) // rows_per_block), min(len(ids), MIN_RAY_BLOCKS), 1)
    tables = []
    for block_ids in np.array_split(ids, num_blocks):
        index = rows(block_ids)
        tables.append(
            pa.table(
                {
                    "id": pa.array(block_ids),
                    "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(split.images[index])),
                    "label": pa.array(split.labels[index]),
                }
            )
        )
    return ray.data.from_blocks(tables)


def put_image_blocks(parts: Sequence[Split], num_blocks: int) -> list[ray.ObjectRef]:
    """The parts' images in `num_blocks` blocks of near-equal size, each {"id", "image"} put in the object store.

    Ids run on across the parts (the second part's first row follows the first's last); a block that spans two
    parts is the only copy made besides the put itself."""
    sizes = [len(part) for part in parts]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(starts[-1])
    bounds = np.linspace(0, total, max(1, min(num_blocks, total)) + 1).astype(np.int64)
    blocks = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pieces = [part.images[max(lo - s, 0) : min(hi - s, n)] for part, s, n in zip(parts, starts, sizes) if lo < s + n and hi > s]
        images = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        blocks.append(ray.put({"id": np.arange(lo, hi, dtype=np.int64), "image": images}))
    return blocks


def put_once(data: DatasetArrays, key: tuple, make: Callable[[], T]) -> T:
    """`make()`'s object-store copy of `data`, made on the first call per Ray job and key and kept on `data`.

    The references travel with `data` when it is pickled (tune.with_parameters ships it to every trial), so a
    trial, a chain stage or a born-again generation reads the copy the driver made. Keyed by the job as well:
    a dataset kept across a Ray restart (a notebook) never hands out references of a cluster that is gone."""
    scope = (ray.get_runtime_context().get_job_id(), ray.get_runtime_context().gcs_address, *key)
    if scope not in data.objects:
        data.objects[scope] = make()
    return data.objects[scope]


def rows_dataset(data: DatasetArrays, ids: np.ndarray) -> ray.data.Dataset:
    """The train split's rows `ids` as a Ray Dataset (to_ray_dataset), made once per job (put_once)."""
    return put_once(data, ("train_rows", ids_digest(ids)), lambda: to_ray_dataset(data.train, ids))


def image_blocks(data: DatasetArrays, num_blocks: int) -> list[ray.ObjectRef]:
    """Train then test images in `num_blocks` blocks (put_image_blocks), made once per job (put_once)."""
    return put_once(data, ("image_blocks", num_blocks), lambda: put_image_blocks([data.train, data.test], num_blocks))
