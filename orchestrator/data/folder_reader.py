"""An image folder (`dataset.name: imagefolder`): listed by the driver, its images read by Ray tasks or by the driver.

Both readers start from the same listing (`list_folders`): train/ and test/ (or val/) of class folders, each
file's class from its folder's name, numbered as torchvision's ImageFolder numbers train/'s folders; no image is
opened for it. With `dataset.reader` unset or `ray`, `plan_imagefolder` turns the listing into a plan before
Ray starts (the shape is known from `image_size`: no pixel is read), and once Ray runs one task per span of
files (ray_reader.start_reads) opens, converts and resizes its images where it runs and leaves the uint8
block in the object store with its statistics, as a parquet source's read tasks do; the driver keeps
references. With `dataset.reader: driver` the driver reads every file itself (`read_all`).

Why tasks of our own rather than `ray.data.read_images`: image i must stay beside label i (its folder's
class) in listing order, the pixels must be the driver reader's (the same RGB conversion and bilinear resize,
so a job's results do not depend on the reader), and the statistics (mean and std, the views' padding, the
fingerprint) come from the same pass over the pixels. A file that is not an image is one line naming it, exit 2:
before Ray starts with the driver's reader, before any training with Ray's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from orchestrator.config import ConfigError, DatasetConfig
from orchestrator.data.object_images import PlannedImages
from orchestrator.data.pixel_stats import block_stats
from orchestrator.errors import DataNotFoundError

# A read task's block is kept to about this many bytes (64 MB: 21,845 RGB images of 32x32, 445 of 224x224).
BYTES_PER_READ = 64 << 20


@dataclass(frozen=True)
class Listing:
    """An image folder's files and their class numbers, train and test, and the number of classes."""

    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str]
    test_labels: np.ndarray
    num_classes: int


@dataclass(frozen=True)
class FileSpan:
    """One read task of an image folder: these files, each resized to a square of side `size`."""

    paths: tuple[str, ...]
    size: int

    @property
    def rows(self) -> int:
        return len(self.paths)

    @property
    def path(self) -> str:
        return self.paths[0]


def list_folders(cfg: DatasetConfig) -> Listing:
    """The listing both readers start from; a missing folder, a missing size or a test class that train/ lacks
    is one line here, before anything is read."""
    from torchvision.datasets import ImageFolder

    if cfg.image_size is None:
        raise ConfigError("dataset.image_size: required for imagefolder (images are resized to a square of this side)")
    root = Path(cfg.root) if cfg.root else None
    hint = "set dataset.root to a folder with train/ and test/ (or val/) subfolders of class folders"
    if root is None or not (root / "train").is_dir():
        raise DataNotFoundError(f"dataset 'imagefolder' not found in {root}: {hint}")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise DataNotFoundError(f"dataset 'imagefolder' has no test/ or val/ folder in {root}: {hint}")
    try:
        train_folder, test_folder = ImageFolder(str(root / "train")), ImageFolder(str(test_dir))
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"dataset 'imagefolder' in {root}: {exc}: {hint}") from None
    classes = train_folder.class_to_idx
    # Each ImageFolder numbers its own classes; map test by class name so a class missing from test keeps the ids aligned.
    unknown = sorted(set(test_folder.classes) - set(classes))
    if unknown:
        raise ConfigError(f"dataset 'imagefolder': {test_dir.name}/ has classes not in train/: {', '.join(unknown)}")
    train = ([path for path, _ in train_folder.samples][: cfg.limit], np.array([t for _, t in train_folder.samples][: cfg.limit], dtype=np.int64))
    test_labels = [classes[test_folder.classes[t]] for _, t in test_folder.samples][: cfg.test_limit]
    test = ([path for path, _ in test_folder.samples][: cfg.test_limit], np.array(test_labels, dtype=np.int64))
    return Listing(*train, *test, len(classes))


def read_all(paths: list[str], size: int) -> np.ndarray:
    """Every listed image in this process, (N, 3, size, size) uint8: the driver's reader."""
    return np.stack([read_image(path, size) for path in paths])


def read_image(path: str, size: int) -> np.ndarray:
    """One file as (3, size, size) uint8: RGB, bilinear resize; a file that is not an image is one line naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except FileNotFoundError:  # listed by the driver, absent where this task runs
        raise ConfigError(f"dataset: {path} not found on this node (every node of the cluster must see dataset.root at that path)") from None
    except (UnidentifiedImageError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"dataset: {path} is not a readable image ({reason})") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def plan_imagefolder(cfg: DatasetConfig) -> tuple[PlannedImages, np.ndarray, PlannedImages, np.ndarray, int]:
    """(the training images' plan, train labels, the test images' plan, test labels, number of classes)."""
    listing = list_folders(cfg)
    return (_plan(listing.train_paths, cfg.image_size), listing.train_labels, _plan(listing.test_paths, cfg.image_size),
            listing.test_labels, listing.num_classes)


def _plan(paths: list[str], size: int) -> PlannedImages:
    per_read = max(1, BYTES_PER_READ // (3 * size * size))
    spans = tuple(FileSpan(tuple(paths[i:i + per_read]), size) for i in range(0, len(paths), per_read))
    return PlannedImages(shape=(len(paths), 3, size, size), dtype=np.dtype(np.uint8), spans=spans, filesystem=None, column="image", image_shape=None)


@ray.remote(num_returns=2)
def read_files(span: FileSpan) -> tuple[np.ndarray, dict]:
    """One span's images, read where this task runs, and their statistics (pixel_stats.block_stats)."""
    images = read_all(list(span.paths), span.size)
    return images, block_stats(images)
