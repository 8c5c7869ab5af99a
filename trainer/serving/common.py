"""What both cog entry points share: cog's input placeholders and the defaults their signatures declare."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any


def _is_field_info(value: Any) -> bool:
    try:
        from cog.input import FieldInfo
    except ImportError:  # cog is pinned in every build; without it there are no FieldInfo values either
        return False
    return isinstance(value, FieldInfo)


def unwrap_inputs(values: Mapping[str, Any]) -> dict[str, Any]:
    """Replace cog ``Input(...)`` placeholders by their defaults.

    The cog server passes every argument; a direct call (a test, a notebook) leaves the others at their declared
    default, which is the ``FieldInfo`` object that ``Input()`` returns.
    """
    return {name: (value.default if _is_field_info(value) else value) for name, value in values.items()}


def declared_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The default of every parameter of a cog entry point (``Input(default=...)`` or a plain default)."""
    defaults = {}
    for name, parameter in inspect.signature(fn).parameters.items():
        if name == "self" or parameter.default is inspect.Parameter.empty:
            continue
        defaults[name] = parameter.default.default if _is_field_info(parameter.default) else parameter.default
    return defaults
