"""The README's parameter table, generated from the config's field docstrings so that it cannot drift."""

from __future__ import annotations

import json
import typing

from pydantic_core import PydanticUndefined

from trainer.config.schema import TrainingConfig


def _type_name(annotation) -> str:
    text = str(annotation)
    for old, new in (("typing.", ""), ("Optional[", "Optional["), ("NoneType", "None"), ("<class '", ""), ("'>", "")):
        text = text.replace(old, new)
    return text


def _default(field) -> str:
    if field.default_factory is not None:
        return json.dumps(field.default_factory())
    if field.default is PydanticUndefined:
        return "required"
    return json.dumps(field.default)


def parameter_table() -> str:
    hints = typing.get_type_hints(TrainingConfig)
    lines = ["| Parameter | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in TrainingConfig.model_fields.items():
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        type_name = _type_name(hints[name]).replace("|", "\\|")
        lines.append(f"| `{name}` | `{type_name}` | `{_default(field)}` | {description} |")
    return "\n".join(lines)
