"""Loading a job's config: YAML file + overrides -> a validated JobConfig, path fields checked and made absolute."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from orchestrator.config.job import JobConfig
from orchestrator.config.overrides import apply_override, format_error, parse_override
from orchestrator.errors import ConfigError


def _materialize_lists(tree: dict) -> dict:
    """Overrides like `students.0.hidden=...` need the default list present to index into."""
    defaults = JobConfig().model_dump()
    for key in ("teachers", "students"):
        if key not in tree:
            tree[key] = defaults[key]
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read YAML (or start from defaults), apply `a.b=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read ({type(exc).__name__}: {exc.strerror if isinstance(exc, OSError) else 'not text'})") from None
        if loaded is None:
            # An empty file is a mistake (a truncated copy, the wrong path), not a request for every default.
            raise ConfigError(f"{path}: the config file is empty (to run on the defaults, give no config)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
        tree.setdefault("name", path.stem)
    if overrides:
        tree = _materialize_lists(tree)
        for text in overrides:
            keys, value = parse_override(text)
            apply_override(tree, keys, value)
    cfg = validate_config(tree)
    check_paths(cfg)
    return absolute_paths(cfg, Path.cwd())


# (field, what it must be): folders are created when missing, files must exist (checked where they are read);
# "data" is a parquet file or a folder of them, which must exist.
_PATH_FIELDS = (("dataset.root", "folder"), ("dataset.train_path", "data"), ("dataset.test_path", "data"), ("soft_targets.cache_dir", "folder"),
                ("train.storage_path", "folder"))


def check_paths(cfg: JobConfig) -> None:
    """Every path field, before anything runs: not empty, and not the wrong kind of thing (a file where a folder
    belongs, or the other way round), and readable. One line naming the field (ConfigError)."""
    values = [(field, kind, _get(cfg, field)) for field, kind in _PATH_FIELDS]
    for group in ("teachers", "students"):
        for i, model in enumerate(getattr(cfg, group)):
            values.append((f"{group}.{i}.weights", "file", model.weights))
    for i, teacher in enumerate(cfg.teachers):
        values.append((f"teachers.{i}.checkpoint", "file", teacher.checkpoint))
    for field, kind, value in values:
        if value is None or "://" in str(value):
            continue
        if not str(value).strip():
            raise ConfigError(f"{field}: empty path")
        path = Path(value).expanduser()
        if kind == "data" and not path.exists():
            raise ConfigError(f"{field}: {path} does not exist")
        if kind == "folder" and path.exists() and not path.is_dir():
            raise ConfigError(f"{field}: {path} is a file, not a folder")
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{field}: {path} is a folder, not a file")
        if path.exists() and not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise ConfigError(f"{field}: {path} cannot be read (permissions)")


def _get(cfg: JobConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None or "://" in path:  # URIs (s3://, gs://, runs:/...) are not local paths
        return path
    return str((base / Path(path).expanduser()).resolve())


def absolute_paths(cfg: JobConfig, base: Path) -> JobConfig:
    """Paths in a config are relative to where the command runs. Resolve them once, in the driver:
    Ray workers and Tune trials run in other directories."""
    tree = cfg.model_dump()
    for field in ("root", "train_path", "test_path"):
        tree["dataset"][field] = _absolute(tree["dataset"][field], base)
    tree["soft_targets"]["cache_dir"] = _absolute(tree["soft_targets"]["cache_dir"], base)
    tree["train"]["storage_path"] = _absolute(tree["train"]["storage_path"], base)
    for model in tree["teachers"] + tree["students"]:
        model["weights"] = _absolute(model["weights"], base)
    for teacher in tree["teachers"]:
        teacher["checkpoint"] = _absolute(teacher["checkpoint"], base)
    return JobConfig.model_validate(tree)


def validate_config(tree: dict) -> JobConfig:
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_error(err)) from None
