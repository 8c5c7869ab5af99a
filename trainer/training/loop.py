"""The training run, top to bottom: set up, loop, checkpoint, export.

One step: pick the batch (fixed by seed and step), draw noise and timesteps from a generator seeded by (seed, step),
encode the captions (or read the cache once the text side is frozen), predict, weight the loss, step the optimisers
of the groups that train at this step. The loss is read back from the device only every ``logging_steps`` steps.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.config.schema import TrainingConfig
from trainer.data.manifest import PreparedDataset
from trainer.evaluate.recommended import EVALUATION_DIR
from trainer.evaluate.runner import evaluate_run
from trainer.evaluate.settings import EvaluationSettings
from trainer.training.checkpoint import STATE_FILE, checkpoint_due, list_checkpoints, restore, save_checkpoint
from trainer.training.errors import TrainingCancelled, TrainingDiverged
from trainer.training.outputs import LOSS_CSV, LOSS_PNG, build_zip
from trainer.training.resolved import ResolvedRun
from trainer.training.schedule import Phase
from trainer.training.session import Session, setup
from trainer.training.step import enter_phase, optimizer_step, train_step
from trainer.utils.atomic import atomic_write_text
from trainer.utils.plot import plot_losses

logger = logging.getLogger(__name__)


@dataclass
class ProgressEvent:
    step: int
    total: int
    loss: float | None
    elapsed: float
    steps_per_second: float

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total)

    @property
    def eta_seconds(self) -> float | None:
        if self.steps_per_second <= 0:
            return None
        return (self.total - self.step) / self.steps_per_second


@dataclass
class RunResult:
    run_dir: Path
    final_checkpoint: Path
    zip_path: Path | None
    steps: int
    config: TrainingConfig
    run: ResolvedRun
    timings: dict[str, float] = field(default_factory=dict)


class LossLog:
    """``loss.csv``: one row per step, appended at each read-back (and truncated to the resume step)."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / LOSS_CSV
        self.rows: list[tuple[int, float]] = []
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                reader = csv.reader(handle)
                next(reader, None)
                self.rows = [(int(s), float(v)) for s, v in reader if int(s) < resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        text = "step,loss\n" + "".join(f"{s},{v:.6g}\n" for s, v in self.rows)
        atomic_write_text(self.path, text)

    def extend(self, rows: list[tuple[int, float]]) -> None:
        self.rows.extend(rows)
        with self.path.open("a") as handle:
            handle.writelines(f"{s},{v:.6g}\n" for s, v in rows)


def run(session: Session, state: dict | None = None, *, should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None, make_zip: bool = True) -> RunResult:
    """The training loop over a prepared session (``state``: a checkpoint's training state to resume from)."""
    config, dist = session.config, session.dist
    start_step = start_training(session, state)
    log = LossLog(session.run_dir, start_step) if dist.is_main else None
    existing = list_checkpoints(session.run_dir)
    last_good = existing[-1][1] if existing else None
    # disable=None: a bar on a terminal, none in logs (cog's log stream gets on_progress lines instead).
    bar = tqdm(total=session.total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True,
               disable=None if dist.is_main else True)
    loop_start = time.perf_counter()
    current: Phase | None = None
    last_loss: float | None = None
    pending: list[tuple[int, torch.Tensor]] = []
    try:
        for step in range(start_step, session.total_steps):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"training was cancelled at step {step}")
            phase = session.schedule.at(step)
            if not phase.anything_trains:
                # Nothing trains in this stretch (for example after the UNet froze and the tokens pivoted): the
                # schedules still advance so that a resumed run lines up.
                optimizer_step(session, phase)
                continue
            if phase != current:
                enter_phase(session, phase, step)
                current = phase
            pending.append((step, train_step(session, step, phase)))

            done = step + 1
            due = checkpoint_due(config, done, session.total_steps)
            if done % config.logging_steps == 0 or due or done == session.total_steps:
                # The only read-back of the loss: once per logging interval, all pending steps together.
                last_loss = read_back_losses(pending, log, last_good)
                pending = []
                elapsed = time.perf_counter() - loop_start
                rate = (done - start_step) / elapsed if elapsed > 0 else 0.0
                bar.set_postfix(loss=f"{last_loss:.4f}" if last_loss is not None else "-", refresh=False)
                bar.update(done - bar.n)
                if on_progress is not None and dist.is_main:
                    on_progress(ProgressEvent(done, session.total_steps, last_loss, elapsed, rate))
            if due:
                last_good = save_checkpoint(session, done, with_samples=True)
    finally:
        bar.close()
    session.timings["train_loop_s"] = time.perf_counter() - loop_start
    final, zip_path = finish(session, log, make_zip)
    return RunResult(session.run_dir, final, zip_path, session.total_steps, config, session.run, session.timings)


def start_training(session: Session, state: dict | None) -> int:
    """Restore a resumed run's state, cache the latents, and save Eden's step-0 checkpoint; returns the first step."""
    start_step = restore(session, state) if state else 0
    started = time.perf_counter()
    session.latents.build_cache()
    session.timings["latent_cache_s"] = time.perf_counter() - started
    if session.config.offload_idle_modules:
        session.offload_idle(True)
    if state is None and checkpoint_due(session.config, 0, session.total_steps):
        # Eden's first checkpoint, before any step: the untrained tokens and LoRA, and their samples as a baseline.
        save_checkpoint(session, 0, with_samples=True)
    return start_step


def read_back_losses(pending: list[tuple[int, torch.Tensor]], log: LossLog | None,
                     last_good: Path | None) -> float | None:
    """Read the pending steps' losses from the device in one transfer, log them, and stop the run on a NaN or an
    infinity; returns the last loss (None when nothing was pending)."""
    values = torch.stack([v for _, v in pending]).float().cpu().tolist()
    flushed = [(s, v) for (s, _), v in zip(pending, values, strict=True)]
    if log is not None:
        log.extend(flushed)
    last = None
    for logged_step, value in flushed:
        if not math.isfinite(value):
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved"
            raise TrainingDiverged(
                f"the loss became {value} at step {logged_step + 1}; {where}. Lower unet_lr / ti_lr, set "
                "max_grad_norm, or use weight_type 'bf16' or 'fp32'."
            )
        last = value
    return last


def finish(session: Session, log: LossLog | None, make_zip: bool) -> tuple[Path, Path | None]:
    """The final checkpoint, the loss plot, the evaluation (when asked) and the zip; returns the checkpoint and the
    zip (the main process builds it; the others get None)."""
    final = save_checkpoint(session, session.total_steps, with_samples=True)
    zip_path = None
    if log is not None:  # the main process
        plot_losses(log.rows, session.run_dir / LOSS_PNG)
        extras = evaluate_after_training(session) if session.config.evaluate_checkpoints else {}
        if make_zip:
            zip_path = build_zip(session, final, extras, leave_out=frozenset({STATE_FILE}))
        logger.info("done: %s", zip_path or final)
    session.dist.barrier()
    return final, zip_path


def train(config: TrainingConfig, *, run_dir: Path | None = None, dataset: PreparedDataset | None = None,
          should_stop: Callable[[], bool] | None = None, on_progress: Callable[[ProgressEvent], None] | None = None,
          allow_local_sources: bool = True, local_paths: bool = True, make_zip: bool = True) -> RunResult:
    """Run one training job end to end and return where its outputs are.

    ``allow_local_sources`` admits local training sources, ``local_paths`` local model files and folders: both are
    the operator's (the command line), and off for requests from the network unless the operator allows them.
    """
    wall_start = time.perf_counter()
    session, state = setup(config, run_dir=run_dir, dataset=dataset, allow_local_sources=allow_local_sources,
                           local_paths=local_paths)
    result = run(session, state, should_stop=should_stop, on_progress=on_progress, make_zip=make_zip)
    result.timings["total_s"] = time.perf_counter() - wall_start
    return result


def evaluate_after_training(session: Session) -> dict[str, Path]:
    """The end-of-training evaluation (``evaluate_checkpoints``): evaluate the run's checkpoints; returns the zip
    extras (``{"evaluation": folder}``).

    A failure is logged with its reason and leaves the run without an evaluation rather than without its zip: the
    trained LoRA matters more than its scores, and ``python -m trainer evaluate RUN`` can redo them.
    """
    config = session.config
    height, width = session.run.sample_size
    started = time.perf_counter()
    try:
        settings = EvaluationSettings.from_config(
            config, device=str(session.device.device), weight_type=config.weight_type,
            steps=config.validation_num_inference_steps, guidance=config.validation_guidance_scale,
            size=(width, height))
        result = evaluate_run(session.run_dir, settings, dataset=session.dataset)
    except Exception:
        logger.exception("checkpoint evaluation failed; the zip is built without it. Fix the cause and run "
                         "`python -m trainer evaluate %s`", session.run_dir)
        return {}
    finally:
        session.timings["evaluation_s"] = time.perf_counter() - started
        session.device.empty_cache()
    return {EVALUATION_DIR: result.folder}

