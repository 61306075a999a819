"""The driver's arrays as Ray objects: Ray Datasets for the train workers, image blocks for the teacher actors.

Each is one copy into the object store; nothing is read back into the driver. `put_once` keeps the copies on
the dataset, so every stage of a job and every trial of a sweep shares the driver's references."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray

from orchestrator.config import DatasetConfig
from orchestrator.data.datasets import DatasetArrays, Split, ids_digest
from orchestrator.data.object_images import ObjectImages, PlannedImages
from orchestrator.data.pixel_stats import stats_from_histograms
from orchestrator.data.ray_reader import drain, read_images, start_reads

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

    if isinstance(split.images, ObjectImages):
        return _from_object_blocks(split, ids, rows_per_block)

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


@ray.remote
def _rows_table(images: np.ndarray, ids: np.ndarray, labels: np.ndarray, first_row: int) -> pa.Table:
    return pa.table({"id": pa.array(ids), "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[ids - first_row])),
                     "label": pa.array(labels)})


def _from_object_blocks(split: Split, ids: np.ndarray, rows_per_block: int) -> ray.data.Dataset:
    """to_ray_dataset of images already in the object store (ObjectImages): a task per piece of a block cuts the
    rows out where the block is, so the images never pass through this process. Rows keep `ids`' order within a
    block, blocks their order (sorted ids give the same rows in the same order as the driver's arrays would)."""
    images = split.images
    which = images.block_of(ids)
    per_piece = max(1, min(rows_per_block, -(-len(ids) // MIN_RAY_BLOCKS)))
    tables = []
    for block in np.unique(which):
        mine = ids[which == block]
        for piece in np.array_split(mine, -(-len(mine) // per_piece)):
            tables.append(_rows_table.remote(images.blocks[block], piece, split.labels[piece], images.starts[block]))
    return ray.data.from_arrow_refs(tables)


@ray.remote
def _id_block(images: np.ndarray, lo: int, hi: int, first_id: int) -> dict:
    return {"id": np.arange(first_id + lo, first_id + hi, dtype=np.int64), "image": images[lo:hi]}


def put_image_blocks(parts: Sequence[Split], num_blocks: int) -> list[ray.ObjectRef]:
    """The parts' images in `num_blocks` blocks of near-equal size, each {"id", "image"} put in the object store.

    Ids run on across the parts (the second part's first row follows the first's last); a block that spans two
    parts is the only copy made besides the put itself. Images already in the object store (ObjectImages) are cut
    into blocks by tasks where they are, no block spanning two of theirs."""
    if any(isinstance(part.images, ObjectImages) for part in parts):
        return _blocks_in_place(parts, num_blocks)
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


def _blocks_in_place(parts: Sequence[Split], num_blocks: int) -> list[ray.ObjectRef]:
    rows_per_block = max(1, sum(len(part) for part in parts) / max(1, num_blocks))
    blocks, first_id = [], 0
    for part in parts:
        images = part.images
        held = list(zip(images.blocks, images.starts, images.starts[1:])) if isinstance(images, ObjectImages) else [(None, 0, len(part))]
        for ref, start, end in held:
            bounds = np.linspace(0, end - start, max(1, round((end - start) / rows_per_block)) + 1).astype(np.int64)
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                if ref is not None:
                    blocks.append(_id_block.remote(ref, int(lo), int(hi), first_id + start))
                else:
                    blocks.append(ray.put({"id": np.arange(first_id + lo, first_id + hi, dtype=np.int64), "image": images[lo:hi]}))
        first_id += len(part)
    return blocks


def read_planned_images(data: DatasetArrays, cfg: DatasetConfig) -> DatasetArrays:
    """`data` with its planned images (dataset.reader ray), training and test, read into the object store by Ray
    tasks (ray_reader.read_images), and what needed the training pixels filled in: the mean and std (unless the
    config gives them) and the views' padding value. Any other dataset is returned as it is."""
    if not isinstance(data.train.images, PlannedImages):
        return data
    planned_test = isinstance(data.test.images, PlannedImages)
    train_reads = start_reads(data.train.images)
    test_reads = start_reads(data.test.images) if planned_test else []  # they run beside the training split's
    try:
        images, channel_counts, border_counts = read_images(data.train.images, train_reads)
    except Exception:
        drain(test_reads)
        raise
    test_images = read_images(data.test.images, test_reads)[0] if planned_test else data.test.images
    mean, std = stats_from_histograms(channel_counts) if cfg.normalize and cfg.mean is None else (data.mean, data.std)
    return replace(data, train=Split(images, data.train.labels), test=Split(test_images, data.test.labels), mean=mean, std=std,
                   fill=int(border_counts.argmax()))


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
