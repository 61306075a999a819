"""The soft-target cache in a pyarrow file system URI (s3://, gs://, hdfs://, abfs://, file://).

Object stores have no atomic directory rename and no flock, so publication works differently
from the local cache (soft_targets.py), with the same manifest and the same checks:

- The teacher actors (or Ray Data's write tasks) write the parquet files straight into
  `<root>/<fp>/<writer-uuid>/`, a directory no manifest names yet, so a crashed or concurrent
  writer never shows half an entry to anyone.
- The writer then writes `<root>/<fp>/manifest.json` LAST; its presence publishes the entry.
  It is staged under a private name and moved into place, so even on a file system whose
  writes are not atomic (file://, NFS) no reader sees half a manifest; an object store PUT
  or copy is atomic by itself. A valid manifest that appeared meanwhile wins: the writer
  returns that entry and deletes its own files (no reader can know them yet).
- Two writers that both find no manifest both publish; the later manifest replaces the
  earlier. Either is a complete entry for the same fingerprint, so readers are right with
  both; the losing writer's files stay unreferenced until `clean_stale` removes them. Files a
  manifest may already have named are never deleted, so no reader loses files mid-read.
- A manifest that does not match its files is reported (CacheCorruptWarning) and the entry is
  treated as absent; the rebuild's manifest replaces it. Nothing is deleted on read: on shared
  storage another job may be in the middle of replacing it.

Credentials come from each node's environment (AWS_* variables, instance roles, ...), as for
Ray Train's storage_path; they are never stored with the entry. pyarrow URI options such as
`?endpoint_override=host:port&scheme=http` for an S3-compatible server are honoured.
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence

import pyarrow.fs as pafs

from orchestrator.teachers.cache_manifest import (
    MANIFEST,
    CacheCorruptWarning,
    CacheEntry,
    EntryFiles,
    ParquetWriter,
    check_fingerprint,
    check_request,
    describe,
    validate,
)
from orchestrator.tracking.redact import redact

# The schemes pyarrow's FileSystem.from_uri opens (az://, wasb:// and memory:// it does not).
CACHE_URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def is_uri(root: object) -> bool:
    return isinstance(root, str) and "://" in root


def _open(root: str, fp: str) -> tuple[pafs.FileSystem, str, str]:
    """(file system, entry directory inside it, the entry's URI for people to read) for entry `fp` under `root`."""
    check_fingerprint(fp)
    filesystem, base = pafs.FileSystem.from_uri(root)
    return filesystem, f"{base.rstrip('/')}/{fp}", f"{shown_uri(root)}/{fp}"


def shown_uri(root: str) -> str:
    """`root` for tags, warnings and people: no credentials, no endpoint options, no trailing slash."""
    return redact(root.split("?", 1)[0]).rstrip("/")


def read_uri_cache(root: str, fp: str) -> CacheEntry | None:
    """The validated entry for `fp`, or None (no manifest yet, or one that does not match its files: warned)."""
    filesystem, directory, shown = _open(root, fp)
    files = EntryFiles(filesystem, directory)
    try:
        text = files.read_text(MANIFEST)
    except FileNotFoundError:
        return None  # never published, or a writer is still at work: its files are not an entry yet
    manifest, problem = validate(lambda: text, fp, files)
    if problem is None:
        return CacheEntry(path=shown, manifest=manifest, filesystem=filesystem, fs_path=directory)
    warnings.warn(f"soft-target cache {shown}: {problem}; ignoring it, it will be rebuilt", CacheCorruptWarning, stacklevel=3)
    return None


def publish_uri_cache(
    write: ParquetWriter, root: str, fp: str, *, columns: Sequence[str], extra_manifest: Mapping | None = None
) -> CacheEntry:
    """`write(directory, filesystem)` writes the entry's parquet files (its `columns`) into a writer directory of
    entry `fp`; the manifest, written last, publishes them."""
    filesystem, directory, shown = _open(root, fp)
    columns, extra = check_request(columns, extra_manifest)
    writer = uuid.uuid4().hex
    published = False
    try:
        # Actors and workers on any node write through the same file system (pickled with its options).
        write(f"{directory}/{writer}", filesystem)
        files = EntryFiles(filesystem, directory)
        manifest = describe(_parquet_names(filesystem, directory, writer), files, fp, columns, extra)
        existing = read_uri_cache(root, fp)
        if existing is not None:
            return existing  # another job published first; its entry is as good as ours
        _put_manifest(filesystem, directory, manifest)
        published = True
        return CacheEntry(path=shown, manifest=manifest, filesystem=filesystem, fs_path=directory)
    finally:
        if not published:  # failed, or lost the race: no manifest names these files
            _delete_dir(filesystem, f"{directory}/{writer}")


def _parquet_names(filesystem: pafs.FileSystem, directory: str, writer: str) -> list[str]:
    """The parquet files one writer wrote, as names relative to the entry directory."""
    selector = pafs.FileSelector(f"{directory}/{writer}", recursive=True, allow_not_found=True)
    found = filesystem.get_file_info(selector)
    return sorted(
        info.path[len(directory) + 1:] for info in found if info.type == pafs.FileType.File and info.path.endswith(".parquet")
    )


def _put_manifest(filesystem: pafs.FileSystem, directory: str, manifest: dict) -> None:
    staging = f"{directory}/.{MANIFEST}.{uuid.uuid4().hex}.tmp"
    with filesystem.open_output_stream(staging) as stream:
        stream.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    try:
        filesystem.move(staging, f"{directory}/{MANIFEST}")  # a rename, or an atomic copy on object stores
    except BaseException:
        _delete_file(filesystem, staging)
        raise


def _delete_dir(filesystem: pafs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_dir(path)
    except OSError:
        pass  # already gone, or unreachable now: clean_stale removes what is left


def _delete_file(filesystem: pafs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except OSError:
        pass


def clean_stale(root: str, *, older_than_s: float = 3600) -> int:
    """Remove writer directories no manifest names (crashed writers, lost races) and staged manifests,
    untouched for `older_than_s`; returns how many. Keep `older_than_s` above the longest write."""
    filesystem, base = pafs.FileSystem.from_uri(root)
    base = base.rstrip("/")
    newest: dict[tuple[str, str], float] = {}  # (fingerprint, writer dir or staged manifest) -> newest mtime
    for info in filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
        parts = info.path[len(base) + 1:].split("/")
        if len(parts) < 2 or parts[1] == MANIFEST or (info.type == pafs.FileType.Directory and len(parts) > 2):
            continue
        # Object stores give directories no mtime: such a writer directory is as old as its newest file.
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        newest[(parts[0], parts[1])] = max(newest.get((parts[0], parts[1]), 0.0), mtime)
    cutoff, removed, named = time.time() - older_than_s, 0, {}
    for (fp, name), mtime in sorted(newest.items()):
        if fp not in named:
            named[fp] = _named_writers(filesystem, f"{base}/{fp}")
        if mtime >= cutoff or named[fp] is None or name in named[fp]:
            continue
        path = f"{base}/{fp}/{name}"
        _delete_file(filesystem, path) if name.endswith(".tmp") else _delete_dir(filesystem, path)
        removed += 1
    return removed


def _named_writers(filesystem: pafs.FileSystem, directory: str) -> set[str] | None:
    """Writer directories the entry's manifest names; None when it cannot be read (then keep everything)."""
    try:
        manifest = json.loads(EntryFiles(filesystem, directory).read_text(MANIFEST))
        return {item["name"].split("/", 1)[0] for item in manifest["files"]}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
