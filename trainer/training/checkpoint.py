"""Checkpoints: the exported files plus everything needed to resume exactly.

A checkpoint folder is written under a temporary name and renamed when complete, so a crash or a cancel never
leaves a half-written checkpoint that a resume could pick up.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.utils.atomic import atomic_dir, remove_partials

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "training_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"checkpoint-{step}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match[1]), entry))
    return sorted(found)


def write_checkpoint(run_dir: Path, step: int, write_files: Callable[[Path], None], state: dict[str, Any],
                     max_checkpoints: int | None, protect: set[int] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then prune the oldest beyond ``max_checkpoints``."""
    target = checkpoint_dir(run_dir, step)
    remove_partials(target.parent)
    with atomic_dir(target) as tmp:
        write_files(tmp)
        torch.save(state, tmp / STATE_FILE)
    logger.info("saved checkpoint %s", target)
    if max_checkpoints is not None:
        existing = [item for item in list_checkpoints(run_dir) if item[0] not in (protect or set())]
        for old_step, old_dir in existing[: max(0, len(existing) - max_checkpoints)]:
            if old_step != step:
                shutil.rmtree(old_dir, ignore_errors=True)
                logger.info("removed old checkpoint %s (max_checkpoints=%d)", old_dir.name, max_checkpoints)
    return target


def resolve_resume(resume_from: str) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(resume_from).expanduser()
    if not path.exists():
        raise ValueError(f"resume_from {resume_from!r} does not exist")
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir() and _NAME.match(path.name):
        raise ValueError(f"resume_from {resume_from!r} is an incomplete checkpoint ({STATE_FILE} is missing)")
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise ValueError(
            f"resume_from {resume_from!r} is neither a checkpoint folder nor a run folder with checkpoints"
        )
    return checkpoints[-1][1]


def load_state(checkpoint: Path) -> dict[str, Any]:
    # Our own files hold optimiser states and RNG states (numpy and Python objects), so weights_only cannot be used.
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent
