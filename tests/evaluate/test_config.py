"""The evaluation settings of the training config: defaults and the errors for bad values."""

from __future__ import annotations

import pytest

from trainer.config.load import ConfigError, load_config

MINIMAL = {"lora_training_urls": "images.zip", "concept_mode": "face"}


def test_defaults():
    config = load_config(MINIMAL)
    assert not config.evaluate_checkpoints
    assert config.evaluation_clip_model == "openai/clip-vit-large-patch14"
    assert config.evaluation_aesthetic_weights is None
    assert config.evaluation_lora_scales == [0.8, 1.0] and config.evaluation_images_per_prompt == 2


@pytest.mark.parametrize(("values", "message"), [
    ({"evaluation_lora_scales": []}, r"evaluation_lora_scales must be 1 to 8 items, each in \(0, 2\], got \[\]"),
    ({"evaluation_lora_scales": [0.8, 0.8]}, "distinct LoRA scales > 0"),
    ({"evaluation_lora_scales": [0.0, 1.0]}, r"evaluation_lora_scales.0 must be in \(0, 2\], got 0.0"),
    ({"evaluation_lora_scales": [float("nan")]}, "evaluation_lora_scales.0 must be a finite number"),
    ({"evaluation_images_per_prompt": 0}, r"evaluation_images_per_prompt must be in \[1, 8\], got 0"),
    ({"evaluation_clip_model": "  "}, "evaluation_clip_model is empty"),
])
def test_bad_values_are_explained(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**MINIMAL, **values})


def test_the_config_and_the_evaluation_settings_share_one_rule_per_setting():
    """The config's evaluation_* fields and EvaluationSettings (python -m trainer evaluate) have the same types: one
    LoRA-scale rule, one bound on images per prompt, one CLIP-model rule, one default each."""
    from trainer.config.schema import TrainingConfig
    from trainer.evaluate.settings import EvaluationSettings

    for name in ("lora_scales", "clip_model", "aesthetic_weights", "images_per_prompt"):
        ours, theirs = TrainingConfig.model_fields[f"evaluation_{name}"], EvaluationSettings.model_fields[name]
        assert ours.annotation == theirs.annotation and ours.metadata == theirs.metadata, name
        assert ours.get_default(call_default_factory=True) == theirs.get_default(call_default_factory=True), name
    config = load_config({**MINIMAL, "evaluation_lora_scales": [0.5, 1.5], "evaluation_images_per_prompt": 3})
    settings = EvaluationSettings.from_config(config, steps=4)
    assert settings.lora_scales == [0.5, 1.5] and settings.images_per_prompt == 3 and settings.steps == 4
    with pytest.raises(ValueError, match=r"Invalid evaluation settings: lora_scales must be distinct LoRA scales"):
        EvaluationSettings.parse(lora_scales=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"lora_scales.0 must be in \(0, 2\], got 2.5"):
        EvaluationSettings.parse(lora_scales=[2.5])
