"""Augmented views that a soft-target cache can store: view v of example i is a pure function of (policy, i, v).

Consistent teaching (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent", arXiv:2106.05237) shows that a student learns most from its teacher when both see
the same augmented image. FKD (Shen and Xing 2022, arXiv:2112.01528) makes that affordable by
storing the augmentation's parameters with the soft labels. Here a view is an integer shift
within [-J, J]^2 (a random crop with padding J is the same thing) and, where the data allows, a
horizontal flip; padding uses the background value, not grey. The teacher computes its logits
once per (id, view); a student that draws view v of example i replays exactly that view and
reads exactly those logits.

The grid of a policy has (2J + 1)^2 * (2 if flip else 1) views. With `num_views` equal to the grid
size, view v is grid entry v (view 0 is always the untouched image); with fewer, views 1.. are
drawn from the grid by a hash of (policy seed, id, v). Which view a student draws in an epoch is
another hash, of (job seed, epoch, id): no generator state, so the choice is the same on every
worker, every rerun, and on the CPU or a GPU.

The hash is MINSTD (Park and Miller) arithmetic modulo 2^31 - 1 with xor-shifts: every product stays
below 2^62, so numpy and torch int64 give the same numbers on any device with no overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_MODULUS = 2**31 - 1
_MULTIPLIER = 48271


def _mix(x: Any, value: Any) -> Any:
    """One absorbing step of the hash: add `value`, then MINSTD multiplications with xor-shifts between them,
    which break the linearity of plain modular arithmetic (consecutive ids would otherwise get views in
    arithmetic progression). Every intermediate stays below 2^62."""
    x = (x + value % _MODULUS) % _MODULUS
    for shift in (15, 13, 11):
        x = (x * _MULTIPLIER) % _MODULUS
        x = x ^ (x >> shift)
    return (x * _MULTIPLIER) % _MODULUS


def view_hash(seed: int, a: Any, b: Any) -> Any:
    """A deterministic hash in [0, 2^31 - 1) of (seed, a, b); a and b are int64 numpy arrays or torch tensors."""
    x = _mix(seed % _MODULUS + 12345, a)
    return _mix(x, b)


@dataclass(frozen=True)
class ViewPolicy:
    """Which views exist: shifts within [-max_shift, max_shift]^2, flips, how many per example, the pad value."""

    max_shift: int = 0
    flip: bool = False
    num_views: int | None = None  # None: the whole grid
    seed: int = 0  # which views are drawn when num_views < grid size; independent of the job's seed
    fill: int = 0  # uint8 background value used for padding

    def __post_init__(self) -> None:
        if self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")
        if not 0 <= self.fill <= 255:
            raise ValueError(f"fill must be a uint8 value, got {self.fill}")
        if self.num_views is not None and not 1 <= self.num_views <= self.grid_size:
            raise ValueError(f"num_views must be in [1, {self.grid_size}] for this grid, got {self.num_views}")

    @property
    def grid_size(self) -> int:
        return (2 * self.max_shift + 1) ** 2 * (2 if self.flip else 1)

    @property
    def count(self) -> int:
        """Views per example (V)."""
        return self.grid_size if self.num_views is None else self.num_views

    def fingerprint_parts(self) -> dict[str, Any]:
        """What decides the views' pixels: part of the soft-target fingerprint."""
        sampled = self.count < self.grid_size
        return {"max_shift": self.max_shift, "flip": self.flip, "count": self.count, "seed": self.seed if sampled else None, "fill": self.fill}

    def grid_index(self, ids: Any, views: Any) -> Any:
        """Grid entry of view `views` of example `ids` (int64 arrays or tensors of one shape)."""
        if self.count == self.grid_size:
            return views
        # View 0 stays the untouched image; the others are drawn from the rest of the grid.
        drawn = view_hash(self.seed, ids, views) % max(self.grid_size - 1, 1) + 1
        return drawn * (views != 0) if self.grid_size > 1 else views * 0

    def params(self, ids: Any, views: Any) -> tuple[Any, Any, Any]:
        """(dx, dy, flip) of each (id, view); entry 0 of the grid is (0, 0, no flip)."""
        index = self.grid_index(ids, views)
        side = 2 * self.max_shift + 1
        cell = index % (side * side)
        # Centre first: cell 0 -> shift (0, 0); the others in a fixed order around it.
        centred = (cell + (side * side) // 2) % (side * side)
        dy = centred // side - self.max_shift
        dx = centred % side - self.max_shift
        flip = (index // (side * side)) % 2 if self.flip else index * 0
        return dx, dy, flip


def epoch_views(seed: int, epoch: int, ids: torch.Tensor, count: int) -> torch.Tensor:
    """The view each example is shown in `epoch` (int64, same device as `ids`)."""
    if count == 1:
        return torch.zeros_like(ids)
    return view_hash(seed, ids.to(torch.int64) + 0, torch.full_like(ids, epoch, dtype=torch.int64)) % count


def apply_views(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, *, fill: int, max_shift: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> the same images shifted right by dx, down by dy, mirrored where flip; padding = fill.

    Works on any device: the index tensors are built on the images' device.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError(f"apply_views expects uint8 (B, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    device = images.device
    dx, dy, flip = (torch.as_tensor(t, device=device).to(torch.int64) for t in (dx, dy, flip))
    j = max_shift
    padded = F.pad(images, (j, j, j, j), value=fill) if j else images
    cols = torch.arange(w, device=device).expand(b, w)
    cols = torch.where(flip[:, None] != 0, (w - 1) - cols, cols)
    rows = torch.arange(h, device=device)[None, :] + j - dy[:, None]  # (B, H)
    cols = cols + j - dx[:, None]  # (B, W)
    batch = torch.arange(b, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def views_of(images: torch.Tensor, ids: torch.Tensor, views: torch.Tensor, policy: ViewPolicy) -> torch.Tensor:
    """View `views[b]` of example `ids[b]` for every row of a uint8 batch."""
    if policy.grid_size == 1:  # decided by the policy, never by the data: no host read of a GPU tensor
        return images
    dx, dy, flip = policy.params(ids.to(torch.int64), views.to(torch.int64))
    return apply_views(images, dx, dy, flip, fill=policy.fill, max_shift=policy.max_shift)


def random_views(images: torch.Tensor, policy: ViewPolicy, generator: torch.Generator) -> torch.Tensor:
    """A fresh random grid view per row (teacher training): uniform over the whole grid, padded with the background."""
    if policy.grid_size == 1:
        return images
    index = torch.randint(0, policy.grid_size, (len(images),), generator=generator).to(images.device)
    full = ViewPolicy(policy.max_shift, policy.flip, None, 0, policy.fill)
    dx, dy, flip = full.params(index, index)
    return apply_views(images, dx, dy, flip, fill=policy.fill, max_shift=policy.max_shift)


def background_value(images: np.ndarray) -> int:
    """The most common uint8 value on the images' one-pixel border: what a shift should pad with."""
    return int(border_histogram(images).argmax())


def border_histogram(images: np.ndarray) -> np.ndarray:
    """Counts of each uint8 value on the images' one-pixel border (blocks' counts add up: data/ray_reader.py)."""
    border = np.concatenate([
        images[:, :, 0, :].ravel(), images[:, :, -1, :].ravel(), images[:, :, :, 0].ravel(), images[:, :, :, -1].ravel(),
    ])
    return np.bincount(border, minlength=256)
