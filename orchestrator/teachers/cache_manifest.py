"""The soft-target cache's manifest: what an entry is, how its manifest is built and checked.

Shared by the two ways an entry is published (soft_targets.py: a local or mounted directory,
renamed into place; uri_cache.py: an object store, where the manifest is written last). Both
see their files through a pyarrow file system, so the checks are the same code for both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
ID_COLUMN = "id"
_CORE_KEYS = {"fingerprint", "rows", "columns", "schema", "files", "created_utc", "complete"}
_FP_PATTERN = re.compile(r"[0-9A-Za-z_-]+")


class CacheCorruptWarning(UserWarning):
    """A committed cache entry failed validation and is being rebuilt."""


@dataclass(frozen=True)
class CacheEntry:
    path: Path | str  # the committed entry <root>/<fingerprint>: a Path, or for a URI cache its URI (no credentials)
    manifest: dict  # parsed manifest.json
    filesystem: pafs.FileSystem | None = None  # a URI cache: the file system its files are read through
    fs_path: str = ""  # a URI cache: the entry's directory inside `filesystem`


def check_fingerprint(fp: object) -> str:
    # The fingerprint becomes a directory name: refuse anything that could escape root or hide as .tmp-/.trash-.
    if not isinstance(fp, str) or not _FP_PATTERN.fullmatch(fp):
        raise ValueError(f"invalid cache fingerprint {fp!r}")
    return fp


# Writes an entry's parquet files into (directory, filesystem); filesystem None means a local path.
ParquetWriter = Callable[[str, pafs.FileSystem | None], None]


def check_request(columns: Sequence[str], extra_manifest: Mapping | None) -> tuple[list[str], dict]:
    """(columns, extra) of a write, refused before any work when they would make a useless entry."""
    columns = list(columns)
    if ID_COLUMN not in columns:
        raise ValueError(f"columns must include {ID_COLUMN!r} (entries are sorted by it), got {columns}")
    extra = dict(extra_manifest or {})
    if clash := sorted(_CORE_KEYS & set(extra)):
        raise ValueError(f"extra_manifest may not override {clash}")
    return columns, extra


class EntryFiles:
    """The files of one entry (names relative to its directory), seen through a pyarrow file system."""

    def __init__(self, filesystem: pafs.FileSystem, directory: str | Path):
        self.filesystem, self.directory = filesystem, str(directory).rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def size(self, name: str) -> int:
        info = self.filesystem.get_file_info(self.path(name))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.path(name))
        return info.size

    def footer(self, name: str) -> pq.FileMetaData:
        # The footer only: row count and schema without reading the data.
        return pq.read_metadata(self.path(name), filesystem=self.filesystem)

    def read_text(self, name: str) -> str:
        with self.filesystem.open_input_stream(self.path(name)) as stream:
            return stream.read().decode()


def describe(names: Sequence[str], files: EntryFiles, fp: str, columns: list[str], extra: dict) -> dict:
    """The manifest of a finished write: every data file with its size, the row count and the schema."""
    if not names:
        raise ValueError("the dataset wrote no rows; refusing to cache an empty split")
    rows, schema, entries = 0, None, []
    for name in sorted(names):
        meta = files.footer(name)
        rows += meta.num_rows
        schema = schema or meta.schema.to_arrow_schema()
        entries.append({"name": name, "bytes": files.size(name), **_id_range(meta)})
    if sorted(schema.names) != sorted(columns):
        raise ValueError(f"written columns {schema.names} differ from requested {columns}")
    return {
        **extra,
        "fingerprint": fp,
        "rows": rows,
        "columns": schema.names,
        "schema": str(schema),
        "files": entries,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }


def _id_range(meta: pq.FileMetaData) -> dict:
    """{"id_range": [smallest, largest id]} from the file's row-group statistics (what lets a train worker read only
    the files holding its rows, soft_target_columns.read_own_soft_targets), or {} when a row group has none."""
    index = meta.schema.to_arrow_schema().get_field_index(ID_COLUMN)
    stats = [meta.row_group(i).column(index).statistics for i in range(meta.num_row_groups)] if index >= 0 else []
    if not stats or any(s is None or not s.has_min_max for s in stats):
        return {}
    return {"id_range": [int(min(s.min for s in stats)), int(max(s.max for s in stats))]}


def validate(read_manifest: Callable[[], str], fp: str, files: EntryFiles) -> tuple[dict, str | None]:
    """(manifest, None) when the manifest read by `read_manifest` vouches for `files` as entry `fp`, else ({}, why not)."""
    try:
        manifest = json.loads(read_manifest())
    except FileNotFoundError:
        return {}, "manifest.json is missing (half-written or foreign directory)"
    except (OSError, ValueError) as exc:
        return {}, f"manifest.json is unreadable ({type(exc).__name__})"
    if not isinstance(manifest, dict):
        return {}, "manifest.json is not an object"
    if manifest.get("fingerprint") != fp:
        return {}, f"manifest fingerprint {manifest.get('fingerprint')!r} != {fp!r}"
    if manifest.get("complete") is not True:
        return {}, "manifest is not marked complete"
    listed, columns = manifest.get("files"), manifest.get("columns")
    if not isinstance(listed, list) or not listed or not isinstance(columns, list):
        return {}, "manifest files/columns are missing or malformed"
    rows = 0
    for item in listed:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            return {}, f"manifest lists a bad file entry {item!r}"
        try:
            size = files.size(name)
        except OSError:
            return {}, f"data file {name} is missing"
        if size != item.get("bytes"):
            return {}, f"data file {name} has {size} bytes, manifest says {item.get('bytes')}"
        try:
            meta = files.footer(name)
            rows += meta.num_rows
            names = meta.schema.to_arrow_schema().names
        except (OSError, pa.ArrowException) as exc:
            return {}, f"data file {name} is not readable parquet ({type(exc).__name__})"
        if names != columns:
            return {}, f"data file {name} has columns {names}, manifest says {columns}"
    if rows != manifest.get("rows"):
        return {}, f"data files hold {rows} rows, manifest says {manifest.get('rows')}"
    return manifest, None


def entry_files(entry: CacheEntry) -> EntryFiles:
    if entry.filesystem is None:
        return EntryFiles(pafs.LocalFileSystem(), entry.path)
    return EntryFiles(entry.filesystem, entry.fs_path)


def load_table(entry: CacheEntry, columns: Sequence[str] | None = None) -> pa.Table:
    """The entry's rows (only the files its manifest lists), sorted by id."""
    wanted = list(columns) if columns is not None else list(entry.manifest["columns"])
    read = wanted if ID_COLUMN in wanted else [*wanted, ID_COLUMN]
    files = entry_files(entry)
    tables = [pq.read_table(files.path(item["name"]), columns=read, filesystem=files.filesystem) for item in entry.manifest["files"]]
    table = pa.concat_tables(tables).sort_by(ID_COLUMN)
    return table.select(wanted)
