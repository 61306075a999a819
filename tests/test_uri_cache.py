"""The soft-target cache under a URI (uri_cache.py): real Ray Data writes through pyarrow file systems.

`file://` runs through the URI code path (pyarrow's LocalFileSystem from FileSystem.from_uri);
`s3://` against a real moto S3 server on 127.0.0.1. Both in this process, on the session's Ray.
"""

from __future__ import annotations

import fcntl
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from orchestrator.teachers.soft_targets import (
    CacheCorruptWarning,
    build_lock,
    clean_stale_tmp,
    column_to_numpy,
    encode_logits,
    fingerprint,
    load_table,
    read_cache,
    write_cache,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
N, K = 57, 6
COLUMNS = ["id", "label", "teacher_logits"]


def _dataset(ray, logits: np.ndarray, blocks: int):
    """A Ray dataset of several blocks, ids shuffled across blocks so load_table must sort."""
    from ray.data.extensions import ArrowTensorArray

    order = np.random.default_rng(1).permutation(len(logits))
    tables = [
        pa.table({"id": pa.array(part, pa.int64()), "label": pa.array(part % K, pa.int64()), "teacher_logits": ArrowTensorArray.from_numpy(logits[part])})
        for part in np.array_split(order, blocks)
    ]
    return ray.data.from_arrow(tables)


def _listing(filesystem: pafs.FileSystem, directory: str) -> list[str]:
    return sorted(Path(i.path).name for i in filesystem.get_file_info(pafs.FileSelector(directory, allow_not_found=True)))


def _assert_holds(entry, logits: np.ndarray) -> None:
    table = load_table(entry)
    ids = column_to_numpy(table, "id")
    np.testing.assert_array_equal(ids, np.arange(N))
    np.testing.assert_array_equal(column_to_numpy(table, "teacher_logits"), logits)
    np.testing.assert_array_equal(column_to_numpy(load_table(entry, ["label"]), "label"), ids % K)


def round_trip(ray, root: str, shown_root: str | None = None) -> None:
    """Write, read back, lose a race, get truncated, rebuild, clean up: the whole life of an entry under `root`
    (`shown_root`: the entry paths' root, where `root` carries credentials)."""
    filesystem, base = pafs.FileSystem.from_uri(root)
    logits = encode_logits(np.random.default_rng(0).standard_normal((N, K)).astype(np.float32) * 3, encoding="fp16")["teacher_logits"]
    fp = fingerprint({"case": "uri round trip"})
    entry_dir = f"{base.rstrip('/')}/{fp}"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing there yet: absent, not corrupt
        assert read_cache(root, fp) is None
    written = write_cache(_dataset(ray, logits, blocks=3), root, fp, columns=COLUMNS, extra_manifest={"num_classes": K})
    assert written.path == f"{shown_root or root.split('?')[0].rstrip('/')}/{fp}"
    first_writer = written.manifest["files"][0]["name"].split("/")[0]
    assert _listing(filesystem, entry_dir) == sorted(["manifest.json", first_writer])  # no staged manifest left
    entry = read_cache(root, fp)
    assert entry.manifest == written.manifest and entry.manifest["rows"] == N and len(entry.manifest["files"]) >= 2
    _assert_holds(entry, logits)

    # A second writer that finishes after publication returns the published entry and deletes its own files.
    second = write_cache(_dataset(ray, logits, blocks=2), root, fp, columns=COLUMNS)
    assert second.manifest == written.manifest
    assert _listing(filesystem, entry_dir) == sorted(["manifest.json", first_writer])

    # A data file cut short: the entry does not match its manifest, so it is absent (and said so).
    victim = f"{entry_dir}/{written.manifest['files'][0]['name']}"
    with filesystem.open_input_stream(victim) as stream:
        data = stream.read()
    with filesystem.open_output_stream(victim) as stream:
        stream.write(data[: len(data) // 2])
    with pytest.warns(CacheCorruptWarning, match=r"has \d+ bytes, manifest says"):
        assert read_cache(root, fp) is None

    # The rebuild publishes a fresh manifest over it; the old writer's files are swept once stale.
    with pytest.warns(CacheCorruptWarning):
        rebuilt = write_cache(_dataset(ray, logits, blocks=2), root, fp, columns=COLUMNS)
    new_writer = rebuilt.manifest["files"][0]["name"].split("/")[0]
    assert new_writer != first_writer and read_cache(root, fp).manifest == rebuilt.manifest
    assert clean_stale_tmp(root, older_than_s=3600) == 0  # still fresh: could be a writer at work
    assert clean_stale_tmp(root, older_than_s=0) == 1
    assert _listing(filesystem, entry_dir) == sorted(["manifest.json", new_writer])
    _assert_holds(read_cache(root, fp), logits)
    with pytest.raises(ValueError, match="invalid cache fingerprint"):
        read_cache(root, "../escape")


def test_file_uri_cache_round_trip(ray_session, tmp_path):
    root = tmp_path.as_uri() + "/kd-cache"
    round_trip(ray_session, root)
    assert not (Path.cwd() / "file:").exists()  # the URI was never taken for a relative path


def test_build_lock_on_a_uri_is_a_lock_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where gettempdir() points
    monkeypatch.chdir(tmp_path)
    uri = "s3://AKIDSECRET:hunter2@kd-bucket/kd-cache?endpoint_override=127.0.0.1:9000"
    with build_lock(uri, "abc") as waited:
        assert waited >= 0
        [lock] = (tmp_path / "kd-cache-locks").rglob(".lock-abc")
        with open(lock, "a") as other, pytest.raises(BlockingIOError):  # held: a second job would wait here
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert "hunter2" not in str(lock) and "kd-bucket" not in str(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd-cache-locks"]  # no local "s3:" directory
    with build_lock("s3://other-bucket/kd-cache", "abc"):  # another cache: another lock
        assert len(list((tmp_path / "kd-cache-locks").rglob(".lock-abc"))) == 2


def test_entry_names_carry_no_credentials_or_endpoint_options():
    from orchestrator.teachers import uri_cache

    _, directory, shown = uri_cache._open("s3://AKID:hunter2@kd-bucket/kd-cache/?region=us-east-1&endpoint_override=127.0.0.1:9", "abc")
    assert directory == "kd-bucket/kd-cache/abc" and shown == "s3://***@kd-bucket/kd-cache/abc"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server():
    """A moto S3 server on 127.0.0.1 (a random free port) with a bucket; stopped by its PID."""
    pytest.importorskip("moto")
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.3)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}
        bucket = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                                   endpoint_override=f"127.0.0.1:{port}", allow_bucket_creation=True)
        bucket.create_dir("kd-bucket")
        yield f"s3://kd-bucket/kd-cache?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", env
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.integration
def test_s3_uri_cache_round_trip(ray_session, s3_server):
    """On this session's Ray, whose workers have no AWS_* variables: the credentials ride in the URI, which pyarrow
    reads on every node as it reads each node's environment; the entry's path names neither."""
    root, _ = s3_server
    with_credentials = root.replace("s3://", "s3://testing:testing@", 1)
    round_trip(ray_session, with_credentials, shown_root="s3://***@kd-bucket/kd-cache")
