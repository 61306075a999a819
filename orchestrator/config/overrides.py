"""`a.b.0.c=value` overrides on a config tree (a dict), and pydantic errors as one line."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import ConfigError


def field_exists(tree: Any, parts: list[str]) -> bool:
    """Whether a dotted path names something already in a dumped config (a sweep must not invent keys)."""
    node = tree
    for part in parts:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    # Whole-config checks name their field inside the message already.
    return f"{where}: {message}" if where else message


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (['a', 'b', '0', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{where}: cannot set a key inside a {type(node).__name__}")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path))] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{'.'.join(path)}: cannot set a key inside a {type(node).__name__}")


def _list_index(items: list, part: str, where: str) -> int:
    if not part.lstrip("-").isdigit() or not (0 <= int(part) < len(items)):
        raise ConfigError(f"{where}: no list item {part!r} (the list has {len(items)})")
    return int(part)
