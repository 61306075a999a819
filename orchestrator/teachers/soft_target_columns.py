"""Soft-target rows (one per example id and view, as the cache stores them) as per-id columns, assembled in a
Ray task so the rows never pass through the driver, or read by each train worker for its own rows only
(`read_own_soft_targets`, soft_targets.worker_reads: cache).

A light module on purpose: the task's worker imports it (numpy, pyarrow, ray), not the training stack."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from orchestrator.teachers.cache_manifest import ID_COLUMN, CacheEntry, entry_files, load_table
from orchestrator.teachers.soft_targets import column_to_numpy


@dataclass(frozen=True)
class OwnSoftTargets:
    """The encoded logits of some train ids only (a worker's own rows, read from the cache's files): row i of each
    column, (len(ids), V, ...), belongs to id `ids[i]`; ids ascending."""

    ids: np.ndarray
    columns: dict[str, np.ndarray]


def gather_soft_targets(columns: dict[str, np.ndarray] | OwnSoftTargets, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The encoded logits of every view of each row, looked up by its id: {name: (len(ids), V, ...)}.

    `columns` are the train columns below (row i = train id i), as the train workers map them from the object
    store; ids are dense row indices, so the join with a batch of images is an array gather, not a shuffle join.
    Or a worker's own rows (OwnSoftTargets): the same gather after a binary search of the ids."""
    if isinstance(columns, OwnSoftTargets):
        rows = np.searchsorted(columns.ids, ids)
        if len(ids) and (rows.max() >= len(columns.ids) or not np.array_equal(columns.ids[rows], ids)):
            raise KeyError("a row's id is not among the soft targets this worker read")
        return {name: values[rows] for name, values in columns.columns.items()}
    return {name: values[ids] for name, values in columns.items()}


def read_own_soft_targets(entry: CacheEntry, logit_names: list[str], ids: np.ndarray) -> tuple[OwnSoftTargets, dict[str, int]]:
    """The soft targets of `ids` (every view of each) from the cache entry's files, reading only the files whose id
    range (in the manifest) holds one of them: a train worker's own shard, read where the worker runs. Returns them
    with {"files_read", "files", "rows_read"}. Every id must have the same views 0..V-1, exactly once each."""
    wanted = np.unique(np.asarray(ids, dtype=np.int64))
    files = entry_files(entry)
    listed = entry.manifest["files"]
    chosen = [item for item in listed if _may_hold(item, wanted)]
    read = [pq.read_table(files.path(item["name"]), columns=[ID_COLUMN, "view", *logit_names], filesystem=files.filesystem) for item in chosen]
    table = pa.concat_tables(read) if read else pa.table({ID_COLUMN: pa.array([], pa.int64()), "view": pa.array([], pa.int64())})
    rows_read = table.num_rows
    table = table.filter(pc.is_in(table[ID_COLUMN], value_set=pa.array(wanted))).sort_by([(ID_COLUMN, "ascending"), ("view", "ascending")])
    views = table.num_rows // max(1, len(wanted))
    got_ids, got_views = column_to_numpy(table, ID_COLUMN), column_to_numpy(table, "view")
    if views == 0 or not (np.array_equal(got_ids, np.repeat(wanted, views)) and np.array_equal(got_views, np.tile(np.arange(views), len(wanted)))):
        raise RuntimeError(f"soft-target cache {entry.path}: its files do not hold every view of these {len(wanted)} ids exactly once")
    columns = {}
    for name in logit_names:
        values = column_to_numpy(table, name)
        columns[name] = values.reshape(len(wanted), views, *values.shape[1:])
    return OwnSoftTargets(wanted, columns), {"files_read": len(chosen), "files": len(listed), "rows_read": rows_read}


def _may_hold(item: dict, wanted: np.ndarray) -> bool:
    """Whether a listed file may hold one of the sorted `wanted` ids (a file without an id range may hold any)."""
    if "id_range" not in item:
        return True
    low, high = item["id_range"]
    first = np.searchsorted(wanted, low)
    return bool(first < len(wanted) and wanted[first] <= high)


def columns_by_id_and_view(table: pa.Table, columns: list[str], *, n_train: int, n_test: int, views: int) -> tuple[dict, dict]:
    """Cache rows -> ({name: (n_train, V, ...)}, {name: (n_test, ...)}), checking that every (id, view) is there once."""
    table = table.sort_by([("id", "ascending"), ("view", "ascending")])
    ids, view = column_to_numpy(table, "id"), column_to_numpy(table, "view")
    want_ids = np.concatenate([np.repeat(np.arange(n_train), views), np.arange(n_train, n_train + n_test)])
    want_views = np.concatenate([np.tile(np.arange(views), n_train), np.zeros(n_test, dtype=np.int64)])
    if not (np.array_equal(ids, want_ids) and np.array_equal(view, want_views)):
        raise RuntimeError(f"soft targets do not cover every (example, view) exactly once ({n_train} x {views} train, {n_test} test)")
    split = n_train * views
    train, test = {}, {}
    for name in columns:
        values = column_to_numpy(table, name)
        train[name] = values[:split].reshape(n_train, views, *values.shape[1:])
        test[name] = values[split:]
    return train, test


# num_cpus=0: short, and never to wait for a CPU that a train worker or a sweep trial holds.
@ray.remote(num_cpus=0, num_returns=3)
def assemble_soft_targets(source: CacheEntry | None, columns: list[str], logit_names: list[str], shape: dict[str, int],
                          *tables: pa.Table) -> tuple[dict, dict, dict]:
    """In a task, not the driver: cache rows -> (train columns, test columns, a small summary) in the object store.

    The rows come from `tables` (the actor pool's output blocks, resolved by Ray from their references) or, with
    `source` given, from that cache entry's files, read by this task where it runs."""
    table = load_table(source, columns) if source is not None else pa.concat_tables(tables)
    train, test = columns_by_id_and_view(table, logit_names, **shape)
    return train, test, {"rows": table.num_rows}


@ray.remote(num_cpus=0)
def teacher_sample(train_columns: dict[str, np.ndarray], num_classes: int, rows: int):
    """Decoded teacher logits (a torch tensor) of up to `rows` training (example, view) entries, evenly strided."""
    import torch  # only where a sample is wanted (auto T and alpha)

    from orchestrator.teachers.soft_targets import decode_logits

    flat = {name: values.reshape(-1, *values.shape[2:]) for name, values in train_columns.items()}
    n = len(next(iter(flat.values())))
    index = np.linspace(0, n - 1, min(rows, n)).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    return decode_logits({name: torch.from_numpy(np.ascontiguousarray(v[index])) for name, v in flat.items()}, num_classes=num_classes)
