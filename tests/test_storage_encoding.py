"""What each soft-target encoding costs in bytes, and what top-k keeps, for a 1000-class teacher (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from orchestrator.teachers.soft_targets import decode_logits, encode_logits

K = 1000


def _logits(n: int = 256, k: int = K, seed: int = 0) -> np.ndarray:
    # Multiples of 1/8 in [-16, 16]: exact in float16, so top-k values survive encoding bit for bit.
    rng = np.random.default_rng(seed)
    return (np.round(rng.standard_normal((n, k)) * 3 * 8) / 8).clip(-16, 16).astype(np.float32)


def _parquet_bytes(columns: dict[str, np.ndarray], path) -> int:
    """Write the encoded columns as fixed-size-list parquet columns (pyarrow defaults) and return the file size."""
    arrays = {
        name: pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]) for name, values in columns.items()
    }
    pq.write_table(pa.table(arrays), path)
    return path.stat().st_size


def test_bytes_per_row_fp32_fp16_topk_for_1000_classes(tmp_path):
    x = _logits()
    encoded = {
        "fp32": encode_logits(x, encoding="fp32"),
        "fp16": encode_logits(x, encoding="fp16"),
        "topk": encode_logits(x, encoding="topk", top_k=5),
    }
    per_row = {name: sum(a.nbytes for a in cols.values()) / len(x) for name, cols in encoded.items()}
    # float32 / float16 dense; top-k: k float16 values + k int16 indices (K < 32768).
    assert per_row == {"fp32": 4 * K, "fp16": 2 * K, "topk": 5 * (2 + 2)}
    on_disk = {name: _parquet_bytes(cols, tmp_path / f"{name}.parquet") for name, cols in encoded.items()}
    assert on_disk["topk"] < on_disk["fp16"] < on_disk["fp32"]
    assert on_disk["topk"] * 20 < on_disk["fp16"]


def test_topk_saves_nothing_over_fp16_with_10_classes_at_k5():
    x = _logits(k=10)
    fp16 = sum(a.nbytes for a in encode_logits(x, encoding="fp16").values())
    top5 = sum(a.nbytes for a in encode_logits(x, encoding="topk", top_k=5).values())
    top2 = sum(a.nbytes for a in encode_logits(x, encoding="topk", top_k=2).values())
    assert top5 == fp16 and top2 < fp16


def test_topk_decode_keeps_the_top_k_probabilities_renormalised():
    x = _logits(n=64)
    k = 20
    cols = encode_logits(x, encoding="topk", top_k=k)
    kept_idx = cols["teacher_topk_indices"].astype(np.int64)
    # The kept classes are k largest logits (which of several equal logits at the k-th place survives is not pinned).
    np.testing.assert_array_equal(np.take_along_axis(x, kept_idx, 1), -np.sort(-x, axis=1)[:, :k])
    decoded = decode_logits(cols, num_classes=K)
    for t in (1.0, 4.0, 20.0):
        q = F.softmax(decoded / t, dim=1).numpy()
        p = F.softmax(torch.from_numpy(x).double() / t, dim=1).numpy()
        kept_p = np.take_along_axis(p, kept_idx, 1)
        np.testing.assert_allclose(np.take_along_axis(q, kept_idx, 1), kept_p / kept_p.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
        assert (q > 0).sum(axis=1).tolist() == [k] * len(x)  # every other class gets exactly 0
