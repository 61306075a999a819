"""Bring-your-own data: a train and a test parquet source, read with pyarrow into the project's arrays.

A source is a parquet file or a folder of them, on local disk or behind any pyarrow URI (s3://,
gs://, hdfs://, file://), written by whatever made it: pandas, Spark, Ray Data, Hugging Face
datasets. The config names the columns. Images may be

- encoded bytes (PNG, JPEG, anything Pillow opens), decoded to grey or RGB as stored;
- nested lists, (H, W) or (H, W, C) per row, or one flat list with `dataset.image_shape` = [C, H, W];
- uint8 pixels, other integers in [0, 255], or floats in [0, 1].

With `dataset.train_labels: false` the training source needs no label column: it is a transfer set (Hinton et
al. 2015, section 3), whose rows the students learn from a given teacher alone; the test source keeps its labels.

Anything else is refused with one line naming the source and the column (a ConfigError, so the CLI
exits 2 before Ray starts): a missing column, no rows, a null or non-integer label, a label outside
the class range, NaN pixels, images of mixed shapes.

Here the rows are read into this process (`dataset.reader: driver`); with `dataset.reader: ray` the
images of both sources are read by Ray tasks with these same checks (data/ray_reader.py).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.config import DatasetConfig
from orchestrator.errors import ConfigError

DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_LABEL_COLUMN = "label"
# The label of a training row read with dataset.train_labels false: no class. A loss that read it (cross-entropy)
# would fail on it rather than learn from a made-up class; the job's config keeps such losses away (config/job.py).
UNLABELLED = -1


def load_parquet(cfg: DatasetConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(train images, train labels, test images, test labels, number of classes) from the two sources.

    Images are uint8 (N, C, H, W), labels int64 (N,); checked as described in the module docstring."""
    train_images, train_labels = read_split(cfg, "train_path")
    test_images, test_labels = read_split(cfg, "test_path")
    check_same_shape(cfg, train_images.shape, test_images.shape)
    return train_images, train_labels, test_images, test_labels, class_count(cfg, train_labels, test_labels)


def check_same_shape(cfg: DatasetConfig, train_shape: tuple[int, ...], test_shape: tuple[int, ...]) -> None:
    """One image shape in both sources, else one line naming both."""
    if tuple(train_shape[1:]) != tuple(test_shape[1:]):
        raise ConfigError(f"dataset: images in {cfg.train_path} are {tuple(train_shape[1:])} but in {cfg.test_path} {tuple(test_shape[1:])}")


def read_split(cfg: DatasetConfig, field: str) -> tuple[np.ndarray, np.ndarray]:
    """One source's (images, labels), read into this process; a transfer set's labels are UNLABELLED."""
    image_column, label_column = columns(cfg)
    where = getattr(cfg, field)
    labelled = field == "test_path" or cfg.train_labels
    table = _read(where, [image_column, *([label_column] if labelled else []), *([cfg.id_column] if cfg.id_column else [])], field)
    if cfg.id_column:
        table = _ordered_by_id(table, cfg.id_column, where)
    labels = labels_of(table.column(label_column), where, label_column) if labelled else np.full(table.num_rows, UNLABELLED, dtype=np.int64)
    return images_of(table.column(image_column), where, image_column, cfg.image_shape), labels


def columns(cfg: DatasetConfig) -> tuple[str, str]:
    """(image column, label column) as configured or by default."""
    return cfg.image_column or DEFAULT_IMAGE_COLUMN, cfg.label_column or DEFAULT_LABEL_COLUMN


def class_count(cfg: DatasetConfig, train_labels: np.ndarray, test_labels: np.ndarray) -> int:
    """dataset.num_classes, else the largest label + 1; every label checked against it."""
    num_classes = cfg.num_classes or int((train_labels if cfg.train_labels else test_labels).max()) + 1
    for where, labels in ((cfg.train_path, train_labels), (cfg.test_path, test_labels)):
        if labels.max() >= num_classes:
            raise ConfigError(f"dataset: {where} column {columns(cfg)[1]!r} has label {int(labels.max())}, outside [0, {num_classes}) "
                              f"({'dataset.num_classes' if cfg.num_classes else 'the largest training label + 1'})")
    return num_classes


def open_source(where: str, columns: list[str], field: str) -> pq.ParquetDataset:
    """The source's files and schema (footers only), its columns checked."""
    try:
        dataset = pq.ParquetDataset(where)  # a file or a folder, local or a URI: footers only until read()
        schema = dataset.schema
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise ConfigError(f"dataset.{field}: cannot read parquet {where} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ConfigError(f"dataset: {where} has no column {missing[0]!r} (columns: {', '.join(schema.names)})")
    return dataset


def _read(where: str, columns: list[str], field: str) -> pa.Table:
    table = open_source(where, columns, field).read(columns=columns)
    if table.num_rows == 0:
        raise ConfigError(f"dataset.{field}: {where} has no rows")
    return table


def _ordered_by_id(table: pa.Table, id_column: str, where: str) -> pa.Table:
    return table.take(id_order(table.column(id_column), where, id_column))


def id_order(ids: pa.ChunkedArray, where: str, id_column: str) -> np.ndarray:
    """The rows' indices in ascending id order; null or repeated ids are one line naming file and column."""
    if ids.null_count:
        raise ConfigError(f"dataset: {where} column {id_column!r} has {ids.null_count} null id(s)")
    if pc.count_distinct(ids).as_py() != len(ids):
        raise ConfigError(f"dataset: {where} column {id_column!r} has repeated ids")
    return pc.sort_indices(ids).to_numpy().astype(np.int64)


def labels_of(column: pa.ChunkedArray, where: str, name: str) -> np.ndarray:
    if column.null_count:
        raise ConfigError(f"dataset: {where} column {name!r} has {column.null_count} missing label(s)")
    if not pa.types.is_integer(column.type):
        raise ConfigError(f"dataset: {where} column {name!r} must hold integer class ids, not {column.type}")
    labels = column.to_numpy().astype(np.int64)
    if labels.min() < 0:
        raise ConfigError(f"dataset: {where} column {name!r} has a negative label ({int(labels.min())})")
    return labels


def images_of(column: pa.ChunkedArray, where: str, name: str, image_shape: list[int] | None) -> np.ndarray:
    if column.null_count:
        raise ConfigError(f"dataset: {where} column {name!r} has {column.null_count} missing image(s)")
    column = column.combine_chunks()
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        pixels = _decoded(column, where, name)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        pixels = _from_lists(column, where, name)
    else:
        raise ConfigError(f"dataset: {where} column {name!r} is {kind}: expected encoded image bytes or lists of pixels")
    if image_shape is not None:
        if int(np.prod(pixels.shape[1:])) != int(np.prod(image_shape)):
            raise ConfigError(f"dataset: {where} column {name!r} has {int(np.prod(pixels.shape[1:]))} pixels per image, "
                              f"dataset.image_shape {image_shape} needs {int(np.prod(image_shape))}")
        return np.ascontiguousarray(pixels.reshape(len(pixels), *image_shape))
    if pixels.ndim == 2:
        raise ConfigError(f"dataset: {where} column {name!r} holds flat pixel lists: set dataset.image_shape to [C, H, W]")
    if pixels.ndim == 3:  # (N, H, W): one channel
        return np.ascontiguousarray(pixels[:, None])
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # (N, H, W, C), the way images are stored, to (N, C, H, W)


def _from_lists(column: pa.Array, where: str, name: str) -> np.ndarray:
    """Nested list rows of one shape to an (N, ...) uint8 array, without a Python loop over rows."""
    shape = [len(column)]
    values: pa.Array = column
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != lengths.max() or lengths.min() == 0):
            raise ConfigError(f"dataset: {where} column {name!r} has images of mixed shapes ({int(lengths.min())} and {int(lengths.max())} "
                              f"values at depth {len(shape)})")
        shape.append(int(lengths[0]) if len(lengths) else 0)
        values = pc.list_flatten(values)
    if values.null_count:
        raise ConfigError(f"dataset: {where} column {name!r} has missing pixel values")
    return _to_uint8(values.to_numpy(zero_copy_only=False).reshape(shape), where, name)


def _decoded(column: pa.Array, where: str, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    images = []
    for row, data in enumerate(column.to_pylist()):
        try:
            with Image.open(io.BytesIO(data)) as image:
                images.append(np.asarray(image.convert("L" if image.mode in ("1", "L", "I;16", "I") else "RGB"), dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"dataset: {where} column {name!r} row {row} is not a readable image ({type(exc).__name__})") from None
        if images[-1].shape != images[0].shape:
            raise ConfigError(f"dataset: {where} column {name!r} has images of mixed shapes ({images[0].shape} and {images[-1].shape}, row {row})")
    return np.stack(images)


def _to_uint8(pixels: np.ndarray, where: str, name: str) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if np.issubdtype(pixels.dtype, np.floating):
        if not np.isfinite(pixels).all():
            raise ConfigError(f"dataset: {where} column {name!r} has NaN or infinite pixels")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ConfigError(f"dataset: {where} column {name!r} has float pixels outside [0, 1] ({pixels.min():g} to {pixels.max():g})")
        return np.rint(pixels * 255).astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.integer):
        if pixels.min() < 0 or pixels.max() > 255:
            raise ConfigError(f"dataset: {where} column {name!r} has integer pixels outside [0, 255] ({pixels.min()} to {pixels.max()})")
        return pixels.astype(np.uint8)
    raise ConfigError(f"dataset: {where} column {name!r} holds {pixels.dtype} values, not pixels")
