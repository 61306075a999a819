"""Soft-target rows (one per example id and view, as the cache stores them) as per-id columns, assembled in a
Ray task so the rows never pass through the driver.

A light module on purpose: the task's worker imports it (numpy, pyarrow, ray), not the training stack."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from orchestrator.teachers.cache_manifest import CacheEntry, load_table
from orchestrator.teachers.soft_targets import column_to_numpy


def gather_soft_targets(columns: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
    """The encoded logits of every view of each row, looked up by its id: {name: (len(ids), V, ...)}.

    `columns` are the train columns below (row i = train id i), as the train workers map them from the object
    store; ids are dense row indices, so the join with a batch of images is an array gather, not a shuffle join."""
    return {name: values[ids] for name, values in columns.items()}


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
