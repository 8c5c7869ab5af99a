"""One optimisation step, in named pieces: draw the step's inputs, predict, add up the loss, step the optimisers.

The randomness of a step is drawn for the whole global batch from generators seeded by (seed, micro-step), so it
does not depend on how the run got there (resume-exact) nor on the number of processes. The loss is returned as a
device tensor: nothing here synchronises with the device.
"""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass

import torch

from trainer.data.dataset import Batch
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
from trainer.training.optimizers import GroupName
from trainer.training.schedule import Phase
from trainer.training.session import Session

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """This process's share of one micro-batch, noised."""

    batch: Batch
    texts: list[str]
    latents: torch.Tensor
    masks: torch.Tensor | None
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


@dataclass
class Prediction:
    model_pred: torch.Tensor
    prompt_embeds: torch.Tensor
    token_mask: torch.Tensor | None
    """Where the new tokens sit in the prompts (only when a loss term needs it)."""


def step_seed(seed: int, micro_step: int) -> int:
    # Counter-based seeding: the randomness of a step does not depend on how the run got there (resume-exact).
    return (seed * 1_000_003 + micro_step * 7_919 + 12_345) % (2**63 - 1)


# ============================================================================================== phases
def apply_phase(session: Session, phase: Phase) -> None:
    """Set which parameters take gradients, and the text encoders' train/eval mode."""
    if session.tokens is not None:
        session.tokens.requires_grad_(phase.ti)
    for group in session.groups:
        if group.name in (GroupName.UNET, GroupName.TEXT_ENCODER_LORA):
            for p in group.params:
                p.requires_grad_(phase.trains(group.name))
    for encoder in session.models.text_encoders:
        encoder.train(phase.text_trains)
    session.models.unet.train(True)


def enter_phase(session: Session, phase: Phase, step: int) -> None:
    """Switch which parts train; cache text-encoder outputs once the text side is frozen for good."""
    apply_phase(session, phase)
    config = session.config
    if config.cache_text_encoder_outputs and not session.text.cached and session.schedule.text_frozen_from(step):
        session.text.build_cache([*session.captions, session.dropout_caption], session.device.autocast)
        logger.info("text side frozen from step %d: text-encoder outputs cached", step)
        if config.offload_idle_modules:
            session.offload_idle(True)


# ============================================================================================== the loss
def draw_inputs(session: Session, batch: Batch, micro_step: int) -> StepInputs:
    """Captions (with dropout), latents, noise and timesteps of this process's share of the global ``batch``."""
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
    generator = device.generator(step_seed(session.seed, micro_step))
    global_shape = (len(batch.indices), *latents.shape[1:])
    noise = torch.randn(global_shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noise = offset_noise(noise, config.noise_offset, generator)[share]
    n_train = session.noise.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, n_train, (global_shape[0],), generator=generator, device=latents.device)[share]
    noisy = session.noise.scheduler.add_noise(latents, noise, timesteps)
    target = target_for(session.noise.prediction_type, latents, noise, timesteps, session.noise.scheduler)
    return StepInputs(local, texts, latents, masks, noisy, timesteps, target)


def predict(session: Session, inputs: StepInputs, phase: Phase) -> Prediction:
    """Encode the captions (or read the cache) and run the UNet, under autocast; arms the probe when installed."""
    device, batch = session.device, inputs.batch
    with device.autocast():
        with torch.set_grad_enabled(phase.text_trains):
            prompt_embeds, pooled = session.text.encode(inputs.texts)
        kwargs = {}
        if session.time_ids is not None:  # SDXL's size and crop conditioning
            time_ids = session.time_ids[batch.indices, [int(f) for f in batch.flips]]
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        token_mask = None
        if session.tokens is not None and (session.probe is not None or session.config.tok_cond_reg_w > 0):
            token_mask = session.tokens.new_token_mask(session.text.token_ids(inputs.texts)[0])
        if session.probe is not None and token_mask is not None:
            session.probe.reset(token_mask)
        noisy = inputs.noisy.to(memory_format=torch.channels_last) if device.prefers_channels_last else inputs.noisy
        model_pred = session.models.unet(noisy, inputs.timesteps, encoder_hidden_states=prompt_embeds, **kwargs).sample
    return Prediction(model_pred, prompt_embeds, token_mask)


def denoising_term(session: Session, inputs: StepInputs, prediction: Prediction) -> torch.Tensor:
    """The (masked, Min-SNR weighted) denoising loss."""
    weights = None
    if session.config.snr_gamma:
        weights = min_snr_weights(snr(session.noise.scheduler.alphas_cumprod, inputs.timesteps),
                                  session.config.snr_gamma, session.noise.prediction_type)
    return denoising_loss(prediction.model_pred, inputs.target, mask=inputs.masks, weights=weights)


def add_regularisers(session: Session, loss: torch.Tensor, inputs: StepInputs, prediction: Prediction,
                     phase: Phase) -> torch.Tensor:
    """``loss`` plus every regulariser whose weight is non-zero and whose part trains in ``phase``."""
    config = session.config
    if config.l1_penalty > 0 and session.adapters.unet_lora and phase.unet:
        # The value joins the logged loss; its gradient is added in optimizer_step (see add_l1_gradient).
        with torch.no_grad():
            penalty = config.l1_penalty * lora_l1(session.adapters.unet_lora)
        loss = loss + penalty
    if session.cov_stats and session.tokens is not None and phase.ti:
        for (mean, inverse), parameter in zip(session.cov_stats, session.tokens.parameters(), strict=True):
            loss = loss + config.tok_cov_reg_w * token_covariance_loss(parameter, mean, inverse)
    if config.cond_reg_w > 0 and phase.text_trains:
        loss = loss + config.cond_reg_w * conditioning_loss(prediction.prompt_embeds)
    if config.tok_cond_reg_w > 0 and phase.text_trains and prediction.token_mask is not None:
        loss = loss + config.tok_cond_reg_w * conditioning_loss(prediction.prompt_embeds, prediction.token_mask)
    if session.probe is not None:
        loss = loss + config.token_attention_loss_w * session.probe.loss(inputs.masks)
    return loss


def compute_loss(session: Session, batch: Batch, micro_step: int, phase: Phase) -> torch.Tensor:
    """The loss of this process's share of the global ``batch`` of ``micro_step``."""
    inputs = draw_inputs(session, batch, micro_step)
    prediction = predict(session, inputs, phase)
    return add_regularisers(session, denoising_term(session, inputs, prediction), inputs, prediction, phase)


# ============================================================================================== the update
def optimizer_step(session: Session, phase: Phase) -> None:
    """Average gradients over processes, add the L1 gradient, clip, step the training groups' optimisers; every
    group's learning-rate schedule advances."""
    session.dist.average_gradients([p for g in session.groups if phase.trains(g.name) for p in g.params])
    if session.config.l1_penalty > 0 and phase.unet and session.adapters.unet_lora:
        add_l1_gradient(session.adapters.unet_lora, session.config.l1_penalty)
    for group in session.groups:
        if phase.trains(group.name):
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


def train_step(session: Session, step: int, phase: Phase) -> torch.Tensor:
    """One optimisation step (all micro-batches); returns the mean loss as a device tensor (no synchronisation)."""
    accum = session.config.gradient_accumulation_steps
    step_loss: torch.Tensor | None = None
    for micro in range(accum):
        micro_step = step * accum + micro
        loss = compute_loss(session, session.plan.batch(micro_step), micro_step, phase)
        (loss / accum).backward()
        if session.probe is not None:
            session.probe.disarm()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    optimizer_step(session, phase)
    assert step_loss is not None  # gradient_accumulation_steps >= 1
    return session.dist.average(step_loss / accum)
