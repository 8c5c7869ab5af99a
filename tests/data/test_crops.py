"""Crops: window placement from masks and saliency, SDXL crop coordinates, augmentation plans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.data.augment import flips_allowed, plan_augmentation
from trainer.data.crops import best_offset, plan_crop, render_image, render_mask
from trainer.data.saliency import importance_map, spectral_residual


@settings(max_examples=200, deadline=None)
@given(st.integers(64, 4000), st.integers(64, 4000), st.sampled_from([(512, 512), (448, 576), (640, 384)]),
       st.floats(1.0, 1.4))
def test_crop_plans_stay_inside_the_resized_image(height, width, target, zoom):
    plan = plan_crop((height, width), target, zoom=zoom, rng=np.random.default_rng(0))
    rh, rw = plan.resized_hw
    top, left = plan.top_left
    assert rh >= target[0] and rw >= target[1]
    assert 0 <= top <= rh - target[0] and 0 <= left <= rw - target[1]
    # Cover scaling loses at most a rounding pixel on the tight side.
    assert min(rh - target[0], rw - target[1]) <= 1 or zoom > 1.0
    mirrored = plan_crop((height, width), target, zoom=zoom, flip=True, rng=np.random.default_rng(0))
    assert mirrored.crop_top_left == (top, rw - left - target[1])


def test_window_goes_to_the_mass_and_centres_it():
    profile = np.zeros(100)
    profile[70:80] = 1.0
    assert best_offset(profile, 40) == 55  # holds all of it, centred: 75 - 20
    profile[:] = 0
    profile[95:] = 1.0
    assert best_offset(profile, 40) == 60  # pushed to the edge
    assert best_offset(np.zeros(100), 40) == 30  # nothing to keep: the centre
    picks = {best_offset(np.ones(100), 40, rng=np.random.default_rng(s), tolerance=0.1) for s in range(30)}
    assert len(picks) > 5 and all(0 <= p <= 60 for p in picks)


def test_mask_steers_the_crop_and_is_cropped_alike():
    image = Image.new("RGB", (400, 200), (0, 0, 0))
    image.paste((255, 0, 0), (320, 60, 380, 140))  # a red block near the right edge
    mask = np.zeros((100, 200), dtype=np.float32)  # half resolution
    mask[30:70, 160:190] = 1.0
    plan = plan_crop((200, 400), (128, 128), mask)
    assert plan.resized_hw == (128, 256) and plan.top_left[1] > 64
    cropped, cropped_mask = render_image(image, plan), render_mask(mask, plan)
    red = np.asarray(cropped)[..., 0] > 128
    inside = np.asarray(cropped_mask) > 128
    assert red.sum() > 0 and (red == inside).mean() > 0.95  # the mask still lies on the red block


def test_saliency_finds_the_object_on_a_plain_background():
    rng = np.random.default_rng(0)
    array = np.full((240, 480, 3), 200, dtype=np.uint8)
    array[90:150, 380:440] = rng.integers(0, 255, size=(60, 60, 3))  # a busy patch on the right
    image = Image.fromarray(array)
    saliency = spectral_residual(image)
    assert saliency.shape == (240, 480) and saliency.min() >= 0.0 and saliency.max() == pytest.approx(1.0)
    assert saliency[90:150, 380:440].mean() > 3 * saliency[:, :200].mean()
    plan = plan_crop((240, 480), (256, 256), importance_map(image))
    left = plan.top_left[1]
    assert left + 256 >= 440 * 256 / 240 - 1  # the crop keeps the patch (a centre crop would cut into it)


def test_augmentation_plans_are_balanced_seeded_and_never_flip_faces():
    plan = plan_augmentation(7, 40, seed=3, allow_flip=True)
    assert len(plan) == 33
    counts = np.bincount([v.source for v in plan], minlength=7)
    assert counts.max() - counts.min() <= 1
    assert plan == plan_augmentation(7, 40, seed=3, allow_flip=True)
    assert plan != plan_augmentation(7, 40, seed=4, allow_flip=True)
    assert any(v.flip for v in plan) and any(not v.flip for v in plan)
    assert not flips_allowed("face", True) and not flips_allowed("object", False) and flips_allowed("style", True)
    assert not any(v.flip for v in plan_augmentation(7, 40, seed=3, allow_flip=False))
    assert all(v.zoom >= 1.1 for v in plan_augmentation(5, 9, seed=0, allow_flip=False))
    assert plan_augmentation(10, 5, seed=0, allow_flip=True) == []
