"""Malformed input through the `distill` entry point, in-process: exit code 2, exactly one line on
stderr naming the problem, no Ray started, no MLflow run created (so none left RUNNING).

`tests/test_cli.py` runs a further dozen through a real subprocess. "No Ray started" is observed,
not assumed: RAY_TMPDIR points at an empty folder where any `ray.init` would create its session.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from orchestrator.cli import main as cli_main
from orchestrator.config import ModelSpec
from orchestrator.train.models import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(REPO_ROOT / "configs/digits_kd.yaml")
SWEEP = str(REPO_ROOT / "configs/digits_sweep.yaml")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def files(tmp_path_factory) -> Path:
    """Bad files of every kind the CLI reads: configs, checkpoints, a dataset with bad labels."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "broken.yaml").write_text("kd: [1, 2\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "typed.yaml").write_text("kd:\n  temperature: hot\n")
    (root / "unknown.yaml").write_text("name: x\nepochs: 5\n")
    (root / "empty.yaml").write_text("")
    digits_mlp = ModelSpec(family="mlp", hidden=[16])
    torch.manual_seed(0)
    torch.save(build_model(digits_mlp, (1, 8, 8), 5).state_dict(), root / "five_classes.pt")
    torch.save(build_model(ModelSpec(family="cnn", channels=[4], hidden=[8]), (1, 8, 8), 10).state_dict(), root / "cnn.pt")
    nan = build_model(digits_mlp, (1, 8, 8), 10).state_dict()
    nan["fc1.weight"][0, 0] = float("nan")
    torch.save(nan, root / "nan.pt")
    torch.save(torch.zeros(3), root / "tensor.pt")
    torch.save({"fc1.weight": argparse.Namespace(x=1)}, root / "object.pt")
    good = root / "good.pt"
    torch.save(build_model(digits_mlp, (1, 8, 8), 10).state_dict(), good)
    (root / "truncated.pt").write_bytes(good.read_bytes()[:200])
    raw = root / "mnist" / "MNIST" / "raw"  # torchvision's MNIST layout, one label out of range
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(raw / "train-labels-idx1-ubyte", np.array([*range(10), *range(9), 12]))
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (4, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [[[0] * 8] * 8] * 2, "label": [0, 1]}), root / "digits.parquet")
    pq.write_table(pa.table({"image": [[[0] * 8] * 8] * 2, "label": [0, None]}), root / "unlabelled_row.parquet")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for all cases (creating its schema costs seconds); none of them may add a run to it."""
    return tmp_path_factory.mktemp("store") / "mlflow.db"


@pytest.fixture
def workdir(tmp_path, monkeypatch, store) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


@pytest.fixture
def ray_tmpdir(monkeypatch, no_ray):
    """Where a Ray started by the command would put its session (short: Ray's socket paths have a length limit);
    no Ray of the test session in this process, whichever tests ran before."""
    with tempfile.TemporaryDirectory(prefix="kdray") as folder:
        monkeypatch.setenv("RAY_TMPDIR", folder)
        yield Path(folder)


def assert_bad_input(argv: list[str], message: str, workdir: Path, ray_tmpdir: Path, capfd) -> str:
    """Runs `distill <argv>` in this process and checks the contract; returns the error line."""
    assert not ray.is_initialized()  # the no_ray fixture saw to it
    code = cli_main(argv)
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("distill: error: ") and message in lines[0], lines[0]
    assert not any(ray_tmpdir.iterdir()), "Ray was started"
    assert not (workdir / "ray_results").exists() and not (workdir / ".kd_cache").exists()
    db = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from runs").fetchone()[0] == 0
    return lines[0]


# (argv, the part of the one-line message that names the problem); {f} is the folder of bad files.
CASES = {
    # Files and YAML
    "bad YAML syntax": (["run", "{f}/broken.yaml"], "broken.yaml: line 2 is not valid YAML"),
    "YAML top level not a mapping": (["run", "{f}/list.yaml"], "top level must be a mapping, got list"),
    "wrong type in the file": (["run", "{f}/typed.yaml"], "kd.temperature: Input should be a valid number"),
    "unknown key in the file": (["run", "{f}/unknown.yaml"], "epochs: unknown key"),
    "config is a directory": (["run", "{f}"], "config file {f} is a folder, not a YAML file"),
    "override without =": (["run", DIGITS, "kd.temperature"], "override 'kd.temperature': expected key=value"),
    "override value not YAML": (["run", DIGITS, "kd.alpha=[1"], "override kd.alpha: value is not valid YAML"),
    "override into a missing list item": (["run", DIGITS, "students.7.hidden=[8]"], "students.7: no list item '7'"),
    "unknown nested key": (["run", DIGITS, "train.epoch=3"], "train.epoch: unknown key"),
    # Types and ranges
    "T negative": (["run", DIGITS, "kd.temperature=-1"], "kd.temperature: temperature must be a finite number > 0"),
    "T NaN": (["run", DIGITS, "kd.temperature=.nan"], "kd.temperature: temperature must be a finite number > 0"),
    "T infinite": (["run", DIGITS, "kd.temperature=.inf"], "kd.temperature: temperature must be a finite number > 0"),
    "alpha negative": (["run", DIGITS, "kd.alpha=-0.1"], "kd.alpha: alpha must be in [0, 1]"),
    "alpha NaN": (["run", DIGITS, "kd.alpha=.nan"], "kd.alpha: alpha must be in [0, 1]"),
    "lr infinite": (["run", DIGITS, "train.lr=.inf"], "train.lr: Input should be a finite number"),
    "epochs a word": (["run", DIGITS, "train.epochs=five"], "train.epochs: Input should be a valid integer"),
    "batch size a list": (["run", DIGITS, "train.batch_size=[64]"], "train.batch_size: Input should be a valid integer"),
    "negative seed": (["run", DIGITS, "seed=-1"], "seed: Input should be greater than or equal to 0"),
    "job name with a path separator": (["run", DIGITS, "name=../escape"], "name: must be letters, digits"),
    "no students": (["run", DIGITS, "students=[]"], "students: at least one student is needed"),
    "duplicate student names": (["run", DIGITS, "students.1.name=mlp32"], "students: names must be unique"),
    "unknown loss": (["run", DIGITS, "students.0.loss=hinton2"], "students.0.loss: unknown loss 'hinton2'"),
    "unknown model family": (["run", DIGITS, "teachers.0.family=vit"], "teachers.0.family: unknown model family 'vit'"),
    "unknown soft-target encoding": (["run", DIGITS, "soft_targets.encoding=int4"], "soft_targets.encoding: Input should be"),
    # Sweeps
    "empty search space": (["sweep", SWEEP, "sweep.space={}"], "space: empty search space"),
    "sampled T <= 0": (["sweep", SWEEP, "sweep.space.temperature={choice: [4, 0]}"], "space.temperature: values must be finite and > 0, got 0"),
    "sampled alpha above 1": (["sweep", SWEEP, "sweep.space.alpha={uniform: [0.5, 1.5]}"], "space.alpha: values must be in [0, 1], got 1.5"),
    "grid under Optuna": (["sweep", SWEEP, "sweep.search=optuna"], "grid dimensions need search=random"),
    "sampled student not defined": (["sweep", SWEEP, "sweep.space.student={choice: [mlp99]}"], "sweep.space.student: ['mlp99'] are not names in students"),
    "chain entry not a model spec": (["sweep", SWEEP, "sweep.space.chain={grid: [[{family: mlp, width: 3}]]}"], "sweep.space.chain.0.0: width: unknown key"),
    "sweep without a sweep section": (["sweep", DIGITS], "sweep: this config has no sweep section"),
    "resume with nothing to resume": (["sweep", SWEEP, "--resume"], "--resume: no sweep to resume"),
    # Data
    "missing dataset files": (["run", DIGITS, "dataset.name=fashion_mnist", "dataset.root={f}/nowhere"], "dataset 'fashion_mnist' not found"),
    "imagefolder without a size": (["run", DIGITS, "dataset.name=imagefolder", "dataset.root={f}"], "dataset.image_size: required for imagefolder"),
    "labels out of range": (["run", DIGITS, "dataset.name=torchvision:MNIST", "dataset.root={f}/mnist"], "train labels span [0, 12], expected [0, 10)"),
    "empty validation split in a sweep": (["sweep", SWEEP, "dataset.val_fraction=0"], "dataset.val_fraction: the validation split is empty; a sweep"),
    "bias correction without validation": (["run", DIGITS, "dataset.val_fraction=0", "transfer.exclude_classes=[3]", "transfer.bias_correction=true"],
                                           "dataset.val_fraction: the validation split is empty; transfer.bias_correction"),
    "parquet without its image column": (["run", DIGITS, "dataset.name=parquet", "dataset.train_path={f}/digits.parquet", "dataset.test_path={f}/digits.parquet",
                                          "dataset.image_column=pixels"], "dataset: {f}/digits.parquet has no column 'pixels' (columns: image, label)"),
    "parquet with a missing label": (["run", DIGITS, "dataset.name=parquet", "dataset.train_path={f}/digits.parquet", "dataset.test_path={f}/unlabelled_row.parquet"],
                                     "dataset: {f}/unlabelled_row.parquet column 'label' has 1 missing label(s)"),
    "parquet source that does not exist": (["run", DIGITS, "dataset.name=parquet", "dataset.train_path={f}/nowhere.parquet", "dataset.test_path={f}/digits.parquet"],
                                           "dataset.train_path: {f}/nowhere.parquet does not exist"),
    "training rows without labels and a twin": (["run", DIGITS, "dataset.name=parquet", "dataset.train_path={f}/digits.parquet", "dataset.test_path={f}/digits.parquet",
                                                "dataset.train_labels=false", "transfer.labels=false", "dataset.val_fraction=0"],
                                               "baseline: must be false: the training rows have no labels (dataset.train_labels false)"),
    "excluded class out of range": (["run", DIGITS, "transfer.exclude_classes=[12]"], "transfer.exclude_classes: class 12 does not exist"),
    # Paths: empty, or the wrong kind of thing
    "empty config file": (["run", "{f}/empty.yaml"], "{f}/empty.yaml: the config file is empty"),
    "cache folder that is a file": (["run", DIGITS, "soft_targets.cache_dir={f}/good.pt"], "soft_targets.cache_dir: {f}/good.pt is a file, not a folder"),
    "storage folder that is a file": (["sweep", SWEEP, "train.storage_path={f}/good.pt"], "train.storage_path: {f}/good.pt is a file, not a folder"),
    "dataset root that is a file": (["run", DIGITS, "dataset.name=fashion_mnist", "dataset.root={f}/good.pt"], "dataset.root: {f}/good.pt is a file, not a folder"),
    "checkpoint that is a folder": (["run", DIGITS, "teachers.0.checkpoint={f}/mnist"], "teachers.0.checkpoint: {f}/mnist is a folder, not a file"),
    "empty cache path": (["run", DIGITS, "soft_targets.cache_dir=''"], "soft_targets.cache_dir: empty path"),
    # Checkpoints
    "checkpoint with the wrong class count": (
        ["run", DIGITS, "teachers=[{name: cnn, family: mlp, hidden: [16]}]", "teachers.0.checkpoint={f}/five_classes.pt"],
        "'out.weight' has shape (5, 16) in the checkpoint but (10, 16) in the model",
    ),
    "checkpoint of another architecture": (
        ["run", DIGITS, "teachers=[{name: cnn, family: mlp, hidden: [16]}]", "teachers.0.checkpoint={f}/cnn.pt"],
        "teachers.0: checkpoint does not fit the model: missing key",
    ),
    "checkpoint with NaN weights": (
        ["run", DIGITS, "teachers=[{name: cnn, family: mlp, hidden: [16]}]", "teachers.0.checkpoint={f}/nan.pt"],
        "teachers.0: checkpoint tensor 'fc1.weight' holds NaN or inf values",
    ),
    "checkpoint truncated": (["run", DIGITS, "teachers.0.checkpoint={f}/truncated.pt"], "truncated.pt cannot be read"),
    "checkpoint holds a bare tensor": (["run", DIGITS, "teachers.0.checkpoint={f}/tensor.pt"], "does not hold a state dict of named tensors"),
    "checkpoint carries a pickled object": (["run", DIGITS, "teachers.0.checkpoint={f}/object.pt"], "refusing to unpickle code"),
    "checkpoint and MLflow model both": (
        ["run", DIGITS, "teachers.0.checkpoint={f}/good.pt", "teachers.0.mlflow_model=runs:/abc/model"],
        "teachers.0: give checkpoint or mlflow_model, not both",
    ),
    "MLflow model that does not exist": (["run", DIGITS, "teachers.0.mlflow_model=runs:/0123456789abcdef/model"], "teachers.0.mlflow_model: cannot load"),
    # Services
    "MLflow store of an unknown scheme": (["run", DIGITS, "tracking.tracking_uri=ftp://127.0.0.1/x"], "tracking.tracking_uri: cannot use MLflow store ftp://"),
    "MLflow SQLite store that is not a database": (["run", DIGITS, "tracking.tracking_uri=sqlite:///{f}/list.yaml"], "tracking.tracking_uri: cannot use MLflow store sqlite:///"),
    "unreachable Ray address": (["run", DIGITS, "--address", "127.0.0.1:9"], "--address: no Ray cluster answers at 127.0.0.1:9"),
    "unreachable Ray client address": (["teacher", DIGITS, "--address", "ray://127.0.0.1:9"], "--address: no Ray cluster answers at ray://127.0.0.1:9"),
    "Ray address that is not host:port": (["soft-targets", DIGITS, "--address", "head-node"], "--address: 'head-node' is not host:port"),
    "Ray address with a bad port": (["run", DIGITS, "--address", "127.0.0.1:99999"], "is not host:port"),
    "more training CPUs than exist": (["run", DIGITS, "train.num_workers=4", "train.cpus_per_worker=512"], "train.num_workers x train.cpus_per_worker: 4 train workers need 2048 CPU, this machine has"),
    "teacher actor bigger than the machine": (["soft-targets", DIGITS, "soft_targets.num_cpus_per_actor=4096"], "soft_targets.num_cpus_per_actor: teacher actors each need 4096 CPU, this machine has"),
    "sweep needing more CPUs than exist": (["sweep", SWEEP, "train.cpus_per_worker=4096"], "train.num_workers x train.cpus_per_worker: 1 train workers need 4096 CPU"),
    # Found while loading what the config names (moved here from test_cli.py: in this process, not a new one each)
    "unknown dataset name": (["run", DIGITS, "dataset.name=imagenet"], "dataset.name: unknown dataset 'imagenet'"),
    "normalisation for the wrong number of channels": (["run", DIGITS, "dataset.mean=[0.5, 0.5, 0.5]", "dataset.std=[0.2, 0.2, 0.2]"],
                                                       "dataset.mean: 3 value(s) for the 1 channel(s) of digits"),
    "a mean without a std": (["run", DIGITS, "dataset.mean=[0.5]"], "mean and std are given together"),
    "torchvision data not on disk": (["run", DIGITS, "dataset.name=torchvision:CIFAR10", "dataset.root={f}/nowhere"], "dataset.download=true"),
    "checkpoint not found": (["run", DIGITS, "teachers.0.checkpoint={f}/nowhere.pt"], "checkpoint not found: {f}/nowhere.pt"),
    "jitter without views": (["run", DIGITS, "train.input_jitter=2"], "train.input_jitter: students train on views; set views.max_shift"),
    "MLflow server that does not answer": (["run", DIGITS, "tracking.tracking_uri=http://127.0.0.1:9"], "tracking.tracking_uri: cannot use MLflow store http://127.0.0.1:9"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_before_ray_and_mlflow(case, files, workdir, ray_tmpdir, capfd):
    argv, message = CASES[case]
    assert_bad_input([a.replace("{f}", str(files)) for a in argv], message.replace("{f}", str(files)), workdir, ray_tmpdir, capfd)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_training_without_a_gpu(workdir, ray_tmpdir, capfd):
    assert_bad_input(["run", DIGITS, "train.use_gpu=true"], "train.use_gpu: 1 train workers need 1 GPU, this machine has 0", workdir, ray_tmpdir, capfd)


def test_ray_address_from_the_environment(workdir, ray_tmpdir, capfd, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    assert_bad_input(["run", DIGITS], "RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:9", workdir, ray_tmpdir, capfd)


def test_mlflow_password_never_reaches_the_terminal(workdir, ray_tmpdir, capfd):
    argv = ["run", DIGITS, "tracking.tracking_uri=http://alice:s3cret-pw@127.0.0.1:9"]
    line = assert_bad_input(argv, "tracking.tracking_uri: cannot use MLflow store http://***@127.0.0.1:9", workdir, ray_tmpdir, capfd)
    assert "s3cret" not in line
