"""Teacher soft targets: column schema, logit codecs, fingerprint and an on-disk parquet cache.

A teacher's logits for a split are computed once (by the job's teacher actors, warm_pool.py) and
published under `<root>/<fingerprint>/` so no later job or trial re-runs the
teacher. Publishing is atomic: data lands in `<root>/.tmp-<fp>-<uuid>/` and the
directory is renamed into place only after `manifest.json` (complete: true) is
written. Readers validate the manifest against the files before trusting them.

The parquet files are written where the rows are: by the teacher actors, each its own output blocks
(warm_pool.Shards), or by Ray Data's write tasks (`write_cache`). So `<root>` must be visible at the same
path to every Ray node that writes (a local cluster, or a shared filesystem).
A `<root>` that is a URI (s3://, gs://, file://...) has no atomic rename and no
flock: read_cache / write_cache hand it to uri_cache.py, which publishes by
writing the manifest last. Both check entries with cache_manifest.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from orchestrator.errors import ConfigError
from orchestrator.teachers import uri_cache
from orchestrator.teachers.cache_manifest import (  # noqa: F401  (ID_COLUMN, CacheCorruptWarning, load_table: callers import them from here)
    ID_COLUMN,
    MANIFEST,
    CacheCorruptWarning,
    CacheEntry,
    EntryFiles,
    ParquetWriter,
    check_fingerprint,
    check_request,
    describe,
    load_table,
    validate,
)

if TYPE_CHECKING:  # torch and ray are heavy; only the functions that need them import them
    import ray.data
    import torch

ENCODINGS = ("fp16", "fp32", "topk")
DENSE_COLUMN = "teacher_logits"
TOPK_VALUES_COLUMN = "teacher_topk_values"
TOPK_INDICES_COLUMN = "teacher_topk_indices"

# Largest finite float16; larger logits would become inf and softmax would yield NaN.
_FP16_MAX = float(np.finfo(np.float16).max)
_INT16_CLASS_LIMIT = 32768  # spec: int16 indices only when K < 32768
_LIST_KINDS = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)  # tensor storage types


def logit_columns(encoding: str) -> tuple[str, ...]:
    """The parquet columns that hold the teacher output for `encoding` (ConfigError for an unknown one)."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"soft_targets.encoding: unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    return (TOPK_VALUES_COLUMN, TOPK_INDICES_COLUMN) if encoding == "topk" else (DENSE_COLUMN,)


def encode_logits(logits: np.ndarray, *, encoding: str, top_k: int = 5) -> dict[str, np.ndarray]:
    """(N, K) float logits -> the columns of `logit_columns(encoding)`.

    fp16 clips to the finite float16 range (a logit beyond +-65504 is already a
    one-hot softmax, and inf would turn into NaN downstream).
    """
    logit_columns(encoding)  # validates the name
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, K) with K >= 1, got {logits.shape}")
    # A NaN/inf teacher output is a bug upstream; caching it would poison every student.
    if not np.isfinite(logits).all():
        raise ValueError("teacher logits contain NaN or inf")
    if encoding == "fp32":
        return {DENSE_COLUMN: logits}
    if encoding == "fp16":
        return {DENSE_COLUMN: _to_fp16(logits)}
    if top_k < 1:
        raise ConfigError(f"soft_targets.top_k: must be >= 1, got {top_k}")
    values, indices = _top_k(logits, min(top_k, logits.shape[1]))
    index_dtype = np.int16 if logits.shape[1] < _INT16_CLASS_LIMIT else np.int32
    return {TOPK_VALUES_COLUMN: _to_fp16(values), TOPK_INDICES_COLUMN: indices.astype(index_dtype)}


def _to_fp16(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -_FP16_MAX, _FP16_MAX).astype(np.float16)


def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest per row, sorted descending (ties: lower class index first)."""
    if k < logits.shape[1]:
        # argpartition is O(K) per row; only the k survivors get sorted.
        idx = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(k), logits.shape).copy()
    vals = np.take_along_axis(logits, idx, axis=1)
    # lexsort: last key is primary (value descending), then class index ascending.
    order = np.lexsort((idx, -vals), axis=1)
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def decode_logits(columns: Mapping[str, "torch.Tensor | np.ndarray"], *, num_classes: int) -> "torch.Tensor":
    """Columns of one batch -> float32 torch logits (N, num_classes); encoding inferred from the columns.

    Top-k is decoded as "renormalised top-k" sparse KD: every class outside the
    kept k gets -inf, so softmax(logits / T) at ANY temperature T is exactly the
    teacher's distribution renormalised over its top k classes (the dropped mass
    is not spread over the tail). `F.kl_div(student_log_probs, teacher_probs)`
    stays finite because terms with teacher probability 0 contribute 0; do not
    use `log_target=True` with these logits (exp(-inf) * -inf is NaN).
    """
    import torch

    dense = DENSE_COLUMN in columns
    sparse = TOPK_VALUES_COLUMN in columns and TOPK_INDICES_COLUMN in columns
    if dense == sparse:
        expected = f"{DENSE_COLUMN!r} or both {TOPK_VALUES_COLUMN!r} and {TOPK_INDICES_COLUMN!r}"
        raise ValueError(f"cannot infer the soft-target encoding from columns {sorted(columns)}: expected {expected}")
    if dense:
        logits = torch.as_tensor(columns[DENSE_COLUMN]).to(torch.float32)
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ValueError(f"{DENSE_COLUMN} has shape {tuple(logits.shape)}, expected (N, {num_classes}) classes")
        return logits
    values = torch.as_tensor(columns[TOPK_VALUES_COLUMN]).to(torch.float32)
    indices = torch.as_tensor(columns[TOPK_INDICES_COLUMN], device=values.device).to(torch.int64)
    if values.ndim != 2 or values.shape != indices.shape:
        raise ValueError(f"top-k values {tuple(values.shape)} and indices {tuple(indices.shape)} differ in shape")
    # Checked where it costs nothing: on a GPU the check would stall every step on a host read (the
    # cache's rows were checked on the CPU when the driver read them).
    if indices.device.type == "cpu" and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_classes):
        raise ValueError(f"top-k indices out of range for {num_classes} classes")
    out = torch.full((values.shape[0], num_classes), float("-inf"), dtype=torch.float32, device=values.device)
    return out.scatter_(1, indices, values)


def column_to_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy: scalars -> (N,), per-row vectors -> (N, K) with the stored dtype.

    Handles Ray's tensor extension (ArrowTensorType/V2, present when ray is
    imported), Arrow's native fixed_shape_tensor, and the plain list /
    large_list / fixed_size_list that pyarrow yields when the extension type is
    not registered in the reading process.
    """
    column = table.column(name)
    # BaseExtensionType: Arrow's own fixed_shape_tensor is not a pa.ExtensionType (that is the Python-defined kind).
    storage_type = column.type.storage_type if isinstance(column.type, pa.BaseExtensionType) else column.type
    if not any(is_kind(storage_type) for is_kind in _LIST_KINDS):
        if pa.types.is_struct(storage_type):
            raise ValueError(f"column {name!r} holds variable-shaped tensors; soft targets must be (N, K)")
        return column.to_numpy()
    width = _list_width(column.type)
    parts = []
    for chunk in (c.storage if isinstance(c, pa.ExtensionArray) else c for c in column.chunks):
        if chunk.null_count:
            raise ValueError(f"column {name!r} has null rows")
        if len(chunk):
            lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
            width = int(lengths[0]) if width is None else width
            if (lengths != width).any():
                raise ValueError(f"column {name!r} rows have different lengths; expected {width}")
        # flatten() honours slice offsets, unlike .values
        parts.append(chunk.flatten().to_numpy(zero_copy_only=False))
    dtype = storage_type.value_type.to_pandas_dtype()
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    return flat.astype(dtype, copy=False).reshape(-1, width or 0)


def _list_width(t: pa.DataType) -> int | None:
    """Row width when the type declares it (an empty column has no rows to measure); else None."""
    shape = getattr(t, "shape", None)  # Ray's tensor types and Arrow's fixed_shape_tensor
    if shape is not None and len(shape) == 1:
        return int(shape[0])
    return t.list_size if pa.types.is_fixed_size_list(t) else None


def fingerprint(parts: Mapping[str, object]) -> str:
    """First 20 hex chars of sha256 over canonical JSON of `parts` (stable across processes and key order)."""
    text = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:20]


def _canonical(obj: Any) -> Any:
    # Python's json writes floats with repr(), which round-trips exactly; numpy scalars
    # and tuples are normalised so the same value always hashes the same.
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"fingerprint keys must be strings, got {sorted(map(repr, obj))}")
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}: {obj!r}")


def cache_path(root: str | Path, fp: str) -> Path:
    return Path(root).resolve() / check_fingerprint(fp)


def read_cache(root: str | Path, fp: str) -> CacheEntry | None:
    """The validated entry for `fp`, or None (a corrupt one is warned about and moved aside;
    under a URI root only warned about, see uri_cache.py)."""
    if uri_cache.is_uri(root):
        return uri_cache.read_uri_cache(root, fp)
    path = cache_path(root, fp)
    if not path.exists():
        return None
    manifest, problem = _validate(path, fp)
    if problem is None:
        return CacheEntry(path=path, manifest=manifest)
    message = f"soft-target cache {path}: {problem}; discarding it, it will be rebuilt"
    warnings.warn(message, CacheCorruptWarning, stacklevel=2)
    _move_aside(path, fp)
    return None


def _validate(path: Path, fp: str) -> tuple[dict, str | None]:
    """(manifest, None) when `path` is a complete cache for `fp`, else ({}, why not)."""
    return validate(lambda: (path / MANIFEST).read_text(), fp, EntryFiles(pafs.LocalFileSystem(), path))


def _move_aside(path: Path, fp: str) -> None:
    # Rename first (atomic), delete after: a concurrent reader never sees a half-deleted committed dir.
    trash = path.parent / f".trash-{fp}-{uuid.uuid4().hex}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # another process already moved it
    _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # leftovers are swept by clean_stale_tmp
    else:
        path.unlink(missing_ok=True)


def write_cache(
    ds: "ray.data.Dataset", root: str | Path, fp: str, *, columns: Sequence[str], extra_manifest: Mapping | None = None
) -> CacheEntry:
    """Write `ds` (its `columns`) as the cache entry for `fp`; publish atomically, first writer wins."""
    def write(directory: str, filesystem: pafs.FileSystem | None) -> None:
        ds.select_columns(list(columns)).write_parquet(directory, filesystem=filesystem)

    return publish_cache(write, root, fp, columns=columns, extra_manifest=extra_manifest)


def publish_cache(
    write: ParquetWriter, root: str | Path, fp: str, *, columns: Sequence[str], extra_manifest: Mapping | None = None
) -> CacheEntry:
    """`write(directory, filesystem)` writes the entry's parquet files (its `columns`) into a directory no reader
    knows yet (filesystem None: a local path, which every node writing must see); then the manifest is written
    and the entry published (here atomically, first writer wins; under a URI root, see uri_cache.py)."""
    if uri_cache.is_uri(root):
        return uri_cache.publish_uri_cache(write, root, fp, columns=columns, extra_manifest=extra_manifest)
    final = cache_path(root, fp)  # absolute: Ray workers do not share the driver's cwd
    columns, extra = check_request(columns, extra_manifest)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{fp}-{uuid.uuid4().hex}"
    try:
        write(str(tmp), None)
        manifest = _describe(tmp, fp, columns, extra)
        _write_manifest(tmp, manifest)
        return _publish(tmp, final, fp, manifest)
    finally:
        if tmp.exists():  # failed, or another job won the race
            _remove(tmp)


def _describe(tmp: Path, fp: str, columns: list[str], extra: dict) -> dict:
    files = sorted(p for p in tmp.rglob("*.parquet") if p.is_file())
    for file in files:
        _fsync(file)  # the manifest must never reach disk before the data it vouches for
    names = [file.relative_to(tmp).as_posix() for file in files]
    return describe(names, EntryFiles(pafs.LocalFileSystem(), tmp), fp, columns, extra)


def _write_manifest(tmp: Path, manifest: dict) -> None:
    staging = tmp / (MANIFEST + ".tmp")
    with open(staging, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(staging, tmp / MANIFEST)
    _fsync(tmp)


def _publish(tmp: Path, final: Path, fp: str, manifest: dict) -> CacheEntry:
    for _ in range(5):
        try:
            os.rename(tmp, final)  # atomic; fails if a non-empty final already exists
            _fsync(final.parent)
            return CacheEntry(path=final, manifest=manifest)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
        existing = read_cache(final.parent, fp)  # moves an invalid one aside, so the next rename can succeed
        if existing is not None:
            return existing  # another job won the race; its entry is as good as ours
    raise RuntimeError(f"could not publish soft-target cache {final}: it keeps reappearing invalid")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def build_lock(directory: str | Path, name: str) -> Iterator[float]:
    """Hold an exclusive lock on building `name` under `directory`; yields the seconds spent waiting for it.

    Two jobs that need the same cache entry (or trained teacher) at once: the first builds, the second
    waits here and then finds the finished entry instead of repeating the work. `flock` is released by
    the kernel when its holder dies, even by SIGKILL, so a crashed builder never blocks the next one;
    lock files are left in place (removing one that another process waits on would break the lock).
    On a shared filesystem this relies on its flock support (NFSv4 and Lustre have it).
    A URI `directory` (an object store) has no locks: the lock is then taken on this machine only,
    which still serialises the jobs of one Ray cluster (submitted jobs' drivers run on its head node);
    jobs elsewhere may build the same entry twice, and uri_cache.py keeps one of the two.
    """
    try:
        check_fingerprint(name)  # a lock file name, with the same rules as an entry name
    except ValueError:
        raise ValueError(f"invalid lock name {name!r}") from None
    folder = _local_lock_folder(directory) if uri_cache.is_uri(directory) else Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(folder / f".lock-{name}", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _local_lock_folder(uri: str) -> Path:
    # One folder per cache URI, so two caches never share a lock; the hash keeps credentials out of the name.
    return Path(tempfile.gettempdir()) / "kd-cache-locks" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def clean_stale_tmp(root: str | Path, *, older_than_s: float = 3600) -> int:
    """Remove `.tmp-*` / `.trash-*` leftovers of crashed writers untouched for `older_than_s`; returns how many.

    The age is the newest mtime of the dir and its direct children, so a writer
    still adding files is not swept; keep `older_than_s` above the longest write.
    Under a URI root: writer directories no manifest names, see uri_cache.clean_stale.
    """
    if uri_cache.is_uri(root):
        return uri_cache.clean_stale(root, older_than_s=older_than_s)
    root = Path(root)
    if not root.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for path in root.iterdir():
        if not path.name.startswith((".tmp-", ".trash-")):
            continue
        try:
            children = list(path.iterdir()) if path.is_dir() and not path.is_symlink() else []
            newest = max([path.lstat().st_mtime, *(p.lstat().st_mtime for p in children)])
        except OSError:
            continue  # vanished or unreadable mid-scan: another cleaner got there first
        if newest < cutoff:
            _remove(path)
            removed += 1
    return removed
