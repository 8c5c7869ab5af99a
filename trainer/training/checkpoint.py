"""Checkpoints: when they are due, writing them (the exported files, the samples and everything needed to resume
exactly), finding them and resuming from them.

A checkpoint folder is written under a temporary name and renamed when complete, so a crash or a cancel never
leaves a half-written checkpoint that a resume could pick up.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.adapters import lora as lora_adapters
from trainer.config.schema import TrainingConfig
from trainer.device import cpu_rng_state, set_cpu_rng_state
from trainer.training.errors import TrainingDiverged
from trainer.training.outputs import export_files, render_samples
from trainer.utils.atomic import atomic_dir, remove_partials

if TYPE_CHECKING:  # the session module imports this one (to resume)
    from trainer.training.session import Session

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
#: The resumable state in a checkpoint folder; it stays in the run folder (the zip holds what users load).
STATE_FILE = "training_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")
#: Eden saves no intermediate checkpoint this close to the end (main.py: ``global_step < max_train_steps - 25``).
EDEN_CHECKPOINT_MARGIN = 25


def checkpoint_due(config: TrainingConfig, done: int, total: int) -> bool:
    """Whether an intermediate checkpoint is saved after ``done`` steps (``done == 0``: before training).

    ``eden``: Eden's rule (main.py), checkpoints at 0, N, 2N, ... that lie more than 25 steps before the end, with
    ``checkpointing_steps`` below 1 meaning ``max_train_steps`` (trainer/config.py). ``every``: every N steps
    before the end, none at step 0. The final checkpoint is always saved, by the caller.
    """
    every = config.checkpointing_steps
    if config.checkpoint_rule == "eden":
        every = every if every >= 1 else total
        return done % every == 0 and done < total - EDEN_CHECKPOINT_MARGIN
    return every >= 1 and done > 0 and done % every == 0 and done < total


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


# ============================================================================================== a session's
def save_checkpoint(session: Session, step: int, with_samples: bool) -> Path:
    """Write checkpoint ``step`` of the session (the main process writes; the others wait for it)."""
    if not session.dist.is_main:
        session.dist.barrier()
        return checkpoint_dir(session.run_dir, step)

    def write_files(folder: Path) -> None:
        _check_finite_parameters(session, step)
        export_files(session, folder)
        if with_samples:
            render_samples(session, folder, step)

    try:
        return write_checkpoint(session.run_dir, step, write_files, training_state(session, step),
                                session.config.max_checkpoints, protect={session.total_steps})
    finally:
        session.dist.barrier()


def training_state(session: Session, next_step: int) -> dict:
    """Everything a resume needs that the exported files do not hold exactly: optimiser and scheduler states, the
    trainable weights in fp32, and the random states."""
    return {
        "step": next_step,
        "seed": session.seed,
        "total_steps": session.total_steps,
        "groups": {
            str(g.name): {"optimizer": g.optimizer.state_dict(), "scheduler": g.scheduler.state_dict()}
            for g in session.groups
        },
        "unet_lora": lora_adapters.lora_state_dict(session.models.unet) if session.config.is_lora else None,
        "unet_full": None if session.config.is_lora else {
            k: v.detach().cpu() for k, v in session.models.unet.state_dict().items()
        },
        "te_lora": (
            [lora_adapters.lora_state_dict(e) for e in session.models.text_encoders] if session.te_lora else None
        ),
        "token_rows": session.tokens.rows() if session.tokens else None,
        "rng": {"cpu": cpu_rng_state(), "device": session.device.rng_state()},
    }


def restore(session: Session, state: dict) -> int:
    """Load a checkpoint's training state into the session; returns the step to continue from."""
    if state["total_steps"] != session.total_steps:
        raise ValueError(
            f"the checkpoint was made for a run of {state['total_steps']} steps but this configuration gives "
            f"{session.total_steps}; resume with the same max_train_steps / num_train_epochs and data"
        )
    if state["unet_lora"] is not None:
        lora_adapters.load_lora_state_dict(session.models.unet, state["unet_lora"])
    if state["unet_full"] is not None:
        session.models.unet.load_state_dict(state["unet_full"])
    if state["te_lora"] is not None:
        for encoder, te_state in zip(session.models.text_encoders, state["te_lora"], strict=True):
            lora_adapters.load_lora_state_dict(encoder, te_state)
    if state["token_rows"] is not None and session.tokens is not None:
        session.tokens.load_rows(state["token_rows"])
    for group in session.groups:
        saved = state["groups"].get(str(group.name))
        if saved is None:
            raise ValueError(f"the checkpoint has no state for the {group.name} optimiser: the settings differ")
        group.optimizer.load_state_dict(saved["optimizer"])
        group.scheduler.load_state_dict(saved["scheduler"])
    set_cpu_rng_state(state["rng"]["cpu"])
    session.device.set_rng_state(state["rng"]["device"])
    logger.info("resumed at step %d of %d", state["step"], session.total_steps)
    return state["step"]


def _check_finite_parameters(session: Session, step: int) -> None:
    params: list[torch.Tensor] = [p for g in session.groups for p in g.params]
    norms = torch._foreach_norm(params)
    if not torch.isfinite(torch.stack(norms)).all():
        raise TrainingDiverged(
            f"weights became NaN or infinite before step {step}; no checkpoint was written for it. "
            "Lower unet_lr / ti_lr, set max_grad_norm, or use weight_type 'bf16' or 'fp32'."
        )


# ============================================================================================== resuming
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
