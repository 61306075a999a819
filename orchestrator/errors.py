"""The errors the CLI turns into one line: imported by every layer, importing nothing of ours."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration or input, reported as one line (exit code 2 in the CLI)."""


class DataNotFoundError(ConfigError):
    """The dataset's files are not on this machine; the message names the install step."""


class RayStartError(RuntimeError):
    """The local Ray did not come up (overloaded machine, port taken): the CLI reports one line, exit 1."""
