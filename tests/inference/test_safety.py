"""The safety checker: diffusers' StableDiffusionSafetyChecker, tiny and built from config, run on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.inference.safety import SafetyChecker
from trainer.models.tiny import TINY_SAFETY_CHECKER, build_tiny_safety_checker

CPU = torch.device("cpu")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)),
            Image.new("RGB", (64, 48), (40, 160, 220))]


def _load(location, model_cache) -> SafetyChecker:
    return SafetyChecker.load(str(location), cache_dir=model_cache, device=CPU, dtype=torch.float32)


def test_a_checker_forced_to_flag_blacks_out_every_image_and_reports_it(tmp_path, model_cache):
    build_tiny_safety_checker(tmp_path / "flags", flag_everything=True)
    checker = _load(tmp_path / "flags", model_cache)
    images = _images()
    filtered, flagged = checker.filter(images)
    assert flagged == [0, 1]
    for original, result in zip(images, filtered, strict=True):
        assert result.size == original.size and not np.asarray(result).any(), "a black image of the same size"


def test_the_named_fixture_flags_nothing_and_leaves_the_images(model_cache):
    checker = _load(TINY_SAFETY_CHECKER, model_cache)
    images = _images()
    filtered, flagged = checker.filter(images)
    assert flagged == [] and filtered == images


def test_each_image_is_judged_on_its_own(tmp_path, model_cache):
    """One concept set to the first image's own embedding: that image is flagged, the other is not."""
    build_tiny_safety_checker(tmp_path / "one")
    checker = _load(tmp_path / "one", model_cache)
    images = _images()
    model = checker.model
    with torch.no_grad():
        pixels = checker.image_processor(images=images[:1], return_tensors="pt")["pixel_values"]
        embedding = model.visual_projection(model.vision_model(pixels)[1])[0]
        model.concept_embeds[0] = embedding
        model.concept_embeds_weights[0] = 0.99  # cosine similarity to itself is 1
    assert checker.flags(images) == [True, False]
    filtered, flagged = checker.filter(images)
    assert flagged == [0] and filtered[1] is images[1] and not np.asarray(filtered[0]).any()


def test_an_unusable_location_says_how_to_fix_it(tmp_path, model_cache):
    with pytest.raises(ValueError, match="is not a local folder or a hub id"):
        _load("not a model", model_cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"could not load the safety checker .*TRAINER_DISABLE_SAFETY_CHECKER=1"):
        _load(tmp_path / "empty", model_cache)
