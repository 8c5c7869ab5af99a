"""What both cog entry points share: cog's input placeholders, the operator's switches, the work folder."""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: Lets API requests name local files (training sources, LoRA zips). Off: the server faces remote callers.
ENV_ALLOW_LOCAL = "TRAINER_ALLOW_LOCAL_SOURCES"
#: Where jobs run and outputs wait for delivery.
ENV_WORK_DIR = "TRAINER_WORK_DIR"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def work_root() -> Path:
    configured = os.environ.get(ENV_WORK_DIR)
    return Path(configured).expanduser() if configured else Path(tempfile.gettempdir()) / "sd-lora-trainer"


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
