"""Which parts train at which step: the pivot, the token warm-up and the UNet freeze."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from trainer.config import TrainingConfig
from trainer.config.schema import MAX_TRAIN_STEPS

logger = logging.getLogger(__name__)


@dataclass
class Phase:
    """Which parts train at a step."""

    ti: bool
    unet: bool
    te_lora: bool

    @property
    def text_trains(self) -> bool:
        return self.ti or self.te_lora


@dataclass
class Schedule:
    total: int
    ti_end: int
    unet_start: int
    unet_end: int
    te_end: int

    @classmethod
    def from_config(cls, config: TrainingConfig, total: int, has_ti: bool, has_te_lora: bool) -> Schedule:
        # The pivot: the text side (tokens and text-encoder LoRA) trains until freeze_ti_after_completion_f.
        pivot = math.floor(config.freeze_ti_after_completion_f * total)
        warmup = config.token_warmup_steps if has_ti else 0
        return cls(
            total=total,
            ti_end=pivot if has_ti else 0,
            unet_start=min(warmup, total),
            unet_end=total - math.floor(config.freeze_unet_before_completion_f * total),
            te_end=pivot if has_te_lora else 0,
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


def resolve_total_steps(config: TrainingConfig, batches_per_epoch: int) -> int:
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.gradient_accumulation_steps))
    use_epochs = config.num_train_epochs is not None and (
        config.max_train_steps is None or not config.explicitly_set("max_train_steps")
    )
    if use_epochs:
        total = config.num_train_epochs * steps_per_epoch
        if total > MAX_TRAIN_STEPS:
            raise ValueError(
                f"num_train_epochs {config.num_train_epochs} × {steps_per_epoch} steps per epoch is {total} steps, "
                f"over the limit of {MAX_TRAIN_STEPS}; use fewer epochs or set max_train_steps"
            )
        return total
    return config.max_train_steps
