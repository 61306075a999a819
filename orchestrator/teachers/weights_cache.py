"""Trained teachers and sweep assistants, cached as state-dict files beside the soft targets.

`soft_targets.cache_dir` is a path or a URI pyarrow opens (s3://, gs://, ...), so these files go
through a pyarrow file system too. They are published whole either way: on a file system by an
atomic rename, in an object store by one PUT (an object is never visible half-written).
Files are loaded with `weights_only=True`: a cache is a place others can write to.
"""

from __future__ import annotations

import io
import uuid
import warnings
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch

from orchestrator.teachers import uri_cache


@dataclass(frozen=True)
class WeightsFile:
    filesystem: pafs.FileSystem
    path: str  # inside `filesystem`
    folder: str  # what build_lock takes: a local folder, or the folder's URI
    shown: str  # for tags and warnings: no credentials, no endpoint options

    def __str__(self) -> str:
        return self.shown


def weights_file(cache_dir: str, kind: str, key: str) -> WeightsFile:
    """The cache file for `key` under `<cache_dir>/<kind>/` ("teachers", "stages")."""
    if uri_cache.is_uri(cache_dir):
        filesystem, base = pafs.FileSystem.from_uri(cache_dir)
        root, _, query = cache_dir.partition("?")
        folder = f"{root.rstrip('/')}/{kind}" + (f"?{query}" if query else "")
        shown = f"{uri_cache.shown_uri(cache_dir)}/{kind}/{key}.pt"
        return WeightsFile(filesystem, f"{base.rstrip('/')}/{kind}/{key}.pt", folder, shown)
    from pathlib import Path

    local = Path(cache_dir).resolve() / kind  # absolute: Ray workers do not share the driver's cwd
    return WeightsFile(pafs.LocalFileSystem(), str(local / f"{key}.pt"), str(local), str(local / f"{key}.pt"))


def load_cached_weights(file: WeightsFile) -> dict | None:
    if file.filesystem.get_file_info(file.path).type == pafs.FileType.NotFound:
        return None
    with file.filesystem.open_input_file(file.path) as handle:
        data = handle.readall()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: rebuild rather than trust it
        warnings.warn(f"weights cache {file} is unreadable ({type(exc).__name__}); training it again", stacklevel=2)
        file.filesystem.delete_file(file.path)
        return None


def save_cached_weights(file: WeightsFile, payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    parent = file.path.rsplit("/", 1)[0]
    file.filesystem.create_dir(parent, recursive=True)
    if not isinstance(file.filesystem, pafs.LocalFileSystem):
        with file.filesystem.open_output_stream(file.path) as out:  # one PUT: whole or absent
            out.write(buffer.getvalue())
        return
    tmp = f"{parent}/.{file.path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
    try:
        with file.filesystem.open_output_stream(tmp) as out:
            out.write(buffer.getvalue())
        file.filesystem.move(tmp, file.path)  # atomic rename: readers see the old file or the whole new one
    finally:
        if file.filesystem.get_file_info(tmp).type != pafs.FileType.NotFound:  # interrupted before the rename
            file.filesystem.delete_file(tmp)
