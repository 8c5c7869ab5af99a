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
