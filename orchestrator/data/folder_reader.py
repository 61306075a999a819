"""An image folder (`dataset.name: imagefolder`): listed by the driver, its images read by Ray tasks or by the driver.

Both readers start from the same listing (`list_folders`) of a local folder or a pyarrow URI (s3://, gs://,
hdfs://, file://): train/ and test/ (or val/) of class folders, each file's class from its folder's name,
numbered and ordered as torchvision's ImageFolder does; no image is opened for it. With `dataset.reader`
unset or `ray`, `plan_imagefolder` turns the listing into a plan before Ray starts (the shape is known from
`image_size`: no pixel is read), and once Ray runs one task per span of files (ray_reader.start_reads) opens,
converts and resizes its images where it runs and leaves the uint8 block in the object store with its
statistics, as a parquet source's read tasks do; the driver keeps references. With `dataset.reader: driver` the driver reads every file itself (`read_all`).

Why tasks of our own rather than `ray.data.read_images`: image i must stay beside label i (its folder's
class) in listing order, the pixels must be the driver reader's (the same RGB conversion and bilinear resize,
so a job's results do not depend on the reader), and the statistics (mean and std, the views' padding, the
fingerprint) come from the same pass over the pixels. A file that is not an image is one line naming it, exit 2:
before Ray starts with the driver's reader, before any training with Ray's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from orchestrator.config import ConfigError, DatasetConfig
from orchestrator.data.object_images import PlannedImages
from orchestrator.data.pixel_stats import block_stats
from orchestrator.errors import DataNotFoundError

# A read task's block is kept to about this many bytes (64 MB: 21,845 RGB images of 32x32, 445 of 224x224).
BYTES_PER_READ = 64 << 20


# torchvision's ImageFolder's extensions (torchvision.datasets.folder.IMG_EXTENSIONS), compared lower-case as it does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HINT = "set dataset.root to a folder with train/ and test/ (or val/) subfolders of class folders"


@dataclass(frozen=True)
class Listing:
    """An image folder's files (paths in `filesystem`) and their class numbers, train and test, and the number of classes."""

    filesystem: pafs.FileSystem
    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str]
    test_labels: np.ndarray
    num_classes: int


@dataclass(frozen=True)
class FileSpan:
    """One read task of an image folder: these files of `filesystem`, each resized to a square of side `size`."""

    filesystem: pafs.FileSystem  # picklable: each read task opens its own files, on a cluster from any node
    paths: tuple[str, ...]
    size: int

    @property
    def rows(self) -> int:
        return len(self.paths)

    @property
    def path(self) -> str:
        return self.paths[0]


def list_folders(cfg: DatasetConfig) -> Listing:
    """The listing both readers start from: a local folder or a pyarrow URI (s3://, gs://, hdfs://, file://).
    Classes are train/'s subfolders in name order and files are in ImageFolder's order, so the numbering and the
    rows are torchvision's; a missing folder, a class without images or a test class that train/ lacks is one
    line here, before any image is opened."""
    if cfg.image_size is None:
        raise ConfigError("dataset.image_size: required for imagefolder (images are resized to a square of this side)")
    if not cfg.root:
        raise DataNotFoundError(f"dataset 'imagefolder' not found in None: {HINT}")
    try:
        filesystem, base = pafs.FileSystem.from_uri(cfg.root)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ConfigError(f"dataset.root: cannot open {cfg.root} ({str(exc).splitlines()[0][:160]})") from None
    base = base.rstrip("/")
    if _kind(filesystem, f"{base}/train") != pafs.FileType.Directory:
        raise DataNotFoundError(f"dataset 'imagefolder' not found in {cfg.root}: {HINT}")
    test_name = next((d for d in ("test", "val") if _kind(filesystem, f"{base}/{d}") == pafs.FileType.Directory), None)
    if test_name is None:
        raise DataNotFoundError(f"dataset 'imagefolder' has no test/ or val/ folder in {cfg.root}: {HINT}")
    train = _samples(filesystem, f"{base}/train", cfg.root)
    test = _samples(filesystem, f"{base}/{test_name}", cfg.root)
    classes = {name: number for number, name in enumerate(train)}
    unknown = sorted(set(test) - set(classes))
    if unknown:
        raise ConfigError(f"dataset 'imagefolder': {test_name}/ has classes not in train/: {', '.join(unknown)}")
    train_rows = [(path, classes[name]) for name, paths in train.items() for path in paths][: cfg.limit]
    test_rows = [(path, classes[name]) for name, paths in test.items() for path in paths][: cfg.test_limit]
    return Listing(filesystem, [p for p, _ in train_rows], np.array([c for _, c in train_rows], dtype=np.int64),
                   [p for p, _ in test_rows], np.array([c for _, c in test_rows], dtype=np.int64), len(classes))


def _kind(filesystem: pafs.FileSystem, path: str) -> pafs.FileType:
    return filesystem.get_file_info(path).type


def _samples(filesystem: pafs.FileSystem, folder: str, root: str) -> dict[str, list[str]]:
    """{class folder name: its image files}, classes in name order, files in ImageFolder's order (by folder, then name)."""
    found = filesystem.get_file_info(pafs.FileSelector(folder, recursive=True))
    images = [(info.path[len(folder) + 1:].split("/"), info.path) for info in found
              if info.type == pafs.FileType.File and info.path.lower().endswith(IMAGE_EXTENSIONS)]
    # Class folders as listed, and those an object store only implies by its keys' prefixes (no folder entry).
    names = {f.base_name for f in found if f.type == pafs.FileType.Directory and f.path.rsplit("/", 1)[0] == folder}
    samples: dict[str, list[str]] = {name: [] for name in sorted(names | {parts[0] for parts, _ in images if len(parts) > 1})}
    for parts, path in images:
        if len(parts) > 1:  # a file beside the class folders belongs to no class
            samples[parts[0]].append(path)
    empty = [name for name, paths in samples.items() if not paths]
    if empty:
        raise DataNotFoundError(f"dataset 'imagefolder' in {root}: no image file for the classes {', '.join(empty)} "
                                f"(extensions {', '.join(IMAGE_EXTENSIONS)}): {HINT}")
    return {name: sorted(paths, key=lambda path: tuple(path.rsplit("/", 1))) for name, paths in samples.items()}


def read_all(filesystem: pafs.FileSystem, paths: list[str], size: int) -> np.ndarray:
    """Every listed image in this process, (N, 3, size, size) uint8: the driver's reader."""
    return np.stack([read_image(filesystem, path, size) for path in paths])


def read_image(filesystem: pafs.FileSystem, path: str, size: int) -> np.ndarray:
    """One file as (3, size, size) uint8: RGB, bilinear resize; a file that is not an image is one line naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with filesystem.open_input_file(path) as handle, Image.open(handle) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except FileNotFoundError:  # listed by the driver, absent where this task runs
        raise ConfigError(f"dataset: {path} not found on this node (every node of the cluster must see dataset.root at that path)") from None
    except UnidentifiedImageError:  # its message names the file object, not the file
        raise ConfigError(f"dataset: {path} is not a readable image (PIL knows no such image format)") from None
    except OSError as exc:  # a truncated or corrupt image
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"dataset: {path} is not a readable image ({reason})") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def plan_imagefolder(cfg: DatasetConfig) -> tuple[PlannedImages, np.ndarray, PlannedImages, np.ndarray, int]:
    """(the training images' plan, train labels, the test images' plan, test labels, number of classes)."""
    listing = list_folders(cfg)
    return (_plan(listing.filesystem, listing.train_paths, cfg.image_size), listing.train_labels,
            _plan(listing.filesystem, listing.test_paths, cfg.image_size), listing.test_labels, listing.num_classes)


def _plan(filesystem: pafs.FileSystem, paths: list[str], size: int) -> PlannedImages:
    per_read = max(1, BYTES_PER_READ // (3 * size * size))
    spans = tuple(FileSpan(filesystem, tuple(paths[i:i + per_read]), size) for i in range(0, len(paths), per_read))
    # Each span carries its filesystem; `column` only names the images in ray_reader's messages.
    return PlannedImages(shape=(len(paths), 3, size, size), dtype=np.dtype(np.uint8), spans=spans, filesystem=None, column="image", image_shape=None)


@ray.remote(num_returns=2)
def read_files(span: FileSpan) -> tuple[np.ndarray, dict]:
    """One span's images, read where this task runs, and their statistics (pixel_stats.block_stats)."""
    images = read_all(span.filesystem, list(span.paths), span.size)
    return images, block_stats(images)
