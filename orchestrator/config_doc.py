"""docs/configuration.md, generated from the schema: every key, its default and its description.

    python -m orchestrator.config_doc            # rewrite docs/configuration.md
    python -m orchestrator.config_doc --check    # exit 1 when it differs from what the schema says (run by the tests)

The descriptions are the `Field(description=...)` of orchestrator/config.py, so the reference cannot
drift from the code: a new field without a description fails `tests/test_config_doc.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from orchestrator.config import JobConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = """# Configuration reference

Generated from the schema (`orchestrator/config.py`) by `python -m orchestrator.config_doc`; do not edit by hand.

One YAML file per job (`configs/*.yaml`). Every key has a default; unknown keys and bad values are refused
with one line naming the key (exit 2, before Ray starts). On the command line, `a.b.0.c=value` overrides a
key (the value is parsed as YAML): `distill run configs/mnist_kd.yaml kd.temperature=8 students.0.hidden=[64]`.
`distill config CONFIG [overrides]` prints the resolved configuration, which is also logged to the job's
MLflow parent run (params and `config.json`).
"""


def _model_of(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(the BaseModel inside an annotation, whether it is a list of them)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model, many = _model_of(arg)
            if model is not None:
                return model, many
        return None, False
    if origin is list:
        model, _ = _model_of(typing.get_args(annotation)[0])
        return model, model is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "see below"
    if value is None:
        return "unset"
    return f"`{json.dumps(value)}`"


def _sections(model: type[BaseModel], prefix: str, out: list[tuple[str, type[BaseModel], list[tuple[str, str, str]]]]) -> None:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub, many = _model_of(field.annotation)
        if sub is not None:
            nested.append((f"{key}[]." if many else f"{key}.", sub))
        rows.append((f"`{key}{'[]' if many else ''}`", _default(field), field.description or ""))
    out.append((prefix.rstrip(".") or "job", model, rows))
    for sub_prefix, sub in nested:
        _sections(sub, sub_prefix, out)


def reference_markdown() -> str:
    """The whole reference: one table per section of the config, in the schema's order."""
    sections: list = []
    _sections(JobConfig, "", sections)
    lines = [HEADER]
    for title, model, rows in sections:
        lines += [f"## {title}", ""]
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        if doc and not doc.startswith(("!!! abstract", "Usage docs")):
            lines += [doc, ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        lines += [f"| {key} | {default} | {meaning.replace('|', '/')} |" for key, default, meaning in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale; write nothing")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python -m orchestrator.config_doc", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
