"""Statistics of uint8 images as counts, so that blocks read in different processes add up to the exact whole.

A 256-bin histogram per channel gives the exact mean and std without a float64 copy of the images (MNIST would
need 376 MB for that); data/ray_reader.py sums its blocks' histograms, and the driver's reader (datasets.py)
computes the same numbers from one histogram of its array.
"""

from __future__ import annotations

import hashlib

import numpy as np

from orchestrator.data.views import border_histogram


def channel_histograms(images: np.ndarray) -> np.ndarray:
    """(C, 256) counts of each uint8 value per channel of (N, C, H, W) images."""
    return np.stack([np.bincount(images[:, c].ravel(), minlength=256) for c in range(images.shape[1])])


def stats_from_histograms(histograms: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] pixel units from (C, 256) counts."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for counts in np.asarray(histograms, dtype=np.float64):
        mean = float((counts * values).sum() / counts.sum())
        var = float((counts * (values - mean) ** 2).sum() / counts.sum())
        # A constant channel would divide by zero downstream; leave it unscaled instead.
        stds.append(var**0.5 if var > 0 else 1.0)
        means.append(mean)
    return tuple(means), tuple(stds)


def block_stats(images: np.ndarray) -> dict:
    """What the driver needs of one block of images, small: shape, rows, channel and border counts, a digest."""
    return {"shape": tuple(int(d) for d in images.shape[1:]), "rows": len(images), "channels": channel_histograms(images),
            "border": border_histogram(images), "digest": hashlib.sha256(np.ascontiguousarray(images).data).hexdigest()}
