"""A parquet source read by Ray tasks (`dataset.reader` unset or `ray`): no image passes through the driver. An image
folder's plan (folder_reader.py) and the bundled MNIST's and Fashion-MNIST's (bundled_reader.py) are read by the same
functions, one task per span of files or rows.

Before Ray starts (`plan_parquet`, from datasets.load_arrays in job.prepare) the driver reads each source's
footers, its label column (8 bytes a row; a transfer set's not even that) and one image for the shape: every
check that needs no pixel fails there, exit 2 before Ray starts. Once Ray runs (`read_images`, called by
ray_objects.read_planned_images from job.start_job while the warm teacher actors start), one task per span of
row groups reads its image column where it runs, decodes and checks it with the driver reader's own checks
(parquet_source), and leaves the uint8 block in the object store beside its statistics: per-channel value
counts (the exact mean and std), the border's counts (the views' padding) and a digest (the split's
fingerprint); the test split's tasks are started with the training split's and run beside them. A bad image is
still one line naming the file and the column, exit 2, before any training. The driver keeps references
(object_images.ObjectImages), for the test split too: the models are scored where the test blocks are read
(flows/finished.py, on a teacher actor or a task), never in the driver.

Why tasks of our own rather than `ray.data.read_parquet`: row i's image must stay beside label i, which the
driver reads in the same file and row-group order, and the statistics come from the same pass over the pixels;
Ray Data would reorder blocks unless told not to and would need a second pass for the statistics. The students'
datasets are Ray Datasets made from these blocks in the cluster (ray_objects.to_ray_dataset).

With `id_column`, the driver also reads the ids (8 bytes a row) and the rows are put in id order after the read:
tasks gather the read blocks' rows into new blocks in that order (`_in_order`), so the split, the views and the
fingerprint depend on the ids, not on the files' order, as with the driver's reader; `limit` and `test_limit`
keep the smallest ids.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow.parquet as pq
import ray

from orchestrator.config import ConfigError, DatasetConfig
from orchestrator.data.bundled_reader import CsvSpan, IdxSpan, read_csv_rows, read_idx_rows
from orchestrator.data.folder_reader import FileSpan, read_files
from orchestrator.data.object_images import ROWS_PER_READ, ObjectImages, PlannedImages, ReadSpan, block_of, block_starts, combined_digest
from orchestrator.data.parquet_source import (
    UNLABELLED,
    check_same_shape,
    class_count,
    columns,
    id_order,
    images_of,
    labels_of,
    open_source,
)
from orchestrator.data.pixel_stats import block_stats

# The read task of each other kind of span, which names its own files (a parquet span's come with the plan: _read_span).
SPAN_READERS = {FileSpan: read_files, CsvSpan: read_csv_rows, IdxSpan: read_idx_rows}


def plan_parquet(cfg: DatasetConfig) -> tuple[PlannedImages, np.ndarray, PlannedImages, np.ndarray, int]:
    """(the training images' plan, train labels, the test images' plan, test labels, number of classes)."""
    train, train_labels = _plan_split(cfg, "train_path", cfg.train_labels, cfg.limit)
    test, test_labels = _plan_split(cfg, "test_path", True, cfg.test_limit)
    check_same_shape(cfg, train.shape, test.shape)
    return train, train_labels, test, test_labels, class_count(cfg, train_labels, test_labels)


def _plan_split(cfg: DatasetConfig, field: str, labelled: bool, limit: int | None) -> tuple[PlannedImages, np.ndarray]:
    """One source's plan and labels (UNLABELLED for a transfer set), read from its footers, label and id columns."""
    image_column, label_column = columns(cfg)
    where = getattr(cfg, field)
    source = open_source(where, [image_column, *([label_column] if labelled else []), *([cfg.id_column] if cfg.id_column else [])], field)
    # With ids, `limit` keeps the smallest ids (as the driver's reader does): every row is read, the kept ones chosen by id.
    spans = plan_spans(source, None if cfg.id_column else limit)
    rows = sum(span.rows for span in spans)
    if rows == 0:
        raise ConfigError(f"dataset.{field}: {where} has no rows")
    per_row = [*([label_column] if labelled else []), *([cfg.id_column] if cfg.id_column else [])]
    table = source.read(columns=per_row).slice(0, rows) if per_row else None  # one pass over the files for both columns
    order = id_order(table.column(cfg.id_column), where, cfg.id_column)[:limit] if cfg.id_column else None
    labels = labels_of(table.column(label_column), where, label_column) if labelled else np.full(rows, UNLABELLED, dtype=np.int64)
    labels = labels if order is None else labels[order]
    first = _read_rows(source.filesystem, spans[0], image_column, 1)
    image_shape = images_of(first.column(image_column), where, image_column, cfg.image_shape).shape[1:]
    planned = PlannedImages(shape=(len(labels), *image_shape), dtype=np.dtype(np.uint8), spans=tuple(spans), filesystem=source.filesystem,
                            column=image_column, image_shape=tuple(cfg.image_shape) if cfg.image_shape else None, order=order)
    return planned, labels


def plan_spans(source: pq.ParquetDataset, limit: int | None = None) -> list[ReadSpan]:
    """Read tasks over the source's files and row groups, in the order `source.read()` returns rows, up to `limit` rows."""
    spans, total = [], 0
    for path in source.files:
        with source.filesystem.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata  # the footer only
        group, rows = [], 0
        for index in range(meta.num_row_groups):
            take = meta.row_group(index).num_rows
            if limit is not None:
                take = min(take, limit - total - rows)
            if take <= 0:
                break
            group.append(index)
            rows += take
            if rows >= ROWS_PER_READ:
                spans.append(ReadSpan(path, tuple(group), rows))
                total, group, rows = total + rows, [], 0
        if group:
            spans.append(ReadSpan(path, tuple(group), rows))
            total += rows
        if limit is not None and total >= limit:
            break
    return spans


def start_reads(planned: PlannedImages) -> list:
    """One read task per planned span (row groups of a parquet file, an image folder's files, a bundled file's rows),
    submitted and not waited for: (block, statistics) references. A caller with two splits starts both before
    waiting on either, so the test split's reads run beside the training split's."""
    return [_read_span.remote(planned.filesystem, span, planned.column, planned.image_shape) if isinstance(span, ReadSpan)
            else SPAN_READERS[type(span)].remote(span) for span in planned.spans]


def drain(reads: list) -> None:
    """Wait for reads whose results are no longer wanted (another split's read failed), so a failure among them is
    not printed by Ray as an "Unhandled error" on the user's console as the references go."""
    _wait_for(reads)


def read_images(planned: PlannedImages, reads: list | None = None) -> tuple[ObjectImages, np.ndarray, np.ndarray]:
    """The planned images read into the object store by one task per span (`reads`, from start_reads, or started
    here): (ObjectImages, the (C, 256) value counts per channel, the border's value counts), the counts summed over
    the blocks."""
    reads = start_reads(planned) if reads is None else reads
    stats = _statistics(reads)
    for span, stat in zip(planned.spans, stats):
        if stat["shape"] != tuple(planned.shape[1:]):
            raise ConfigError(f"dataset: {span.path} column {planned.column!r} has images of mixed shapes "
                              f"({tuple(planned.shape[1:])} and {stat['shape']})")
    starts = block_starts([s["rows"] for s in stats])
    if planned.order is not None:  # blocks in id order, so the split (and its fingerprint) does not depend on file order
        reads = _in_order([r[0] for r in reads], starts, planned.order)
        stats = _statistics(reads)
        starts = block_starts([s["rows"] for s in stats])
    images = ObjectImages(tuple(r[0] for r in reads), starts, tuple(planned.shape[1:]),
                          combined_digest([s["digest"] for s in stats], planned.shape[1:]))
    return images, sum(s["channels"] for s in stats), sum(s["border"] for s in stats)


def _in_order(blocks: list, starts: tuple[int, ...], order: np.ndarray) -> list:
    """New blocks of about ROWS_PER_READ rows holding rows `order` (numbers into the blocks' rows) in that order,
    each gathered by a task from the blocks its rows are in; (block, statistics) references as the reads'."""
    gathers = []
    for begin in range(0, len(order), ROWS_PER_READ):
        rows = order[begin:begin + ROWS_PER_READ]
        which = block_of(starts, rows)
        needed = np.unique(which)
        gathers.append(_gather_rows.remote(np.searchsorted(needed, which), rows - np.asarray(starts)[which], *[blocks[b] for b in needed]))
    return gathers


def _wait_for(reads: list) -> tuple[list[dict], list[ray.exceptions.RayTaskError]]:
    """Every read waited for: the statistics of those that worked, the errors of those that failed. Only the small
    statistics are fetched; a block is read only where its task failed (an error, holding no data), so that Ray does
    not report it as unhandled."""
    stats, failed = [], []
    for block, stat in reads:
        try:
            stats.append(ray.get(stat))
        except ray.exceptions.RayTaskError as exc:
            failed.append(exc)
            with contextlib.suppress(ray.exceptions.RayTaskError):
                ray.get(block)
    return stats, failed


def _statistics(reads: list) -> list[dict]:
    """Each read's statistics, once all are done. A read that failed on bad data raises its ConfigError as one line
    (exit 2, cli.py), as the driver's reader would; its unread block is read too (an error), so Ray does not print
    an "Unhandled error" for it on the user's console as the reference goes."""
    stats, failed = _wait_for(reads)
    if failed:
        if isinstance(failed[0].cause, ConfigError):
            raise ConfigError(str(failed[0].cause)) from None
        raise failed[0]
    return stats


def _read_rows(filesystem, span: ReadSpan, column: str, rows: int | None = None):
    with filesystem.open_input_file(span.path) as handle:
        table = pq.ParquetFile(handle).read_row_groups(list(span.row_groups), columns=[column])
    return table.slice(0, span.rows if rows is None else rows)


@ray.remote(num_returns=2)
def _gather_rows(source: np.ndarray, row: np.ndarray, *blocks: np.ndarray) -> tuple[np.ndarray, dict]:
    """Output row i is row `row[i]` of `blocks[source[i]]`; with its statistics, as a read's."""
    out = np.empty((len(row), *blocks[0].shape[1:]), dtype=np.uint8)
    for index, block in enumerate(blocks):
        hit = source == index
        out[hit] = block[row[hit]]
    return out, block_stats(out)


@ray.remote(num_returns=2)
def _read_span(filesystem, span: ReadSpan, column: str, image_shape: tuple[int, ...] | None) -> tuple[np.ndarray, dict]:
    """One span's images, decoded and checked where this task runs, and their statistics (pixel_stats.block_stats)."""
    where = f"{span.path} (row groups {span.row_groups[0]}-{span.row_groups[-1]})"
    images = images_of(_read_rows(filesystem, span, column).column(column), where, column, list(image_shape) if image_shape else None)
    return images, block_stats(images)
