"""Loading and freeing the helper models of data preparation (captioners, CLIPSeg).

Each runs once, before training, then leaves the device: a captioner and the base model are never in device
memory together.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from trainer.config.schema import TrainingConfig
from trainer.data.errors import DataError
from trainer.device import DeviceInfo, resolve_dtype, select_device
from trainer.models.hub import fetch_requested, requested_key
from trainer.models.loading import model_cache_dir

T = TypeVar("T")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def aux_device(config: TrainingConfig) -> DeviceInfo:
    """The training device, in half precision where it has it (fp32 on CPU, where half precision is slow)."""
    device = select_device(config.device)
    if device.type == "cpu":
        return DeviceInfo(device=device, dtype=torch.float32)
    weight_type = config.weight_type if config.weight_type != "fp32" else "fp16"
    return DeviceInfo(device=device, dtype=resolve_dtype(device.type, weight_type))


def check_model_location(model_id: str, what: str, field: str) -> str:
    """A local folder or a hub id; anything else is refused before transformers gives a longer message.

    A hub id that a request named is fetched here, under the rules for requests (:mod:`trainer.models.hub`), and its
    folder in the model cache is returned: transformers then reads only what was fetched.
    """
    key = requested_key(model_id)
    if key is not None:
        return str(fetch_requested(model_id, key, model_cache_dir(), "transformers"))
    expanded = os.path.expanduser(model_id)
    if os.path.isdir(expanded):
        return expanded
    if _HUB_ID.match(model_id) and not model_id.startswith((".", "/")):
        return model_id
    raise DataError(f"{field}: the {what} model {model_id!r} is neither an existing folder nor a hub id (org/name)")


def load_pretrained(loader: Callable[..., T], model_id: str, what: str, field: str, **kwargs: Any) -> T:
    """``loader(model_id, **kwargs)`` with failures (missing files, offline hub) turned into one clear message."""
    try:
        return loader(model_id, **kwargs)
    # A wrong folder (another model's files) fails inside transformers in many ways; all mean "not this model".
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise DataError(
            f"could not load the {what} model from {model_id!r} ({first_line}); set {field} to a local folder, or "
            "check the network and the Hugging Face cache"
        ) from None


def release(device: DeviceInfo) -> None:
    """Return freed model memory to the device (call after dropping the last reference)."""
    gc.collect()
    device.empty_cache()
