"""Which parts train at which step (the pivot, the token warm-up, the UNet freeze) and Eden's learning-rate curves.

Eden's training loop (``main.py`` of edenartlab/sd-lora-trainer) measures the run's progress as
``completion_f = (epoch + step_in_epoch / batches_per_epoch) / num_train_epochs``, with the epochs derived from
``max_train_steps``; this module computes the same number per optimisation step and the rules that depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from trainer.config.schema import TrainingConfig
from trainer.training.optimizers import GroupName

#: Eden's exponents of the decaying learning rates (main.py): tokens (1 − f)^1.7, text-encoder LoRA (1 − f)^2.
EDEN_TI_DECAY = 1.7
EDEN_TE_DECAY = 2.0


@dataclass(frozen=True)
class Phase:
    """Which parts train at a step."""

    ti: bool
    unet: bool
    te_lora: bool

    def trains(self, group: GroupName) -> bool:
        return {GroupName.UNET: self.unet, GroupName.TOKENS: self.ti, GroupName.TEXT_ENCODER_LORA: self.te_lora}[group]

    @property
    def text_trains(self) -> bool:
        return self.ti or self.te_lora

    @property
    def anything_trains(self) -> bool:
        return self.ti or self.unet or self.te_lora


@dataclass(frozen=True)
class Progress:
    """Eden's ``completion_f`` of each optimisation step."""

    steps_per_epoch: int
    epochs: int

    @classmethod
    def of(cls, total: int, steps_per_epoch: int) -> Progress:
        steps_per_epoch = max(1, steps_per_epoch)
        return cls(steps_per_epoch, max(1, math.ceil(total / steps_per_epoch)))

    def completion(self, step: int) -> float:
        # The same float expression as Eden's, so that the freeze boundaries fall on the same steps.
        epoch, within = divmod(step, self.steps_per_epoch)
        return (epoch + within / self.steps_per_epoch) / self.epochs


@dataclass
class Schedule:
    total: int
    ti_end: int
    unet_start: int
    unet_end: int
    te_end: int
    progress: Progress
    unet_from_completion: float = 0.0
    """With Eden's curves the UNet optimiser steps from the start but at learning rate 0 until this completion."""

    @classmethod
    def from_config(cls, config: TrainingConfig, total: int, has_ti: bool, has_te_lora: bool,
                    steps_per_epoch: int | None = None) -> Schedule:
        progress = Progress.of(total, steps_per_epoch or total)
        eden = config.lr_scheduler == "eden"
        # The pivot: tokens train while completion_f <= freeze_ti_after_completion_f (Eden zeroes their rate once it
        # is exceeded). Eden applies it only to its own AdamW schedule: a Prodigy token optimiser runs to the end.
        if not has_ti:
            ti_end = 0
        elif eden and config.ti_optimizer == "prodigy":
            ti_end = total
        else:
            ti_end = sum(1 for s in range(total) if progress.completion(s) <= config.freeze_ti_after_completion_f)
        warmup = min(config.token_warmup_steps if has_ti else 0, total)
        # The UNet is frozen while completion_f < freeze_unet_before_completion_f and trains to the end after.
        # Eden keeps stepping its optimiser at rate 0 meanwhile (Adam's moments see those gradients), which the
        # eden curves reproduce; the other schedules leave it out of those steps.
        unet_f = config.freeze_unet_before_completion_f
        frozen_until = next((s for s in range(total) if progress.completion(s) >= unet_f), total)
        return cls(
            total=total,
            ti_end=ti_end,
            unet_start=warmup if eden else max(warmup, frozen_until),
            unet_end=total if frozen_until < total else warmup,
            te_end=total if has_te_lora else 0,
            progress=progress,
            unet_from_completion=config.freeze_unet_before_completion_f if eden else 0.0,
        )

    def at(self, step: int) -> Phase:
        return Phase(
            ti=step < self.ti_end,
            unet=self.unet_start <= step < self.unet_end,
            te_lora=self.unet_start <= step < self.te_end,
        )

    def text_frozen_from(self, step: int) -> bool:
        """True when nothing in the text side trains at ``step`` or later."""
        return step >= max(self.ti_end, self.te_end)


# ---------------------------------------------------------------------------------------- Eden's learning rates
def eden_cold_unet_lr(config: TrainingConfig) -> float:
    """The UNet's starting rate in Eden's main.py: low while the tokens learn, higher without them."""
    if not config.is_lora:
        return 1.0e-5
    return 2.0e-4 if config.disable_ti else 5.0e-5


def eden_unet_lr(config: TrainingConfig, total: int) -> Callable[[int], float]:
    """Eden's UNet rate: cold × (unet_lr / cold)^(step / unet_lr_warmup_steps), the warm-up being the whole run when
    not given (its config sets it to max_train_steps)."""
    cold = eden_cold_unet_lr(config)
    warmup = config.unet_lr_warmup_steps if config.unet_lr_warmup_steps is not None else total
    target = config.unet_lr

    def rate(step: int) -> float:
        if warmup <= 0:
            return target
        return cold * (target / cold) ** (step / warmup)

    return rate


def _linear_warmup(step: int, warmup: int) -> float:
    return min(step / warmup, 1.0) if warmup > 0 else 1.0


def eden_lr_lambda(name: GroupName, config: TrainingConfig, schedule: Schedule, optimizer_type: str,
                   base_lr: float) -> Callable[[int], float]:
    """The multiplier of an optimiser's initial rate ``base_lr`` that gives Eden's rate at each step."""
    progress = schedule.progress
    if name == GroupName.UNET:
        rate = eden_unet_lr(config, schedule.total)
        # Eden writes the rate into the optimiser whatever it is, Prodigy included (whose rate multiplies its own
        # estimate); the UNet's rate is 0 while it is frozen.
        return lambda step: (0.0 if progress.completion(step) < schedule.unet_from_completion
                             else rate(step) / base_lr)
    if name == GroupName.TOKENS:
        if optimizer_type == "prodigy":
            return lambda step: 1.0
        return lambda step: ((1.0 - progress.completion(step)) ** EDEN_TI_DECAY
                             * _linear_warmup(step, config.ti_lr_warmup_steps))
    if name == GroupName.TEXT_ENCODER_LORA:
        return lambda step: ((1.0 - progress.completion(step)) ** EDEN_TE_DECAY
                             * _linear_warmup(step, config.txt_encoders_lr_warmup_steps))
    raise ValueError(f"no Eden learning-rate curve for parameter group {name!r}")
