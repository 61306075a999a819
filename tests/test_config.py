"""Config loading, dotted overrides and one-line validation errors (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, JobConfig, ModelSpec, load_config, spec_of

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_overrides_reach_nested_fields_and_lists():
    cfg = load_config(REPO_ROOT / "configs/mnist_kd.yaml", ["kd.temperature=8", "students.0.hidden=[64]", "train.use_gpu=true", "seed=3"])
    assert cfg.kd.temperature == 8.0
    assert cfg.students[0].hidden == [64]
    assert cfg.train.use_gpu is True and cfg.seed == 3
    # untouched values keep the file's
    assert cfg.kd.alpha is None and cfg.teachers[0].channels == [16, 32, 64]  # alpha unset: fitted per student


def test_defaults_without_file_and_override_into_default_lists():
    cfg = load_config(None, ["students.0.hidden=[8,8]"])
    assert cfg.students[0].hidden == [8, 8]
    assert cfg == JobConfig.model_validate(cfg.model_dump())  # the worker round trip is lossless


def test_spec_of_keeps_only_architecture():
    cfg = load_config(REPO_ROOT / "configs/mnist_kd.yaml")
    spec = spec_of(cfg.teachers[0])
    assert type(spec).__name__ == "ModelSpec"
    assert spec.family == "cnn" and spec.hidden == [128] and spec.dropout == 0.2
    assert not hasattr(spec, "train")


def test_specs_dump_only_their_family_fields_and_load_back():
    cfg = load_config(REPO_ROOT / "configs/mnist_kd.yaml", ["students.0.family=cnn", "students.0.channels=[4]"])
    dumped = cfg.model_dump(mode="json")
    assert dumped["teachers"][0]["family"] == "cnn" and "input_dropout" not in dumped["teachers"][0] and "kwargs" not in dumped["teachers"][0]
    assert dumped["students"][0]["channels"] == [4] and "input_dropout" not in dumped["students"][0]
    assert type(cfg).model_validate(dumped) == cfg  # a resolved config (distill config) loads back unchanged


def test_specs_logged_with_every_field_still_load():
    # MLflow models logged before dumps kept to the family's fields carry every field at its default.
    old = {"family": "mlp", "hidden": [16], "channels": [32, 64], "dropout": 0.0, "input_dropout": 0.0, "kwargs": {}, "weights": None}
    assert ModelSpec.from_record(old) == ModelSpec(family="mlp", hidden=[16])
    with pytest.raises(ValueError, match="channels: not used by family mlp"):
        ModelSpec.from_record({**old, "channels": [8]})  # a non-default stray field was never valid


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.kd.temperature = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["kd.temperature=0"], "kd.temperature: temperature must be a finite number > 0"),
        (["kd.temperature=-1"], "kd.temperature: temperature must be a finite number > 0"),
        (["kd.temperature=.nan"], "kd.temperature: temperature must be a finite number > 0"),
        (["kd.alpha=1.5"], "kd.alpha: alpha must be in [0, 1]"),
        (["kd.alpha=-0.1"], "kd.alpha: alpha must be in [0, 1]"),
        (["kd.temprature=2"], "kd.temprature: unknown key"),
        (["bogus=1"], "bogus: unknown key"),
        (["train.epochs=zero"], "train.epochs: Input should be a valid integer"),
        (["train.epochs=0"], "train.epochs: Input should be greater than or equal to 1"),
        (["teachers.0.prune_amount=1"], "teachers.0.prune_amount: Input should be less than 1"),
        (["train.batch_size=[1]"], "train.batch_size: Input should be a valid integer"),
        (["students.0.hidden=[0]"], "students.0.hidden: widths must be positive integers"),
        (["students.0.family=transformer"], "students.0.family: unknown model family 'transformer'"),
        (["students.0.channels=[4]"], "students.0: channels: not used by family mlp (it reads dropout, hidden, input_dropout, weights)"),
        (["students.0.kwargs={depth: 2}"], "students.0: kwargs: not used by family mlp"),
        (["students.0.channels=[32, 64]"], "students.0: channels: not used by family mlp"),  # given is an error, even at the cnn default
        (["students.0.family=torchvision:resnet18"], "students.0: hidden: not used by family torchvision (it reads kwargs, weights)"),
        (["students.0.loss=nope"], "students.0.loss: unknown loss 'nope'"),
        (["students.5.hidden=[1]"], "students.5: no list item '5' (the list has 1)"),
        (["students=[]"], "students: at least one student is needed"),
        (["teachers=[]"], "teachers: at least one teacher is needed"),
        (["dataset.val_fraction=1.0"], "dataset.val_fraction: Input should be less than 1"),
        (["soft_targets.encoding=int4"], "soft_targets.encoding: Input should be 'fp16', 'fp32' or 'topk'"),
        (["teachers.0.checkpoint=a.pt", "teachers.0.mlflow_model=runs:/x/model"], "teachers.0: give checkpoint or mlflow_model, not both"),
        (["sweep.space.paths={teachers.0.hidden: {grid: [[8]]}}"], "sweep.space.paths.teachers.0.hidden: only paths under kd., train., students., transfer.labels can be swept"),
        (["sweep.space.paths={train.weight_decy: {grid: [0.1]}}"], "sweep.space.paths.train.weight_decy: no such field"),
        (["sweep.space.paths={train.epochs: {uniform: [2, 5]}}"], "sweep.space.paths.train.epochs: 3.5: train.epochs: Input should be a valid integer"),
        (["sweep.space.paths={students.0.dropout: {grid: [0.1, 1.5]}}"], "sweep.space.paths.students.0.dropout: 1.5: students.0.dropout: Input should be less than 1"),
        (["sweep.space.paths={kd.alpha: {grid: [0.5]}}"], "sweep.space.paths.kd.alpha: sweep it as sweep.space.alpha"),
        (["kd.temperature"], "override 'kd.temperature': expected key=value"),
        (["kd..alpha=1"], "override 'kd..alpha=1': empty key"),
        (["kd.alpha=[1"], "override kd.alpha: value is not valid YAML"),
        (["kd.alpha.x=1"], "kd.alpha: Input should be a valid number"),  # kd.alpha is unset: the override builds a mapping there
    ],
)
def test_bad_values_give_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO_ROOT / "configs/mnist_kd.yaml", overrides)
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_duplicate_student_names_rejected():
    with pytest.raises(ConfigError, match="students: names must be unique"):
        load_config(None, ["students=[{name: a}, {name: a}]"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kd: [1, 2\n", "is not valid YAML"),
        ("- a\n- b\n", "top level must be a mapping, got list"),
        ("kd:\n  temperature: hot\n", "kd.temperature: Input should be a valid number"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_an_empty_file_is_refused_not_run_on_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="the config file is empty"):
        load_config(path)
    path.write_text("{}\n")  # an explicit empty mapping is a choice: every default, named after the file
    assert load_config(path).name == "empty"


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["soft_targets.cache_dir=cache", "train.storage_path=runs", "teachers.0.checkpoint=t.pt", "dataset.root=~/data"])
    assert cfg.soft_targets.cache_dir == str(tmp_path / "cache")
    assert cfg.train.storage_path == str(tmp_path / "runs")
    assert cfg.teachers[0].checkpoint == str(tmp_path / "t.pt")
    assert cfg.dataset.root == str(Path("~/data").expanduser())
    assert load_config(None, ["train.storage_path=s3://bucket/runs"]).train.storage_path == "s3://bucket/runs"


def test_workers_reading_the_cache_need_their_shard_in_memory():
    assert load_config(None, ["soft_targets.worker_reads=cache"]).soft_targets.worker_reads == "cache"
    with pytest.raises(ConfigError, match=r"soft_targets.worker_reads: cache needs train.cache_shard_in_memory true"):
        load_config(None, ["soft_targets.worker_reads=cache", "train.cache_shard_in_memory=false"])
