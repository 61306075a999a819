"""Trained teachers and sweep assistants cached as files under a path, a file:// URI and s3:// (moto)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
import torch
from test_uri_cache import s3_server  # noqa: F401  (a fixture: a moto S3 server on 127.0.0.1)

from orchestrator.teachers.weights_cache import load_cached_weights, save_cached_weights, weights_file


def _payload() -> dict:
    torch.manual_seed(0)
    return {"state_dict": torch.nn.Linear(4, 3).state_dict(), "run_id": "abc123"}


def _life_of_a_file(cache_dir: str) -> None:
    file = weights_file(cache_dir, "teachers", "k1")
    assert load_cached_weights(file) is None  # nothing there yet
    payload = _payload()
    save_cached_weights(file, payload)
    loaded = load_cached_weights(file)
    assert loaded["run_id"] == "abc123" and torch.equal(loaded["state_dict"]["weight"], payload["state_dict"]["weight"])
    folder = file.path.rsplit("/", 1)[0]
    assert [i.base_name for i in file.filesystem.get_file_info(pafs.FileSelector(folder))] == ["k1.pt"]  # no temporary left

    with file.filesystem.open_input_stream(file.path) as stream:
        data = stream.read()
    with file.filesystem.open_output_stream(file.path) as stream:
        stream.write(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"weights cache .*k1\.pt is unreadable .*training it again"):
        assert load_cached_weights(file) is None
    assert file.filesystem.get_file_info(file.path).type == pafs.FileType.NotFound  # removed, so the retrain can publish


def test_a_path(tmp_path):
    _life_of_a_file(str(tmp_path / "cache"))
    assert weights_file(str(tmp_path / "cache"), "stages", "k2").folder == str(tmp_path / "cache" / "stages")


def test_a_file_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _life_of_a_file((tmp_path / "cache").as_uri())
    assert (tmp_path / "cache" / "teachers").is_dir() and not (tmp_path / "file:").exists()


def test_pickled_code_is_refused(tmp_path):
    file = weights_file(str(tmp_path), "teachers", "evil")
    save_cached_weights(file, {"state_dict": {}, "run_id": "x", "code": print})  # torch.save pickles the function by reference
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_cached_weights(file) is None  # weights_only=True: a cache is a place others can write to


def test_an_s3_bucket(s3_server, monkeypatch):  # noqa: F811
    root, env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _life_of_a_file(root)
    file = weights_file("s3://AKID:hunter2@kd-bucket/kd-cache?endpoint_override=127.0.0.1:9", "stages", "k3")
    assert str(file) == "s3://***@kd-bucket/kd-cache/stages/k3.pt" and file.folder == "s3://AKID:hunter2@kd-bucket/kd-cache/stages?endpoint_override=127.0.0.1:9"
