"""Soft-target codecs, fingerprint and the parquet cache (real Ray writes, real files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import ConfigError
from orchestrator.teachers.soft_targets import (
    CacheCorruptWarning,
    CacheEntry,
    clean_stale_tmp,
    column_to_numpy,
    decode_logits,
    encode_logits,
    fingerprint,
    load_table,
    logit_columns,
    read_cache,
    write_cache,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
N, K = 103, 10
COLUMNS = ["id", "label", "teacher_logits"]


def _run_python(code: str, *args: str, **env: str) -> str:
    """Run `code` in a fresh interpreter that imports this checkout; returns its stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    cmd = [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True).stdout


def _logits(n: int = 64, k: int = K, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, k)) * 3).astype(np.float32)


# --------------------------------------------------------------------------- codecs


def test_logit_columns():
    assert logit_columns("fp16") == logit_columns("fp32") == ("teacher_logits",)
    assert logit_columns("topk") == ("teacher_topk_values", "teacher_topk_indices")
    with pytest.raises(ConfigError, match="unknown encoding"):
        logit_columns("int8")


def test_fp32_round_trip_is_exact():
    x = _logits()
    cols = encode_logits(x, encoding="fp32")
    assert cols["teacher_logits"].dtype == np.float32
    out = decode_logits(cols, num_classes=K)
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(x))


def test_fp16_round_trip_within_half_precision():
    x = _logits()
    cols = encode_logits(x, encoding="fp16")
    assert cols["teacher_logits"].dtype == np.float16 and cols["teacher_logits"].shape == x.shape
    out = decode_logits({"teacher_logits": torch.from_numpy(cols["teacher_logits"])}, num_classes=K)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), x, rtol=1e-3, atol=1e-3)


def test_fp16_clips_instead_of_overflowing():
    out = encode_logits(np.array([[1e6, -1e6, 0.0]], dtype=np.float32), encoding="fp16")["teacher_logits"]
    assert np.isfinite(out).all() and out[0, 0] == np.finfo(np.float16).max


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        encode_logits(np.array([[np.nan, 1.0]]), encoding="fp32")
    with pytest.raises(ValueError, match="shape"):
        encode_logits(np.zeros(5), encoding="fp16")
    with pytest.raises(ConfigError):
        encode_logits(_logits(), encoding="topk", top_k=0)


def test_topk_keeps_the_largest_sorted_descending():
    x = _logits()
    cols = encode_logits(x, encoding="topk", top_k=3)
    values, indices = cols["teacher_topk_values"], cols["teacher_topk_indices"]
    assert values.dtype == np.float16 and indices.dtype == np.int16 and values.shape == indices.shape == (64, 3)
    expected_idx = np.argsort(-x, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(indices, expected_idx)
    np.testing.assert_allclose(values, np.take_along_axis(x, expected_idx, 1), rtol=1e-3, atol=1e-3)
    assert (np.diff(values.astype(np.float32), axis=1) <= 0).all()


def test_topk_decodes_to_renormalised_sparse_targets():
    x = _logits()
    k = 4
    decoded = decode_logits(encode_logits(x, encoding="topk", top_k=k), num_classes=K)
    assert decoded.shape == (64, K) and decoded.dtype == torch.float32
    assert (torch.isinf(decoded) & (decoded < 0)).sum(dim=1).eq(K - k).all()
    assert torch.equal(decoded.argmax(1), torch.from_numpy(x.argmax(1)))
    top_idx = np.argsort(-x, axis=1)[:, :k]
    for t in (1.0, 4.0, 20.0):
        kept = np.take_along_axis(x, top_idx, 1) / t
        probs = np.exp(kept - kept.max(1, keepdims=True))
        expected = np.zeros_like(x)
        np.put_along_axis(expected, top_idx, probs / probs.sum(1, keepdims=True), 1)
        np.testing.assert_allclose(F.softmax(decoded / t, dim=1).numpy(), expected, atol=2e-3)
        # the KD loss stays finite: p=0 classes contribute nothing to KL
        student = torch.randn(64, K)
        kl = F.kl_div(F.log_softmax(student / t, 1), F.softmax(decoded / t, 1), reduction="batchmean")
        assert torch.isfinite(kl)


def test_topk_larger_than_classes_and_int32_indices():
    cols = encode_logits(_logits(n=3, k=4), encoding="topk", top_k=10)
    assert cols["teacher_topk_values"].shape == (3, 4)
    big = _logits(n=2, k=40000)
    cols = encode_logits(big, encoding="topk", top_k=5)
    assert cols["teacher_topk_indices"].dtype == np.int32
    np.testing.assert_array_equal(cols["teacher_topk_indices"][:, 0], big.argmax(1))
    assert torch.equal(decode_logits(cols, num_classes=40000).argmax(1), torch.from_numpy(big.argmax(1)))


def test_decode_rejects_ambiguous_or_mismatched_columns():
    with pytest.raises(ValueError, match="infer"):
        decode_logits({"teacher_topk_values": np.zeros((1, 2))}, num_classes=K)
    with pytest.raises(ValueError, match="classes"):
        decode_logits({"teacher_logits": np.zeros((2, 3), np.float16)}, num_classes=K)
    bad = {"teacher_topk_values": np.zeros((1, 1), np.float16), "teacher_topk_indices": np.array([[K]], np.int16)}
    with pytest.raises(ValueError, match="out of range"):
        decode_logits(bad, num_classes=K)


# --------------------------------------------------------------------------- fingerprint

PARTS = {
    "teachers": ["a1b2", "c3d4"],
    "dataset": "mnist:deadbeef",
    "split": "train",
    "transform": {"mean": [0.1307], "std": [0.3081]},
    "encoding": "topk",
    "top_k": 5,
    "ensemble": "logits",
    "format": 1,
}


def test_fingerprint_is_stable_across_order_and_processes():
    fp = fingerprint(PARTS)
    assert len(fp) == 20 and int(fp, 16) >= 0
    reordered = {k: PARTS[k] for k in reversed(list(PARTS))}
    reordered["transform"] = {"std": (0.3081,), "mean": (np.float64(0.1307),)}
    assert fingerprint(reordered) == fp
    code = f"from orchestrator.teachers.soft_targets import fingerprint; print(fingerprint({PARTS!r}))"
    assert _run_python(code, PYTHONHASHSEED="12345").strip() == fp


@pytest.mark.parametrize(
    "key,value",
    [
        ("teachers", ["a1b2", "c3d5"]),
        ("dataset", "mnist:other"),
        ("split", "val"),
        ("transform", {"mean": [0.1307], "std": [0.3082]}),
        ("encoding", "fp16"),
        ("top_k", 6),
        ("ensemble", "probs"),
        ("format", 2),
    ],
)
def test_fingerprint_changes_with_every_part(key, value):
    assert fingerprint({**PARTS, key: value}) != fingerprint(PARTS)


def test_fingerprint_rejects_unhashable_objects():
    with pytest.raises(TypeError):
        fingerprint({"x": object()})


# --------------------------------------------------------------------------- cache


def _dataset(ray, logits: np.ndarray, *, fixed_size_list: bool = False, blocks: int = 4):
    """A Ray dataset of several blocks, ids shuffled across blocks so load_table must sort."""
    from ray.data.extensions import ArrowTensorArray

    order = np.random.default_rng(1).permutation(len(logits))
    tables = []
    for part in np.array_split(order, blocks):
        if fixed_size_list:
            col = pa.FixedSizeListArray.from_arrays(pa.array(logits[part].reshape(-1)), logits.shape[1])
        else:
            col = ArrowTensorArray.from_numpy(logits[part])
        ids = pa.array(part, pa.int64())
        tables.append(pa.table({"id": ids, "label": pa.array(part % K, pa.int64()), "teacher_logits": col}))
    return ray.data.from_arrow(tables)


@pytest.fixture(scope="module")
def committed(ray_session, tmp_path_factory):
    """One real Ray-written cache, copied per test so corruption tests don't rebuild it."""
    root = tmp_path_factory.mktemp("pristine")
    logits = encode_logits(_logits(n=N), encoding="fp16")["teacher_logits"]
    fp = fingerprint({"case": "pristine"})
    entry = write_cache(_dataset(ray_session, logits), root, fp, columns=COLUMNS, extra_manifest={"num_classes": K})
    return root, fp, logits, entry


@pytest.fixture
def cache(committed, tmp_path):
    root, fp, logits, _ = committed
    copy = tmp_path / "cache"
    shutil.copytree(root, copy)
    return copy, fp, logits


def test_write_then_read_round_trip(committed):
    root, fp, logits, written = committed
    entry = read_cache(root, fp)
    assert isinstance(entry, CacheEntry) and entry.path == root.resolve() / fp
    assert entry.manifest == written.manifest and entry.manifest["num_classes"] == K
    assert entry.manifest["rows"] == N and entry.manifest["columns"] == COLUMNS and len(entry.manifest["files"]) >= 2
    table = load_table(entry)
    ids = column_to_numpy(table, "id")
    assert len(ids) == N and len(np.unique(ids)) == N and (np.diff(ids) > 0).all()
    got = column_to_numpy(table, "teacher_logits")
    assert got.dtype == np.float16 and got.shape == (N, K)
    np.testing.assert_array_equal(got, logits[ids])
    np.testing.assert_array_equal(column_to_numpy(load_table(entry, ["label"]), "label"), ids % K)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_plain_pyarrow_reads_the_cache_without_ray(committed):
    root, fp, logits, _ = committed
    code = (
        "import sys, numpy as np\n"
        "from orchestrator.teachers.soft_targets import read_cache, load_table, column_to_numpy\n"
        f"e = read_cache({str(root)!r}, {fp!r}); t = load_table(e)\n"
        "a = column_to_numpy(t, 'teacher_logits')\n"
        "print(t.schema.field('teacher_logits').type, a.dtype, 'ray' in sys.modules, sep='|')\n"
        "np.save(sys.argv[1], a)\n"
    )
    out_file = root.parent / "plain.npy"
    arrow_type, dtype, ray_loaded = _run_python(code, str(out_file)).strip().split("|")
    assert arrow_type.startswith("large_list") and dtype == "float16" and ray_loaded == "False"
    np.testing.assert_array_equal(np.load(out_file), logits)


def test_fixed_size_list_column_round_trip(ray_session, tmp_path):
    logits = encode_logits(_logits(n=20, seed=3), encoding="fp32")["teacher_logits"]
    entry = write_cache(_dataset(ray_session, logits, fixed_size_list=True, blocks=2), tmp_path, "fsl", columns=COLUMNS)
    table = load_table(read_cache(tmp_path, "fsl"))
    got = column_to_numpy(table, "teacher_logits")
    assert got.dtype == np.float32 and entry.manifest["rows"] == 20
    np.testing.assert_array_equal(got, logits)


def _data_file(root: Path, fp: str) -> Path:
    return root / fp / json.loads((root / fp / "manifest.json").read_text())["files"][0]["name"]


def _edit_manifest(root: Path, fp: str, **changes) -> None:
    path = root / fp / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(root, fp):
    f = _data_file(root, fp)
    f.write_bytes(f.read_bytes()[:-20])


def _corrupt_footer_keep_size(root, fp):
    f = _data_file(root, fp)
    data = f.read_bytes()
    f.write_bytes(data[:-8] + b"\0" * 8)


CORRUPTIONS = {
    "truncated file": (_truncate, "bytes"),
    "broken footer, same size": (_corrupt_footer_keep_size, "not readable parquet"),
    "deleted data file": (lambda r, fp: _data_file(r, fp).unlink(), "missing"),
    "wrong fingerprint": (lambda r, fp: _edit_manifest(r, fp, fingerprint="0" * 20), "fingerprint"),
    "manifest missing": (lambda r, fp: (r / fp / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest garbage": (lambda r, fp: (r / fp / "manifest.json").write_text("{not json"), "unreadable"),
    "not complete": (lambda r, fp: _edit_manifest(r, fp, complete=False), "complete"),
    "extra rows": (lambda r, fp: _edit_manifest(r, fp, rows=N + 1), "rows"),
    "missing rows": (lambda r, fp: _edit_manifest(r, fp, rows=N - 1), "rows"),
    "columns differ": (lambda r, fp: _edit_manifest(r, fp, columns=["id", "teacher_logits"]), "columns"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_cache_is_detected_and_removed(cache, case):
    root, fp, _ = cache
    corrupt, message = CORRUPTIONS[case]
    corrupt(root, fp)
    with pytest.warns(CacheCorruptWarning, match=message):
        assert read_cache(root, fp) is None
    assert list(root.iterdir()) == []  # neither the bad dir nor its .trash- copy remains
    assert read_cache(root, fp) is None


def test_leftover_tmp_is_never_read_and_gets_cleaned(cache):
    root, fp, _ = cache
    stale = root / f".tmp-{fp}-dead"
    shutil.copytree(root / fp, stale)
    trash = root / f".trash-{fp}-old"
    trash.mkdir()
    fresh = root / f".tmp-{fp}-live"
    fresh.mkdir()
    shutil.rmtree(root / fp)
    assert read_cache(root, fp) is None  # only <root>/<fp> is ever trusted
    old = time.time() - 7200
    for d in (stale, trash):
        for p in [*d.iterdir(), d]:
            os.utime(p, (old, old))
    assert clean_stale_tmp(root, older_than_s=3600) == 2
    assert sorted(p.name for p in root.iterdir()) == [fresh.name]
    assert clean_stale_tmp(root / "absent") == 0


def test_race_second_writer_returns_existing_entry(ray_session, cache):
    root, fp, logits = cache
    first = read_cache(root, fp)
    second = write_cache(_dataset(ray_session, logits, blocks=2), root, fp, columns=COLUMNS)
    assert second.path == first.path and second.manifest == first.manifest  # theirs, not ours
    assert [p.name for p in root.iterdir()] == [fp]


def test_writer_replaces_an_invalid_committed_dir(ray_session, tmp_path):
    logits = encode_logits(_logits(n=12), encoding="fp16")["teacher_logits"]
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / "junk.parquet").write_bytes(b"half")
    with pytest.warns(CacheCorruptWarning, match="manifest.json is missing"):
        entry = write_cache(_dataset(ray_session, logits, blocks=2), tmp_path, "abc", columns=COLUMNS)
    assert entry.manifest["rows"] == 12 and read_cache(tmp_path, "abc") is not None
    assert [p.name for p in tmp_path.iterdir()] == ["abc"]


def test_failed_write_leaves_nothing_behind(ray_session, tmp_path):
    logits = encode_logits(_logits(n=12), encoding="fp16")["teacher_logits"]
    with pytest.raises(ray_session.exceptions.RayError):  # raised inside the Ray write tasks
        write_cache(_dataset(ray_session, logits, blocks=2), tmp_path, "abc", columns=["id", "no_such_column"])
    assert list(tmp_path.iterdir()) == []
    empty = _dataset(ray_session, logits, blocks=2).limit(0)
    with pytest.raises(ValueError, match="no rows"):
        write_cache(empty, tmp_path, "abc", columns=COLUMNS)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="id"):
        write_cache(_dataset(ray_session, logits, blocks=2), tmp_path, "abc", columns=["teacher_logits"])
    with pytest.raises(ValueError, match="invalid cache fingerprint"):
        read_cache(tmp_path, "../escape")


# --------------------------------------------------------------------------- a worker's own rows (worker_reads: cache)


def test_a_worker_reads_only_the_files_holding_its_rows(tmp_path):
    """Four files of ten ids each (two views per id, rows shuffled within a file): the manifest keeps each file's
    id range, and a worker's ids from the first and third range read those two files only, with every view of each
    id in view order, the same logits as the whole entry's; an id the files do not hold fails the read."""
    import pyarrow.parquet as pq

    from orchestrator.teachers.soft_target_columns import gather_soft_targets, read_own_soft_targets
    from orchestrator.teachers.soft_targets import publish_cache

    views, logits = 2, _logits(80)
    ids, view = np.repeat(np.arange(40), views), np.tile(np.arange(views), 40)
    order = np.random.default_rng(4).permutation(80)

    def write(directory, filesystem):
        assert filesystem is None
        os.makedirs(directory)
        for part in range(4):
            rows = np.sort(order[(order >= 20 * part) & (order < 20 * part + 20)])[::-1]  # this file's 10 ids, reversed
            pq.write_table(pa.table({"id": ids[rows], "view": view[rows], "teacher_logits": pa.FixedSizeListArray.from_arrays(logits[rows].ravel(), K)}),
                           f"{directory}/part-{part}.parquet")

    entry = publish_cache(write, tmp_path, "own", columns=["id", "view", "teacher_logits"])
    assert [item["id_range"] for item in entry.manifest["files"]] == [[0, 9], [10, 19], [20, 29], [30, 39]]
    mine = np.array([25, 3, 7, 21, 3])
    own, counts = read_own_soft_targets(read_cache(tmp_path, "own"), ["teacher_logits"], mine)
    assert counts == {"files_read": 2, "files": 4, "rows_read": 40}
    np.testing.assert_array_equal(own.ids, [3, 7, 21, 25])
    got = gather_soft_targets(own, np.array([21, 3, 25]))["teacher_logits"]  # (3 rows, 2 views, K)
    np.testing.assert_array_equal(got, logits.reshape(40, views, K)[[21, 3, 25]])
    with pytest.raises(KeyError, match="not among the soft targets"):
        gather_soft_targets(own, np.array([4]))
    with pytest.raises(RuntimeError, match="do not hold every view of these 1 ids"):
        read_own_soft_targets(entry, ["teacher_logits"], np.array([40]))


def test_column_to_numpy_reads_every_layout_of_a_logit_column(tmp_path):
    """(N, K) logits as Arrow's own fixed_shape_tensor (what the teacher actors write), Ray's tensor extension and a
    fixed_size_list, in memory and back from a parquet file: the same array, in its stored dtype."""
    from ray.data.extensions import ArrowTensorArray

    logits = encode_logits(_logits(n=7, seed=5), encoding="fp16")["teacher_logits"]
    layouts = {
        "fixed_shape_tensor": pa.FixedShapeTensorArray.from_numpy_ndarray(logits),
        "ray tensor": ArrowTensorArray.from_numpy(logits),
        "fixed_size_list": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), logits.shape[1]),
    }
    for name, column in layouts.items():
        table = pa.table({"teacher_logits": column})
        pq.write_table(table, tmp_path / "t.parquet")
        for read in (table, pq.read_table(tmp_path / "t.parquet"), table.slice(2, 3)):
            got = column_to_numpy(read, "teacher_logits")
            assert got.dtype == np.float16, name
            np.testing.assert_array_equal(got, logits[2:5] if read.num_rows == 3 else logits, err_msg=name)
