"""dataset.name parquet: data this project did not make (scikit-learn's digits, written by pandas and by
pyarrow in three image encodings), read back byte for byte, refused in one line when malformed, read
from an S3 URI, and distilled end to end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from test_uri_cache import s3_server  # noqa: F401  (a fixture: a moto S3 server on 127.0.0.1)

from orchestrator.config import load_config
from orchestrator.data.datasets import load_arrays
from orchestrator.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 pixels (its values are 0..16)."""
    digits = load_digits()
    return np.rint(digits.images * (255 / 16)).astype(np.uint8), digits.target.astype(np.int64)


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image, mode="L").save(out, format="PNG")
    return out.getvalue()


def _config(train: str, test: str, *overrides: str):
    """The driver's reader (parquet_source.py), whose rows these tests read back here; test_ray_reader.py holds the
    Ray reader (the default for parquet) to the same rows."""
    return load_config(None, ["dataset.name=parquet", f"dataset.train_path={train}", f"dataset.test_path={test}", "dataset.reader=driver", *overrides])


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory) -> Path:
    """The digits, first 1,500 rows train and the rest test, in three encodings, rows shuffled with an id."""
    root = tmp_path_factory.mktemp("parquet")
    images, labels = _digits()
    order = np.random.default_rng(0).permutation(len(labels))  # stored out of order: the id column restores it
    for split, rows in (("train", order[order < 1500]), ("test", order[order >= 1500])):
        frame = pd.DataFrame({
            "example_id": rows, "digit": labels[rows],
            "png": [_png(images[i]) for i in rows],
            "nested": [images[i].tolist() for i in rows],  # (H, W) lists of ints
            "flat": [(images[i].reshape(-1) / 255.0).tolist() for i in rows],  # floats in [0, 1]
        })
        frame.to_parquet(root / f"{split}.parquet", index=False)  # pandas' writer, not ours
    return root


@pytest.mark.parametrize(("column", "extra"), [("png", []), ("nested", []), ("flat", ["dataset.image_shape=[1, 8, 8]"])])
def test_every_encoding_reads_back_the_same_pixels_in_id_order(digits_parquet, column, extra):
    images, labels = _digits()
    cfg = _config(str(digits_parquet / "train.parquet"), str(digits_parquet / "test.parquet"), f"dataset.image_column={column}",
                  "dataset.label_column=digit", "dataset.id_column=example_id", *extra)
    data = load_arrays(cfg.dataset)
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(data.train.images[:, 0], images[:1500])
    np.testing.assert_array_equal(data.train.labels, labels[:1500])
    np.testing.assert_array_equal(data.test.images[:, 0], images[1500:])
    np.testing.assert_array_equal(data.test.labels, labels[1500:])
    assert str(digits_parquet / "train.parquet") in data.source


def test_a_folder_of_parquet_files_and_rgb_channels_last(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 5, 6, 3), dtype=np.uint8)  # (N, H, W, C), as images are usually stored
    (tmp_path / "train").mkdir()
    for part in range(2):  # two files, as Spark or Ray Data write them
        rows = range(part * 6, part * 6 + 6)
        pq.write_table(pa.table({"image": [rgb[i].tolist() for i in rows], "label": [i % 3 for i in rows]}), tmp_path / "train" / f"part-{part}.parquet")
    pq.write_table(pa.table({"image": [rgb[0].tolist()], "label": [2]}), tmp_path / "test.parquet")
    data = load_arrays(_config(str(tmp_path / "train"), str(tmp_path / "test.parquet")).dataset)
    assert data.input_shape == (3, 5, 6) and data.num_classes == 3
    np.testing.assert_array_equal(data.train.images, rgb.transpose(0, 3, 1, 2))


def _write(path: Path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


# (the broken test table, extra overrides, the part of the one-line message naming the problem)
BAD = {
    "missing column": (pa.table({"pixels": [[1, 2]], "label": [0]}), [], "has no column 'image' (columns: pixels, label)"),
    "no rows": (pa.table({"image": pa.array([], pa.list_(pa.uint8())), "label": pa.array([], pa.int64())}), [], "has no rows"),
    "label outside the class range": (pa.table({"image": [[[1, 2], [3, 4]]], "label": [10]}), ["dataset.num_classes=10"], "has label 10, outside [0, 10)"),
    "negative label": (pa.table({"image": [[[1, 2], [3, 4]]], "label": [-1]}), [], "negative label (-1)"),
    "missing label": (pa.table({"image": [[[1, 2], [3, 4]]], "label": pa.array([None], pa.int64())}), [], "1 missing label(s)"),
    "float labels": (pa.table({"image": [[[1, 2], [3, 4]]], "label": [0.5]}), [], "must hold integer class ids, not double"),
    "NaN pixels": (pa.table({"image": [[[0.1, float("nan")], [0.2, 0.3]]], "label": [0]}), [], "NaN or infinite pixels"),
    "pixels out of range": (pa.table({"image": [[[0, 300], [1, 2]]], "label": [0]}), [], "integer pixels outside [0, 255]"),
    "mixed shapes": (pa.table({"image": [[[1, 2], [3, 4]], [[1, 2, 3], [4, 5, 6]]], "label": [0, 1]}), [], "images of mixed shapes"),
    "flat without a shape": (pa.table({"image": [[1, 2, 3, 4]], "label": [0]}), [], "set dataset.image_shape to [C, H, W]"),
    "shape that does not fit": (pa.table({"image": [[1, 2, 3, 4, 5]], "label": [0]}), ["dataset.image_shape=[1, 2, 2]"], "5 pixels per image"),
    "not an image": (pa.table({"image": [b"not a png"], "label": [0]}), [], "row 0 is not a readable image"),
    "repeated ids": (pa.table({"image": [[[1]], [[2]]], "label": [0, 1], "id": [7, 7]}), ["dataset.id_column=id"], "repeated ids"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_malformed_sources_are_one_line_naming_the_file_and_column(digits_parquet, tmp_path, case):
    table, extra, message = BAD[case]
    bad = _write(tmp_path / "bad.parquet", table)
    good = _write(tmp_path / "good.parquet", pa.table({"image": [[[1, 2], [3, 4]]], "label": [1], "id": [0]}))
    with pytest.raises(ConfigError) as err:
        load_arrays(_config(good, bad, *extra).dataset)  # the broken file as the test source
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "bad.parquet" in str(err.value)


def test_unreadable_files_and_misplaced_fields_are_config_errors(tmp_path):
    (tmp_path / "zero.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"dataset.train_path: cannot read parquet .*zero.parquet"):
        load_arrays(_config(str(tmp_path / "zero.parquet"), str(tmp_path / "zero.parquet")).dataset)
    with pytest.raises(ConfigError, match=r"dataset.test_path: .*nowhere.parquet does not exist"):
        _config(str(tmp_path / "zero.parquet"), str(tmp_path / "nowhere.parquet"))
    with pytest.raises(ConfigError, match="dataset.train_path and dataset.test_path required for dataset.name parquet"):
        load_config(None, ["dataset.name=parquet"])
    with pytest.raises(ConfigError, match=r"dataset.image_column only apply to dataset.name parquet \(this dataset is 'mnist'\)"):
        load_config(None, ["dataset.image_column=pixels"])


def _without_labels(digits_parquet: Path, tmp_path: Path) -> list[str]:
    """The fixture's training rows written again without their label column: a transfer set."""
    pq.write_table(pq.read_table(digits_parquet / "train.parquet").drop_columns(["digit"]), tmp_path / "unlabelled.parquet")
    return ["dataset.name=parquet", f"dataset.train_path={tmp_path / 'unlabelled.parquet'}", f"dataset.test_path={digits_parquet / 'test.parquet'}",
            "dataset.image_column=png", "dataset.label_column=digit", "dataset.id_column=example_id", "dataset.train_labels=false", "dataset.reader=driver"]


def test_a_training_source_without_labels_is_a_transfer_set(digits_parquet, tmp_path):
    from orchestrator.data.parquet_source import UNLABELLED

    overrides = _without_labels(digits_parquet, tmp_path)
    data = load_arrays(load_config(None, [*overrides, "transfer.labels=false", "baseline=false", "dataset.val_fraction=0",
                                          "teachers.0.checkpoint=" + str(digits_parquet / "train.parquet")]).dataset)
    images, labels = _digits()
    np.testing.assert_array_equal(data.train.images[:, 0], images[:1500])
    assert (data.train.labels == UNLABELLED).all() and data.num_classes == 10  # the classes come from the test rows
    import torch
    import torch.nn.functional as F

    with pytest.raises(IndexError, match="out of bounds"):  # why -1: a loss that read these labels fails, it learns no made-up class
        F.cross_entropy(torch.zeros(1, 10), torch.from_numpy(data.train.labels[:1]))
    np.testing.assert_array_equal(data.test.labels, labels[1500:])
    with pytest.raises(ConfigError, match=r"unlabelled.parquet has no column 'digit'"):  # labels expected unless told otherwise
        load_arrays(load_config(None, [o for o in overrides if o != "dataset.train_labels=false"]).dataset)


GIVEN = ["transfer.labels=false", "baseline=false", "dataset.val_fraction=0", "teachers.0.checkpoint=teacher.pt"]
UNLABELLED_REFUSED = {
    "students read labels": ([g for g in GIVEN if g != "transfer.labels=false"], "transfer.labels: must be false"),
    "a twin": ([g for g in GIVEN if g != "baseline=false"], "baseline: must be false"),
    "a validation split": ([g for g in GIVEN if g != "dataset.val_fraction=0"], "dataset.val_fraction: must be 0"),
    "a teacher to train": ([g for g in GIVEN if not g.startswith("teachers.")], "teachers.0: needs a checkpoint or mlflow_model"),
    "a chain": ([*GIVEN, "chain=[{family: mlp, hidden: [8]}]"], "chain: not with unlabelled training rows"),
    "classes left out": ([*GIVEN, "transfer.exclude_classes=[3]"], "transfer.exclude_classes: not with unlabelled training rows"),
    "a sweep": ([*GIVEN, "sweep={space: {temperature: {grid: [1.0, 2.0]}}}"], "sweep: not with unlabelled training rows"),  # its trials compare on validation labels
}


@pytest.mark.parametrize("case", list(UNLABELLED_REFUSED), ids=list(UNLABELLED_REFUSED))
def test_nothing_trains_on_the_labels_a_transfer_set_does_not_have(tmp_path, case):
    (tmp_path / "teacher.pt").write_bytes(b"")
    overrides, message = UNLABELLED_REFUSED[case]
    base = ["dataset.name=parquet", f"dataset.train_path={tmp_path / 'teacher.pt'}", f"dataset.test_path={tmp_path / 'teacher.pt'}", "dataset.train_labels=false"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, *[o.replace("teacher.pt", str(tmp_path / "teacher.pt")) for o in overrides]])
    with pytest.raises(ConfigError, match=r"dataset.train_labels only apply to dataset.name parquet"):
        load_config(None, ["dataset.train_labels=false"])


@pytest.mark.integration
def test_read_from_an_s3_uri(s3_server, monkeypatch, digits_parquet):  # noqa: F811
    import pyarrow.fs as pafs

    root, env = s3_server
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    query = root.split("?", 1)[1]
    bucket = pafs.FileSystem.from_uri(root)[0]
    for split in ("train", "test"):
        pafs.copy_files(str(digits_parquet / f"{split}.parquet"), f"kd-bucket/digits/{split}.parquet", destination_filesystem=bucket)
    cfg = _config(f"s3://kd-bucket/digits/train.parquet?{query}", f"s3://kd-bucket/digits/test.parquet?{query}",
                  "dataset.image_column=png", "dataset.label_column=digit", "dataset.id_column=example_id")
    data = load_arrays(cfg.dataset)
    images, labels = _digits()
    np.testing.assert_array_equal(data.test.images[:, 0], images[1500:])
    np.testing.assert_array_equal(data.train.labels, labels[:1500])


@pytest.mark.integration
def test_students_learn_from_a_training_source_without_labels(ray_session, digits_parquet, tmp_path, monkeypatch, mlflow_uri, digits_teacher):
    """The digits job, its data from parquet files (a Ray Train run, soft targets and the MLflow datasets), and with
    dataset.train_labels false: no label column in the training file; the student learns from the teacher alone.
    Its training rows carry label -1, on which cross-entropy fails: the job finishing shows that nothing read one.
    The training images are read by Ray tasks (dataset.reader unset, the parquet default): the job's soft targets, students and datasets
    work from the object-store blocks, none in the driver (test_ray_reader.py shows the rows are the same).
    The teacher from conftest's state-dict file: what a teacher's training does is test_pipeline.py's subject."""
    from orchestrator.flows.pipeline import run_job
    from orchestrator.tracking import runs as tracking

    monkeypatch.chdir(tmp_path)
    # File order; and the default reader for parquet (Ray), not this module's driver reader.
    unlabelled = [o for o in _without_labels(digits_parquet, tmp_path) if not o.startswith(("dataset.id_column", "dataset.reader"))]
    cfg = load_config(REPO_ROOT / "configs/digits_kd.yaml", [
        *unlabelled, "transfer.labels=false", "baseline=false", "dataset.val_fraction=0",
        f"teachers.0.checkpoint={digits_teacher}", "train.epochs=6", "students=[{name: mlp32, family: mlp, hidden: [32]}]",
        "soft_targets.num_actors=1", "tracking.experiment=unlabelled"])
    rows = run_job(cfg)
    assert [(r["role"], r["name"]) for r in rows] == [("teacher", "cnn"), ("student", "mlp32")]
    teacher, student = rows
    assert teacher["test_errors"] + round(teacher["test_accuracy"] * 297) == 297  # the 297 test rows of the parquet file
    assert teacher["test_accuracy"] > 0.9  # the digits teacher on the same digits, read from the parquet file
    assert student["test_accuracy"] > 0.7 and student["agreement"] > 0.7  # 0.86 here; chance is 0.1, and all of it came from the teacher
    client = tracking.client(mlflow_uri)
    parent = client.search_runs([client.get_experiment_by_name("unlabelled").experiment_id], "tags.job = 'distill'")[0]
    sources = {d.dataset.source for d in parent.inputs.dataset_inputs}
    assert any("unlabelled.parquet" in s for s in sources) and any("test.parquet" in s for s in sources), sources
