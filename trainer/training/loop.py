"""The training run, top to bottom: set up, loop, checkpoint, export.

One step: pick the batch (fixed by seed and step), draw noise and timesteps from a generator seeded by (seed, step),
encode the captions (or read the cache once the text side is frozen), predict, weight the loss, step the optimisers
of the groups that train at this step. The loss is read back from the device only every ``logging_steps`` steps.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.config import TrainingConfig
from trainer.data.dataset import Batch
from trainer.data.manifest import PreparedDataset
from trainer.training import checkpoint as ckpt
from trainer.training.errors import TrainingCancelled, TrainingDiverged
from trainer.training.losses import (
    add_l1_gradient,
    conditioning_loss,
    denoising_loss,
    lora_l1,
    min_snr_weights,
    offset_noise,
    snr,
    target_for,
    token_covariance_loss,
)
from trainer.training.outputs import LOSS_CSV, LOSS_PNG, build_zip, save_checkpoint
from trainer.training.schedule import Phase
from trainer.training.session import Session, offload_idle, restore, setup
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
        from trainer.utils.atomic import atomic_write_text

        text = "step,loss\n" + "".join(f"{s},{v:.6g}\n" for s, v in self.rows)
        atomic_write_text(self.path, text)

    def extend(self, rows: list[tuple[int, float]]) -> None:
        self.rows.extend(rows)
        with self.path.open("a") as handle:
            handle.writelines(f"{s},{v:.6g}\n" for s, v in rows)


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


def _step_seed(seed: int, micro_step: int) -> int:
    # Counter-based seeding: the randomness of a step does not depend on how the run got there (resume-exact).
    return (seed * 1_000_003 + micro_step * 7_919 + 12_345) % (2**63 - 1)


def _apply_phase(session: Session, phase: Phase) -> None:
    if session.tokens is not None:
        session.tokens.requires_grad_(phase.ti)
    for group in session.groups:
        if group.name == "unet":
            for p in group.params:
                p.requires_grad_(phase.unet)
        elif group.name == "te_lora":
            for p in group.params:
                p.requires_grad_(phase.te_lora)
    for encoder in session.models.text_encoders:
        encoder.train(phase.text_trains)
    session.models.unet.train(True)


def compute_loss(session: Session, batch: Batch, micro_step: int, phase: Phase) -> torch.Tensor:
    """The loss of this process's share of the global ``batch`` of ``micro_step``."""
    config, device = session.config, session.device
    # Randomness is drawn for the whole global batch and then sliced, so that every sample gets the same noise,
    # timestep and dropout whatever the number of processes.
    share = session.dist.rank_slice(len(batch.indices))
    dropout = random.Random(f"{session.seed}-dropout-{micro_step}")
    # Eden replaces a dropped caption by the trigger tokens alone (main.py), not by the empty prompt.
    texts = [session.dropout_caption if dropout.random() < config.caption_dropout else session.captions[i]
             for i in batch.indices][share]
    local = Batch(indices=batch.indices[share], flips=batch.flips[share], target_size=batch.target_size)
    latents, masks = session.latents.get(local)
    generator = device.generator(_step_seed(session.seed, micro_step))
    global_shape = (len(batch.indices), *latents.shape[1:])
    noise = torch.randn(global_shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noise = offset_noise(noise, config.noise_offset, generator)[share]
    n_train = session.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, n_train, (global_shape[0],), generator=generator, device=latents.device)[share]
    noisy = session.noise_scheduler.add_noise(latents, noise, timesteps)
    target = target_for(session.prediction_type, latents, noise, timesteps, session.noise_scheduler)
    batch = local

    with device.autocast():
        with torch.set_grad_enabled(phase.text_trains):
            prompt_embeds, pooled = session.text.encode(texts)
        kwargs = {}
        if session.models.is_sdxl:
            time_ids = session.time_ids[batch.indices, [int(f) for f in batch.flips]]
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        token_mask = None
        if session.probe is not None or config.tok_cond_reg_w > 0:
            token_mask = session.tokens.new_token_mask(session.text.token_ids(texts)[0])
        if session.probe is not None:
            session.probe.reset(token_mask)
        model_pred = session.models.unet(
            noisy.to(memory_format=torch.channels_last) if device.prefers_channels_last else noisy,
            timesteps, encoder_hidden_states=prompt_embeds, **kwargs,
        ).sample

    weights = None
    if config.snr_gamma:
        weights = min_snr_weights(snr(session.noise_scheduler.alphas_cumprod, timesteps), config.snr_gamma,
                                  session.prediction_type)
    loss = denoising_loss(model_pred, target, mask=masks, weights=weights)

    if config.l1_penalty > 0 and session.unet_lora_params and phase.unet:
        # The value joins the logged loss; its gradient is added in optimizer_step (see add_l1_gradient).
        with torch.no_grad():
            penalty = config.l1_penalty * lora_l1(session.unet_lora_params)
        loss = loss + penalty
    if session.cov_stats and phase.ti:
        for (mean, inverse), parameter in zip(session.cov_stats, session.tokens.parameters(), strict=True):
            loss = loss + config.tok_cov_reg_w * token_covariance_loss(parameter, mean, inverse)
    if config.cond_reg_w > 0 and phase.text_trains:
        loss = loss + config.cond_reg_w * conditioning_loss(prompt_embeds)
    if config.tok_cond_reg_w > 0 and phase.text_trains and token_mask is not None:
        loss = loss + config.tok_cond_reg_w * conditioning_loss(prompt_embeds, token_mask)
    if session.probe is not None:
        loss = loss + config.token_attention_loss_w * session.probe.loss(masks)
    return loss


def optimizer_step(session: Session, phase: Phase) -> None:
    active = {"unet": phase.unet, "ti": phase.ti, "te_lora": phase.te_lora}
    session.dist.average_gradients([p for g in session.groups if active[g.name] for p in g.params])
    if session.config.l1_penalty > 0 and phase.unet and session.unet_lora_params:
        add_l1_gradient(session.unet_lora_params, session.config.l1_penalty)
    for group in session.groups:
        if active[group.name]:
            if session.config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(group.params, session.config.max_grad_norm, foreach=True)
            group.optimizer.step()
            group.scheduler.step()
        else:
            # A frozen group's schedule still follows the global step; PyTorch warns about stepping a scheduler
            # whose optimiser has not stepped, which is intended here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                group.scheduler.step()
        group.optimizer.zero_grad(set_to_none=True)


def enter_phase(session: Session, phase: Phase, step: int) -> None:
    """Switch which parts train; cache text-encoder outputs once the text side is frozen for good."""
    _apply_phase(session, phase)
    config = session.config
    if config.cache_text_encoder_outputs and not session.text.cached and session.schedule.text_frozen_from(step):
        session.text.build_cache([*session.captions, session.dropout_caption], session.device.autocast)
        logger.info("text side frozen from step %d: text-encoder outputs cached", step)
        if config.offload_idle_modules:
            offload_idle(session, True)


def train_step(session: Session, step: int, phase: Phase) -> torch.Tensor:
    """One optimisation step (all micro-batches); returns the mean loss as a device tensor (no synchronisation)."""
    accum = session.config.gradient_accumulation_steps
    step_loss = None
    for micro in range(accum):
        micro_step = step * accum + micro
        loss = compute_loss(session, session.plan.batch(micro_step), micro_step, phase)
        (loss / accum).backward()
        if session.probe is not None:
            session.probe.disarm()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    optimizer_step(session, phase)
    return session.dist.average(step_loss / accum)


def run(session: Session, state: dict | None = None, *, should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None, make_zip: bool = True) -> RunResult:
    """The training loop over a prepared session (``state``: a checkpoint's training state to resume from)."""
    from tqdm.auto import tqdm

    config, dist = session.config, session.dist
    start_step = restore(session, state) if state else 0
    log = LossLog(session.run_dir, start_step) if dist.is_main else None

    started = time.perf_counter()
    session.latents.build_cache()
    session.timings["latent_cache_s"] = time.perf_counter() - started
    if config.offload_idle_modules:
        offload_idle(session, True)

    current: Phase | None = None
    if state is None and checkpoint_due(config, 0, session.total_steps):
        # Eden's first checkpoint, before any step: the untrained tokens and LoRA, and their samples as a baseline.
        save_checkpoint(session, 0, with_samples=True)
    existing = ckpt.list_checkpoints(session.run_dir)
    last_good = existing[-1][1] if existing else None
    # disable=None: a bar on a terminal, none in logs (cog's log stream gets on_progress lines instead).
    bar = tqdm(total=session.total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True,
               disable=None if dist.is_main else True)
    loop_start = time.perf_counter()
    last_loss: float | None = None
    pending: list[tuple[int, torch.Tensor]] = []
    try:
        for step in range(start_step, session.total_steps):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"training was cancelled at step {step}")
            phase = session.schedule.at(step)
            if not (phase.ti or phase.unet or phase.te_lora):
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
                values = torch.stack([v for _, v in pending]).float().cpu().tolist()
                flushed = [(s, v) for (s, _), v in zip(pending, values, strict=True)]
                pending = []
                if log is not None:
                    log.extend(flushed)
                for logged_step, value in flushed:
                    if not math.isfinite(value):
                        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved"
                        raise TrainingDiverged(
                            f"the loss became {value} at step {logged_step + 1}; {where}. Lower unet_lr / ti_lr, set "
                            "max_grad_norm, or use weight_type 'bf16' or 'fp32'."
                        )
                    last_loss = value
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

    final = save_checkpoint(session, session.total_steps, with_samples=True)
    zip_path = None
    if dist.is_main:
        plot_losses(log.rows, session.run_dir / LOSS_PNG)
        extras = {}
        if config.evaluate_checkpoints:
            from trainer.evaluate import evaluate_after_training

            extras = evaluate_after_training(session)
        if make_zip:
            zip_path = build_zip(session, final, extras)
        logger.info("done: %s", zip_path or final)
    dist.barrier()
    return RunResult(session.run_dir, final, zip_path, session.total_steps, config, session.timings)


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
