"""docs/configuration.md, generated from the schema: every key, its default and its description.

    python -m orchestrator.config_doc            # rewrite docs/configuration.md
    python -m orchestrator.config_doc --check    # exit 1 when it differs from what the schema says (run by the tests)

The descriptions are the `Field(description=...)` of orchestrator/config/ and orchestrator/losses/terms.py, so the reference cannot
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

Generated from the schema (`orchestrator/config/`) by `python -m orchestrator.config_doc`; do not edit by hand.

One YAML file per job (`configs/*.yaml`). Every key has a default; unknown keys and bad values are refused
with one line naming the key (exit 2, before Ray starts). On the command line, `a.b.0.c=value` overrides a
key (the value is parsed as YAML): `distill run configs/mnist_kd.yaml kd.temperature=8 students.0.hidden=[64]`.
`distill config CONFIG [overrides]` prints the resolved configuration, which is also logged to the job's
MLflow parent run (params and `config.json`).
"""


def _models_of(annotation) -> tuple[list[type[BaseModel]], bool]:
    """(the BaseModels inside an annotation: several for a union of them, whether it is a list of them)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_of(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found: list[type[BaseModel]] = []
        many = False
        for arg in typing.get_args(annotation):
            models, arg_many = _models_of(arg)
            found += models
            many = many or (arg_many and bool(models))
        return found, many
    if origin is list:
        models, _ = _models_of(typing.get_args(annotation)[0])
        return models, bool(models)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation], False
    return [], False


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


def _sections(model: type[BaseModel], prefix: str, out: list[tuple[str, type[BaseModel], list[tuple[str, str, str]]]],
              title: str | None = None) -> None:
    rows, nested = [], []
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] != "name")  # a union's tag first
    for name, field in fields:
        key = f"{prefix}{name}"
        subs, many = _models_of(field.annotation)
        for sub in subs:
            # a union discriminated on `name` (the loss terms): one section per member, titled by its tag
            tag = sub.model_fields["name"].default if len(subs) > 1 and "name" in sub.model_fields else None
            sub_prefix = f"{key}[]." if many else f"{key}."
            nested.append((sub_prefix, sub, sub_prefix.rstrip(".") + (f" (name: {tag})" if tag else "")))
        rows.append((f"`{key}{'[]' if many else ''}`", _default(field), field.description or ""))
    out.append((title or prefix.rstrip(".") or "job", model, rows))
    for sub_prefix, sub, sub_title in nested:
        _sections(sub, sub_prefix, out, sub_title)


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
