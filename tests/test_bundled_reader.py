"""The bundled MNIST and Fashion-MNIST, and torchvision's MNIST family, read by Ray tasks (dataset.reader unset): the
driver reads labels and line offsets, no pixel; the rows, labels, statistics and padding the job ends with are the
driver reader's (for torchvision's, torchvision's own reader)."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from test_data import write_torchvision_mnist

from orchestrator.config import DatasetConfig, load_config
from orchestrator.data import bundled_reader
from orchestrator.data.bundled_reader import CsvSpan, IdxSpan
from orchestrator.data.datasets import load_arrays
from orchestrator.data.object_images import ObjectImages, PlannedImages
from orchestrator.data.ray_objects import read_planned_images
from orchestrator.errors import ConfigError


@pytest.mark.integration
@pytest.mark.parametrize("name, span", [("mnist", CsvSpan), ("fashion_mnist", IdxSpan)])
def test_bundled_images_read_in_ray_are_the_driver_readers_rows(ray_session, name, span):
    cfg = DatasetConfig(name=name, limit=40_000)  # reader unset: Ray's; 3 training spans, the last one short
    assert cfg.read_in_ray
    planned = load_arrays(cfg)
    assert isinstance(planned.train.images, PlannedImages) and planned.input_shape == (1, 28, 28)
    assert [type(s) for s in planned.train.images.spans] == [span] * 3
    assert [s.rows for s in planned.train.images.spans] == [16_384, 16_384, 40_000 - 2 * 16_384]
    data = read_planned_images(planned, cfg)
    driver = load_arrays(cfg.model_copy(update={"reader": "driver"}))
    assert isinstance(data.train.images, ObjectImages) and isinstance(data.test.images, ObjectImages)
    assert (len(data.train), len(data.test)) == (40_000, 10_000)
    np.testing.assert_array_equal(data.train.images.take(np.arange(40_000)), driver.train.images)
    np.testing.assert_array_equal(data.test.images.read_all(), driver.test.images)
    np.testing.assert_array_equal(data.train.labels, driver.train.labels)
    np.testing.assert_array_equal(data.test.labels, driver.test.labels)
    assert (data.mean, data.std, data.fill) == (driver.mean, driver.std, driver.fill)
    assert data.source == driver.source and name.split("_")[0] in data.source


def test_a_csv_whose_lines_and_labels_disagree_is_one_line(tmp_path, monkeypatch):
    """The plan counts lines and reads the label column in two passes: a file they disagree on stops the job."""
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    row = "3," + ",".join(["0"] * 784)
    for part in ("train", "test"):
        (tmp_path / f"mnist_{part}.csv").write_text(f"{header}\n{row}\n{row}\n\n")  # a blank line: 3 lines, 2 rows
    monkeypatch.setattr(bundled_reader, "mnist_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match=r"mnist_train.csv has 3 lines after its header but 2 labels"):
        load_arrays(DatasetConfig(name="mnist"))
    for part in ("train", "test"):  # without the blank line, and without the last newline: the plan holds
        (tmp_path / f"mnist_{part}.csv").write_text(f"{header}\n{row}\n{row}")
    planned = load_arrays(DatasetConfig(name="mnist"))
    spans = planned.train.images.spans
    assert len(planned.train) == 2 and spans[0].end == (tmp_path / "mnist_train.csv").stat().st_size


@pytest.mark.integration
def test_an_idx_file_cut_short_is_one_line_naming_it(ray_session, tmp_path):
    """The header promises more images than the file holds: the read task that reaches the end names the file."""
    for stem in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(bundled_reader.FASHION_MNIST_DIR / f"{stem}.gz", tmp_path / f"{stem}.gz")
    with gzip.open(bundled_reader.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz") as f:
        cut = f.read(16 + 50_000 * 784)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(cut)  # not gzipped: read at its offsets
    cfg = DatasetConfig(name="fashion_mnist", root=str(tmp_path))
    planned = load_arrays(cfg)  # the header and the labels agree: 60,000
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte ends before image 60000 \(an IDX file cut short\)"):
        read_planned_images(planned, cfg)


@pytest.mark.integration
def test_torchvision_mnist_read_in_ray_is_torchvisions_rows(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(bundled_reader, "ROWS_PER_READ", 16)  # 40 rows: spans of 16, 16 and 8
    write_torchvision_mnist(tmp_path, np.arange(40) % 10, np.arange(12) % 10)
    cfg = DatasetConfig(name="torchvision:MNIST", root=str(tmp_path))
    assert cfg.read_in_ray
    data = read_planned_images(load_arrays(cfg), cfg)
    driver = load_arrays(cfg.model_copy(update={"reader": "driver"}))  # torchvision.datasets.MNIST's arrays
    assert data.train.images.starts == (0, 16, 32, 40)
    np.testing.assert_array_equal(data.train.images.take(np.arange(40)), driver.train.images)
    np.testing.assert_array_equal(data.test.images.read_all(), driver.test.images)
    np.testing.assert_array_equal(data.train.labels, driver.train.labels)
    assert (data.mean, data.std, data.fill, data.num_classes) == (driver.mean, driver.std, driver.fill, 10)


def test_torchvision_downloads_are_read_by_the_driver():
    """torchvision loads what it downloads in the driver: with download on, Ray does not read the MNIST family."""
    assert not DatasetConfig(name="torchvision:MNIST", root="/data", download=True).read_in_ray
    assert not DatasetConfig(name="torchvision:CIFAR10", root="/data").read_in_ray  # pickles: the driver's
    with pytest.raises(ConfigError, match=r"dataset.reader ray: not with dataset.download true"):
        load_config(None, ["dataset.name=torchvision:MNIST", "dataset.root=/data", "dataset.download=true", "dataset.reader=ray"])
