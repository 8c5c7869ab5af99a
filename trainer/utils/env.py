"""The operator's switches that the training service and the predictor share, and the folder they work in.

They are read from the environment (the operator's), never from a request.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Lets API requests name local files (training sources, LoRA zips). Off: the server faces remote callers.
ENV_ALLOW_LOCAL = "TRAINER_ALLOW_LOCAL_SOURCES"
#: Where jobs run and outputs wait for delivery.
ENV_WORK_DIR = "TRAINER_WORK_DIR"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def work_root() -> Path:
    configured = os.environ.get(ENV_WORK_DIR)
    return Path(configured).expanduser() if configured else Path(tempfile.gettempdir()) / "sd-lora-trainer"
