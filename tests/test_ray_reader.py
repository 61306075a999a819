"""dataset.reader ray (the default): parquet sources and image folders read by Ray tasks into the object store. The driver plans the read
(footers, labels, one image) and holds references; the rows, statistics and fingerprint it ends with are the driver
reader's, and the students' datasets and the teacher actors' blocks are cut where the blocks are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_parquet_source import _digits, _png
from test_uri_cache import s3_server  # noqa: F401  (a fixture: a moto S3 server on 127.0.0.1)

from orchestrator.config import load_config
from orchestrator.data import ray_reader
from orchestrator.data.datasets import load_arrays
from orchestrator.data.object_images import ObjectImages, PlannedImages
from orchestrator.data.ray_objects import put_image_blocks, read_planned_images, to_ray_dataset
from orchestrator.errors import ConfigError


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory) -> Path:
    """The digits as PNG bytes: 1,500 training rows in two files of row groups of 100 rows, the other 297 the test file."""
    root = tmp_path_factory.mktemp("ray-reader")
    images, labels = _digits()
    table = pa.table({"png": [_png(image) for image in images], "digit": labels})
    (root / "train").mkdir()
    pq.write_table(table.slice(0, 900), root / "train" / "part-0.parquet", row_group_size=100)
    pq.write_table(table.slice(900, 600), root / "train" / "part-1.parquet", row_group_size=100)
    pq.write_table(table.slice(1500), root / "test.parquet")
    return root


def _dataset(root: Path, *overrides: str):
    return load_config(None, ["dataset.name=parquet", f"dataset.train_path={root / 'train'}", f"dataset.test_path={root / 'test.parquet'}",
                              "dataset.image_column=png", "dataset.label_column=digit", *overrides]).dataset


@pytest.mark.integration
def test_images_read_in_ray_are_the_driver_readers_rows(ray_session, digits_files, monkeypatch):
    monkeypatch.setattr(ray_reader, "ROWS_PER_READ", 250)  # spans of 3 row groups: 3 in the first file, 2 in the second
    driver = load_arrays(_dataset(digits_files, "dataset.reader=driver"))
    cfg = _dataset(digits_files)  # dataset.reader unset: Ray reads a parquet source's images
    assert cfg.reader is None and cfg.read_in_ray
    planned = load_arrays(cfg)
    assert isinstance(planned.train.images, PlannedImages) and planned.input_shape == (1, 8, 8) and len(planned.train) == 1500
    assert [span.rows for span in planned.train.images.spans] == [300] * 5
    with pytest.raises(LookupError, match="not read yet"):
        np.asarray(planned.train.images)

    data = read_planned_images(planned, cfg)
    assert isinstance(data.train.images, ObjectImages) and data.train.images.starts == (0, 300, 600, 900, 1200, 1500)
    with pytest.raises(LookupError, match="object store"):  # nothing can pull the whole split into the driver by accident
        np.asarray(data.train.images)
    np.testing.assert_array_equal(data.train.images.take(np.arange(1500)), driver.train.images)
    for cut in (slice(0, 0), slice(-5, None), slice(1490, 10, -97), slice(3, 1400, 250)):
        np.testing.assert_array_equal(data.train.images[cut], driver.train.images[cut])
    np.testing.assert_array_equal(data.train.labels, driver.train.labels)
    assert isinstance(planned.test.images, PlannedImages) and isinstance(data.test.images, ObjectImages)  # the test rows too
    np.testing.assert_array_equal(data.test.images.read_all(), driver.test.images)
    np.testing.assert_array_equal(data.test.labels, driver.test.labels)
    assert (data.mean, data.std, data.fill, data.num_classes) == (driver.mean, driver.std, driver.fill, driver.num_classes)
    again = read_planned_images(load_arrays(cfg), cfg)
    assert again.fingerprint("train") == data.fingerprint("train")  # the digest is the data's, whichever process read it
    other = read_planned_images(load_arrays(_dataset(digits_files, "dataset.reader=ray", "dataset.limit=1234", "dataset.test_limit=100")), cfg)
    assert len(other.train) == 1234 and other.fingerprint("train") != data.fingerprint("train")
    np.testing.assert_array_equal(other.test.images.read_all(), driver.test.images[:100])
    np.testing.assert_array_equal(other.train.images[1000:1234], driver.train.images[1000:1234])

    ids = np.arange(3, 1500, 7)  # the students' rows: a selection across every block
    batches = list(to_ray_dataset(data.train, ids).iter_batches(batch_size=None, batch_format="numpy"))
    np.testing.assert_array_equal(np.concatenate([b["id"] for b in batches]), ids)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), driver.train.images[ids])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), driver.train.labels[ids])
    assert len(batches) >= 5

    import ray

    blocks = ray.get(put_image_blocks([data.train, data.test], 8))  # the teacher actors' blocks: ids run on into the test rows
    np.testing.assert_array_equal(np.concatenate([b["id"] for b in blocks]), np.arange(1797))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in blocks]), np.concatenate([driver.train.images, driver.test.images]))


@pytest.mark.integration
def test_a_bad_image_read_in_ray_is_one_line_naming_the_file_and_column(ray_session, tmp_path, monkeypatch):
    good = pa.table({"image": [[[1, 2], [3, 4]]] * 4, "label": [0, 1, 0, 1]})
    pq.write_table(good, tmp_path / "test.parquet")
    cases = {
        "NaN pixels": (pa.table({"image": [[[0.1, 0.2], [0.3, 0.4]]] * 3 + [[[0.1, float("nan")], [0.2, 0.3]]], "label": [0, 1, 0, 1]}),
                       "has NaN or infinite pixels"),
        "mixed shapes": (pa.table({"image": [[[1, 2], [3, 4]]] * 2 + [[[1, 2, 3], [4, 5, 6], [7, 8, 9]]] * 2, "label": [0, 1, 0, 1]}),
                         "has images of mixed shapes ((1, 2, 2) and (1, 3, 3))"),
    }
    for case, (table, message) in cases.items():
        pq.write_table(table, tmp_path / "bad.parquet", row_group_size=2)  # the bad rows in the second row group, read by a task of their own
        cfg = load_config(None, ["dataset.name=parquet", f"dataset.train_path={tmp_path / 'bad.parquet'}", f"dataset.test_path={tmp_path / 'test.parquet'}",
                                 "dataset.reader=ray"]).dataset
        original = ray_reader.ROWS_PER_READ
        try:
            ray_reader.ROWS_PER_READ = 2
            planned = load_arrays(cfg)  # the first image is fine: the plan passes
        finally:
            ray_reader.ROWS_PER_READ = original
        with pytest.raises(ConfigError) as err:
            read_planned_images(planned, cfg)
        assert message in str(err.value) and "bad.parquet" in str(err.value) and "'image'" in str(err.value), case
        assert "\n" not in str(err.value), case

    # The test split's reads start beside the training split's: a bad test file is the same one line, naming it,
    # and with both files bad the training file's error is the one reported.
    pq.write_table(cases["NaN pixels"][0], tmp_path / "bad.parquet", row_group_size=2)
    pq.write_table(cases["mixed shapes"][0], tmp_path / "bad_too.parquet", row_group_size=2)
    for train, test, named in (("test.parquet", "bad.parquet", "bad.parquet"), ("bad_too.parquet", "bad.parquet", "bad_too.parquet")):
        cfg = load_config(None, ["dataset.name=parquet", f"dataset.train_path={tmp_path / train}", f"dataset.test_path={tmp_path / test}",
                                 "dataset.reader=ray"]).dataset
        monkeypatch.setattr(ray_reader, "ROWS_PER_READ", 2)
        planned = load_arrays(cfg)
        monkeypatch.undo()
        with pytest.raises(ConfigError) as err:
            read_planned_images(planned, cfg)
        assert str(tmp_path / named) in str(err.value) and "'image'" in str(err.value) and "\n" not in str(err.value), (train, test, str(err.value))


@pytest.mark.integration
def test_with_an_id_column_the_rows_are_in_id_order_whatever_the_files_order(ray_session, digits_files, tmp_path, monkeypatch):
    """The same rows in two file layouts (other row orders, other files) with a shuffled id column: the reader ray
    gives the driver reader's rows, labels and statistics, in id order, and one fingerprint for both layouts;
    `limit` keeps the smallest ids, as the driver's reader does."""
    monkeypatch.setattr(ray_reader, "ROWS_PER_READ", 250)
    table = pq.read_table(digits_files / "train")
    table = table.append_column("key", pa.array(np.random.default_rng(3).permutation(len(table)) * 3 + 11))
    test = pq.read_table(digits_files / "test.parquet")
    pq.write_table(test.append_column("key", pa.array(np.arange(len(test)))), tmp_path / "test.parquet")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pq.write_table(table, tmp_path / "a" / "part-0.parquet", row_group_size=100)
    reversed_rows = table.take(np.arange(len(table))[::-1])
    for part, begin in enumerate((0, 700, 1100)):
        pq.write_table(reversed_rows.slice(begin, {0: 700, 700: 400, 1100: 400}[begin]), tmp_path / "b" / f"part-{part}.parquet", row_group_size=150)

    def dataset(layout: str, *overrides: str):
        return load_config(None, ["dataset.name=parquet", f"dataset.train_path={tmp_path / layout}", f"dataset.test_path={tmp_path / 'test.parquet'}",
                                  "dataset.image_column=png", "dataset.label_column=digit", "dataset.id_column=key", *overrides]).dataset

    for limit, layouts in (((), ("a", "b")), (("dataset.limit=400",), ("b",))):
        driver = load_arrays(dataset("a", "dataset.reader=driver", *limit))
        read = [read_planned_images(load_arrays(dataset(layout, "dataset.reader=ray", *limit)), dataset(layout, "dataset.reader=ray", *limit))
                for layout in layouts]
        for data in read:
            assert len(data.train) == len(driver.train) == (400 if limit else 1500)
            np.testing.assert_array_equal(data.train.images.take(np.arange(len(data.train))), driver.train.images)
            np.testing.assert_array_equal(data.train.labels, driver.train.labels)
            assert (data.mean, data.std, data.fill) == (driver.mean, driver.std, driver.fill)
        assert len({data.fingerprint("train") for data in read}) == 1
    assert not np.array_equal(driver.train.labels, table.column("digit").to_numpy()[:400])  # id order is not file order here
    (tmp_path / "repeated").mkdir()
    pq.write_table(table.set_column(2, "key", pa.array(np.arange(len(table)) % 1000)), tmp_path / "repeated" / "part-0.parquet")
    with pytest.raises(ConfigError, match=r"repeated column 'key' has repeated ids"):
        load_arrays(dataset("repeated", "dataset.reader=ray"))  # before Ray reads a pixel


def test_reader_ray_is_for_parquet_image_folders_and_the_bundled_mnists(tmp_path):
    only = r"dataset.reader ray: only dataset.name parquet, imagefolder, mnist, fashion_mnist, torchvision:MNIST, .* \(this dataset is 'digits'"
    with pytest.raises(ConfigError, match=only):
        load_config(None, ["dataset.name=digits", "dataset.reader=ray"])
    assert not load_config(None, ["dataset.reader=driver"]).dataset.read_in_ray
    assert not load_config(None, ["dataset.name=digits"]).dataset.read_in_ray  # the driver reads digits anyway
    for name in ("mnist", "fashion_mnist"):  # unset: Ray reads
        assert load_config(None, [f"dataset.name={name}"]).dataset.read_in_ray
    assert load_config(None, ["dataset.name=imagefolder", "dataset.image_size=8"]).dataset.read_in_ray


@pytest.mark.integration
def test_an_image_folder_read_in_ray_is_the_driver_readers_rows(ray_session, tmp_path, monkeypatch):
    """dataset.name imagefolder, reader unset: the driver lists the folders (no image opened), Ray tasks read spans of
    files; the rows, labels and statistics are the driver reader's, and a file that is not an image is one line
    naming it, from the task that read it."""
    from PIL import Image

    from orchestrator.data import folder_reader

    rng = np.random.default_rng(0)
    for split, count in (("train", 7), ("val", 3)):
        for cls in ("ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    monkeypatch.setattr(folder_reader, "BYTES_PER_READ", 3 * 8 * 8 * 4)  # spans of 4 files: 4 read tasks for 14 training images
    cfg = load_config(None, ["dataset.name=imagefolder", f"dataset.root={tmp_path}", "dataset.image_size=8"]).dataset
    driver = load_arrays(cfg.model_copy(update={"reader": "driver"}))
    planned = load_arrays(cfg)
    assert isinstance(planned.train.images, PlannedImages) and planned.input_shape == (3, 8, 8)
    assert [span.rows for span in planned.train.images.spans] == [4, 4, 4, 2]
    data = read_planned_images(planned, cfg)
    assert isinstance(data.train.images, ObjectImages) and isinstance(data.test.images, ObjectImages)
    np.testing.assert_array_equal(data.train.images.take(np.arange(14)), driver.train.images)
    np.testing.assert_array_equal(data.test.images.read_all(), driver.test.images)
    np.testing.assert_array_equal(data.train.labels, [0] * 7 + [1] * 7)
    np.testing.assert_array_equal(data.test.labels, driver.test.labels)
    assert (data.mean, data.std, data.fill, data.num_classes) == (driver.mean, driver.std, driver.fill, 2)
    limited = load_config(None, ["dataset.name=imagefolder", f"dataset.root={tmp_path}", "dataset.image_size=8", "dataset.limit=9",
                                 "dataset.test_limit=2"]).dataset
    few = read_planned_images(load_arrays(limited), limited)
    np.testing.assert_array_equal(few.train.images.take(np.arange(9)), driver.train.images[:9])
    assert len(few.test) == 2

    (tmp_path / "train" / "bee" / "5.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError) as err:
        read_planned_images(load_arrays(cfg), cfg)
    assert "train/bee/5.png is not a readable image" in str(err.value) and "\n" not in str(err.value)


def test_an_image_folders_listing_is_torchvisions(tmp_path):
    """Classes in name order and files in ImageFolder's order (a folder's own files before its subfolders'), only
    image extensions (any case), nothing outside a class folder: the numbering and rows torchvision gives."""
    from torchvision.datasets import ImageFolder

    from orchestrator.config import DatasetConfig
    from orchestrator.data.folder_reader import list_folders

    for name in ("train/bee/z.png", "train/bee/0/y.png", "train/ant/b.png", "train/ant/a.JPG", "train/ant/sub/c.png", "train/ant/notes.txt",
                 "train/loose.png", "train/cat/a-x.png", "train/cat/a/b.png", "val/bee/q.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"listed, never opened")
    listing = list_folders(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=4))
    torchvision = ImageFolder(str(tmp_path / "train"))
    assert listing.train_paths == [path for path, _ in torchvision.samples] and len(listing.train_paths) == 7
    assert listing.train_labels.tolist() == [label for _, label in torchvision.samples] and listing.num_classes == 3
    assert listing.test_paths == [str(tmp_path / "val/bee/q.png")] and listing.test_labels.tolist() == [1]  # ant, bee, cat
    (tmp_path / "train/cat/a-x.png").unlink()
    (tmp_path / "train/cat/a/b.png").rename(tmp_path / "train/cat/a/b.gif")
    with pytest.raises(ConfigError, match=r"no image file for the classes cat"):
        list_folders(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=4))


@pytest.mark.integration
def test_an_image_folder_from_an_s3_uri(ray_session, s3_server, tmp_path):  # noqa: F811
    """The same folder read from a local path and from an S3 URI (moto; the credentials in the URI, as the Ray
    workers have no AWS variables): the same rows with either reader."""
    import pyarrow.fs as pafs
    from PIL import Image

    root, _ = s3_server
    rng = np.random.default_rng(1)
    for split, count in (("train", 5), ("test", 2)):
        for cls in ("ant", "bee"):
            (tmp_path / "pets" / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "pets" / split / cls / f"{i}.png")
    bucket, _ = pafs.FileSystem.from_uri(root.replace("s3://", "s3://testing:testing@", 1))
    pafs.copy_files(str(tmp_path / "pets"), "kd-bucket/pets", destination_filesystem=bucket)
    uri = root.replace("s3://", "s3://testing:testing@", 1).replace("/kd-cache?", "/pets?")

    def dataset(where: str, *overrides: str):
        return load_config(None, ["dataset.name=imagefolder", f"dataset.root={where}", "dataset.image_size=6", *overrides]).dataset

    local = load_arrays(dataset(str(tmp_path / "pets"), "dataset.reader=driver"))
    from_driver = load_arrays(dataset(uri, "dataset.reader=driver"))
    cfg = dataset(uri)
    from_ray = read_planned_images(load_arrays(cfg), cfg)
    for data in (from_driver, from_ray):
        np.testing.assert_array_equal(data.train.labels, local.train.labels)
        np.testing.assert_array_equal(data.test.labels, local.test.labels)
    np.testing.assert_array_equal(from_driver.train.images, local.train.images)
    np.testing.assert_array_equal(from_ray.train.images.take(np.arange(10)), local.train.images)
    np.testing.assert_array_equal(from_ray.test.images.read_all(), local.test.images)
