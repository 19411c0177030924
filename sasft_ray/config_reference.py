"""The config reference in Markdown, read from the schema itself (`sasft config --reference`, which writes
docs/config.md, checked by tests/unit/test_docs.py)."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sasft_ray import config
from sasft_ray.config import Config, Section


def section_of(annotation: Any) -> tuple[type[Section] | None, bool]:
    """The section class a field holds, and whether it holds a list of them."""
    def is_section(tp: Any) -> bool:
        return isinstance(tp, type) and issubclass(tp, Section)

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and is_section(args[0]):
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        return next((a for a in args if is_section(a)), None), False
    return (annotation, False) if is_section(annotation) else (None, False)


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: Any) -> list[str]:
    signs = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"),
             annotated_types.Le: ("≤", "le"), annotated_types.Lt: ("<", "lt"),
             annotated_types.MinLen: ("length ≥", "min_length")}
    return [f"{signs[type(m)][0]} {getattr(m, signs[type(m)][1])}" for m in field.metadata if type(m) in signs]


def as_yaml(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value == "":
        return '""'
    if isinstance(value, str) and "\n" in value:  # one line, as YAML reads it back: a table cell holds no newline
        return yaml.safe_dump(value, default_style='"', width=float("inf")).strip()
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip().removesuffix("\n...")


def cell(text: str) -> str:
    """Text that stays itself in a Markdown table: no column breaks, HTML tags or emphasis (outside code)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace("*", "\\*") for i, p in enumerate(parts))


def paragraph(text: str | None) -> str:
    """A docstring or description as sentences, one paragraph per blank-line-separated block."""
    blocks = [" ".join(block.split()) for block in inspect.cleandoc(text or "").split("\n\n")]
    return "\n\n".join(b[0].upper() + b[1:] + ("" if b[-1] in ".:;!?" else ".") for b in blocks if b)


def markdown() -> str:
    """The reference: one heading per section, then each key as a dotted path with its type, its default (the
    section's own: `serve.engine`'s differ from `selftalk.engine`'s) and its description."""
    out: list[str] = []

    def walk(model: type[Section], key: str, instance: BaseModel | None, title: str, intro: list[str],
             level: int) -> None:
        rows, subsections = [], []
        for name, field in model.model_fields.items():
            dotted = f"{key}.{name}" if key else name
            section, many = section_of(field.annotation)
            if field.is_required():
                default: Any = PydanticUndefined
            elif instance is not None:
                default = getattr(instance, name)
            else:
                default = field.get_default(call_default_factory=True)
            if section is not None:
                sub_key = f"{dotted}[]" if many else dotted
                sub_instance = default if isinstance(default, BaseModel) else None
                subsections.append((section, sub_key, sub_instance, field.description))
            kind = "list of sections" if many else type_name(field.annotation)
            shown = ("required" if default is PydanticUndefined
                     else "see below" if isinstance(default, BaseModel) else f"`{cell(as_yaml(default))}`")
            rows.append(f"| `{dotted}` | {cell(', '.join([kind, *bounds(field)]))} | {shown} | "
                        f"{cell(' '.join((field.description or '').split()))} |")
        out.extend(["", f"{'#' * level} {title}", ""])
        text = "\n\n".join(p for p in map(paragraph, intro) if p)
        if text:
            out.extend([text, ""])
        out.extend(["| key | type | default | description |", "| --- | --- | --- | --- |", *rows])
        for section, sub_key, sub_instance, description in subsections:
            own_doc = section.__dict__.get("__doc__")
            note = "A list; each item has the keys below." if sub_key.endswith("[]") else ""
            walk(section, sub_key, sub_instance, f"`{sub_key}`", [own_doc, description, note],
                 level + 1 if key else level)

    walk(Config, "", None, "Top level", [], 2)
    head = ["Generated from the schema in `sasft_ray/config.py` by `sasft config --reference > docs/config.md`: "
            "edit the schema, not this file.", "", "# Config reference", "", paragraph(config.__doc__), "",
            "Keys are dotted paths, as `--set` takes them (`--set selftalk.engine.max_num_seqs=64`); `[]` marks "
            "a list of sections, each item with the keys shown. Defaults are YAML; required keys have none."]
    return "\n".join(head + out) + "\n"
