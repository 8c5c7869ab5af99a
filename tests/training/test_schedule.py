"""Which parts train at which step, and Eden's learning-rate curves: arithmetic on the config, no model loaded."""

from __future__ import annotations

import pytest

from trainer.config.load import load_config
from trainer.training.optimizers import GroupName
from trainer.training.schedule import (
    EDEN_TE_DECAY,
    EDEN_TI_DECAY,
    Phase,
    Schedule,
    eden_cold_unet_lr,
    eden_lr_lambda,
)


def _config(**values):
    return load_config({"lora_training_urls": "https://host.example/set.zip", "concept_mode": "object", **values})


def test_a_phase_names_its_groups_by_the_shared_enum():
    phase = Phase(ti=True, unet=False, te_lora=True)
    assert [phase.trains(name) for name in GroupName] == [False, True, True]
    assert phase.text_trains and phase.anything_trains
    assert not Phase(ti=False, unet=False, te_lora=False).anything_trains
    assert phase.trains("unet") is False  # the enum's values are the names checkpoints store


def test_the_pivot_freezes_the_tokens_after_the_fraction():
    schedule = Schedule.from_config(_config(freeze_ti_after_completion_f=0.5), total=10, has_ti=True,
                                    has_te_lora=False, steps_per_epoch=10)
    assert schedule.ti_end == 6  # completion 0.0 ... 0.5 trains: steps 0-5
    assert [schedule.at(s).ti for s in (0, 5, 6, 9)] == [True, True, False, False]
    assert schedule.text_frozen_from(6) and not schedule.text_frozen_from(5)
    # Eden applies the pivot only to its own AdamW schedule: a Prodigy token optimiser runs to the end.
    prodigy = Schedule.from_config(_config(freeze_ti_after_completion_f=0.5, ti_optimizer="prodigy"), total=10,
                                   has_ti=True, has_te_lora=False, steps_per_epoch=10)
    assert prodigy.ti_end == 10


def test_the_unet_freeze_and_the_token_warmup():
    config = _config(freeze_unet_before_completion_f=0.3, token_warmup_steps=2)
    eden = Schedule.from_config(config, total=10, has_ti=True, has_te_lora=True, steps_per_epoch=10)
    # Eden's curves keep stepping the UNet from the warm-up on, at rate 0 until the fraction is reached.
    assert (eden.unet_start, eden.unet_end, eden.unet_from_completion, eden.te_end) == (2, 10, 0.3, 10)
    linear = Schedule.from_config(config.model_copy(update={"lr_scheduler": "linear"}), total=10, has_ti=True,
                                  has_te_lora=True, steps_per_epoch=10)
    assert (linear.unet_start, linear.unet_end, linear.unet_from_completion) == (3, 10, 0.0)
    assert [linear.at(s).unet for s in (2, 3)] == [False, True] and linear.at(2).te_lora is False


def test_edens_learning_rate_curves():
    config = _config(unet_lr=1e-3, unet_lr_warmup_steps=None, ti_lr_warmup_steps=0, txt_encoders_lr_warmup_steps=4,
                     freeze_unet_before_completion_f=0.2)
    schedule = Schedule.from_config(config, total=10, has_ti=True, has_te_lora=True, steps_per_epoch=10)
    unet = eden_lr_lambda(GroupName.UNET, config, schedule, "adamw", 1e-3)
    cold = eden_cold_unet_lr(config)
    assert unet(0) == 0.0 and unet(1) == 0.0  # frozen before 20% of the run
    assert unet(5) * 1e-3 == pytest.approx(cold * (1e-3 / cold) ** 0.5)  # exponential warm-up over the run
    tokens = eden_lr_lambda(GroupName.TOKENS, config, schedule, "adamw", 1e-3)
    assert tokens(5) == pytest.approx(0.5**EDEN_TI_DECAY)
    assert eden_lr_lambda(GroupName.TOKENS, config, schedule, "prodigy", 1.0)(5) == 1.0
    text = eden_lr_lambda(GroupName.TEXT_ENCODER_LORA, config, schedule, "adamw", 1e-5)
    assert text(2) == pytest.approx(0.8**EDEN_TE_DECAY * 2 / 4) and text(6) == pytest.approx(0.4**EDEN_TE_DECAY)
    with pytest.raises(ValueError, match="no Eden learning-rate curve for parameter group 'other'"):
        eden_lr_lambda("other", config, schedule, "adamw", 1.0)
    assert eden_cold_unet_lr(_config(disable_ti=True)) == 2e-4 and eden_cold_unet_lr(_config(is_lora=False)) == 1e-5
