"""Training images that live in Ray's object store, not in the driver (`dataset.reader: ray`).

`PlannedImages` is what the driver knows before Ray starts: the read plan (files, row groups, rows), the
images' shape, no pixel. `ObjectImages` is what it holds after data/ray_reader.py has read them: one object
reference per block of consecutive rows. Both stand where a Split's uint8 array stands (datasets.Split), so
lengths and shapes answer as before; the code that reads pixels either works on the blocks where they are
(ray_objects.py: the students' datasets, the teacher actors' blocks) or asks for a few rows by number
(`take`: the validation rows of transfer.bias_correction), which pulls those rows' blocks only. Asking for
the whole array raises, so no code path can quietly pull every training image into the driver.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

WHOLE_ARRAY = ("the training images are in Ray's object store (dataset.reader: ray), not in the driver: "
               "read them where they are (data/ray_objects.py) or take a few rows by number")
# Rows per read task (parquet row groups are grouped up to about this many; a bundled file is cut into spans of it): blocks
# of a few MB to tens of MB, enough of them for two workers or actors on MNIST, few enough that task overheads vanish.
ROWS_PER_READ = 16_384


@dataclass(frozen=True)
class ReadSpan:
    """One read task: consecutive row groups of one parquet file, of which the first `rows` rows are kept."""

    path: str
    row_groups: tuple[int, ...]
    rows: int


@dataclass(frozen=True)
class LeftBehind:
    """An array's shape and dtype without its values: what `DatasetArrays.without_arrays` leaves in a split.

    Lengths and shapes still answer; reading a value raises, so code that should have used the dataset's
    object-store copies fails loudly instead of working on something else."""

    shape: tuple[int, ...]
    dtype: np.dtype
    ndim = property(lambda self: len(self.shape))
    why = "this dataset travelled without its arrays (DatasetArrays.without_arrays): read its object-store copies (data/ray_objects.py)"

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        raise LookupError(self.why)

    def __array__(self, *args, **kwargs):
        raise LookupError(self.why)


@dataclass(frozen=True)
class PlannedImages(LeftBehind):
    """The training images before they are read: the plan, the shape (from the first image), no values."""

    spans: tuple[ReadSpan, ...]
    filesystem: object  # a pyarrow FileSystem: picklable, so each read task opens its own files
    column: str
    image_shape: tuple[int, ...] | None  # dataset.image_shape, for flat pixel lists
    order: np.ndarray | None = field(default=None, compare=False)  # with dataset.id_column: the rows read (file order) that make the split, by id
    why = "the training images are not read yet: Ray reads them when the job starts (data/ray_reader.py)"


@dataclass(frozen=True)
class ObjectImages:
    """uint8 images (N, C, H, W) as object-store blocks of consecutive rows: block b holds rows starts[b]:starts[b+1]."""

    blocks: tuple  # ray.ObjectRef -> np.ndarray uint8 (rows, C, H, W)
    starts: tuple[int, ...]  # len(blocks) + 1 offsets, from 0 to N
    image_shape: tuple[int, int, int]
    digest: str  # sha256 of the blocks' own digests, in order: what the split's fingerprint is made of
    dtype = np.dtype(np.uint8)
    ndim = 4

    def __post_init__(self) -> None:
        if len(self.starts) != len(self.blocks) + 1 or self.starts[0] != 0 or any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ValueError(f"starts must run from 0 up, one more than the {len(self.blocks)} blocks: {self.starts}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.starts[-1], *self.image_shape)

    def __len__(self) -> int:
        return self.starts[-1]

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        """The index of the block holding each row."""
        return block_of(self.starts, rows)

    def take(self, rows) -> np.ndarray:
        """Rows by number, as one array in the driver: only the blocks they are in are fetched."""
        import ray

        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= len(self))):
            raise IndexError(f"rows must be 1-D numbers in [0, {len(self)})")
        out = np.empty((rows.size, *self.image_shape), dtype=np.uint8)
        which = self.block_of(rows)
        for block in np.unique(which):
            hit = which == block
            out[hit] = ray.get(self.blocks[block])[rows[hit] - self.starts[block]]
        return out

    def read_all(self) -> np.ndarray:
        """Every row as one array in this process: for the actor or task that scores the models on the whole test
        split, not for the driver (`np.asarray` raises so that nothing does it by accident)."""
        import ray

        return np.concatenate([ray.get(block) for block in self.blocks])

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.take([index])[0]
        if isinstance(index, slice):  # the slice's own rows, not an index of every row first (`[:0]` costs nothing)
            return self.take(np.arange(*index.indices(len(self))))
        return self.take(np.arange(len(self))[index])

    def __array__(self, *args, **kwargs):
        raise LookupError(WHOLE_ARRAY)


def block_of(starts: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """The index of the block holding each row, blocks b holding rows starts[b]:starts[b+1]."""
    return np.searchsorted(np.asarray(starts), rows, side="right") - 1


def block_starts(sizes: list[int]) -> tuple[int, ...]:
    """Blocks' row offsets, from 0 to the total, from their sizes."""
    return tuple(int(s) for s in np.concatenate([[0], np.cumsum(sizes)]))


def combined_digest(block_digests: list[str], image_shape: tuple[int, ...]) -> str:
    digest = hashlib.sha256(f"object-images|{tuple(image_shape)}|".encode())
    for part in block_digests:
        digest.update(part.encode())
    return digest.hexdigest()
