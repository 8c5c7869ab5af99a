"""Masks: the real OpenCV face detector on a real photo, and tiny CLIPSeg through the production code."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from tests.data.factories import config, fast_limits, photo
from trainer.data.masks import create_masker, mask_method, mask_prompts, split_prompts
from trainer.data.masks.clipseg import ClipSegMasker
from trainer.data.masks.faces import FaceMasker
from trainer.data.prepare import prepare_dataset

# Eileen Collins' face in skimage's astronaut photo (512×512): roughly x 170-275, y 60-170.
FACE_BOX = (170, 60, 275, 170)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def faces() -> FaceMasker:
    return FaceMasker()


def test_face_detector_finds_the_astronaut(astronaut, faces):
    boxes = faces.detect(astronaut)
    assert len(boxes) == 1
    x, y, w, h = boxes[0]
    cx, cy = x + w / 2, y + h / 2
    assert FACE_BOX[0] < cx < FACE_BOX[2] and FACE_BOX[1] < cy < FACE_BOX[3]
    mask = faces.mask(astronaut)
    assert mask.shape == (512, 512) and mask.dtype == np.float32
    assert mask[int(cy), int(cx)] > 0.95  # the face is in the mask
    assert mask[480, 480] < 0.05 and mask[450, 60] < 0.05  # the rocket and the flag are not
    assert 0.02 < mask.mean() < 0.25
    assert ((mask > 0.1) & (mask < 0.9)).sum() > 500  # soft edges, not a hard cut-out


def test_several_faces_give_their_union(astronaut, faces):
    pair = Image.new("RGB", (1024, 512))
    pair.paste(astronaut, (0, 0))
    pair.paste(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (512, 0))
    mask = faces.mask(pair)
    assert mask[115, 222] > 0.9 and mask[115, 1024 - 222] > 0.9
    assert mask[480, 512] < 0.05


def test_no_face_gives_a_full_mask_not_a_black_one(faces):
    mask = faces.mask(photo(200, 150, seed=3))
    assert mask.shape == (150, 200) and float(mask.min()) == 1.0


def test_which_mask_method_runs():
    """Eden (trainer/config.py): face mode sets mask_target_prompts to "face", which CLIPSeg masks; the face
    detector only runs with use_face_detection_instead."""
    assert mask_method(config("x", concept_mode="face")) == "clipseg"
    assert mask_prompts(config("x", concept_mode="face")) == ["face"]
    assert mask_method(config("x", concept_mode="face", use_face_detection_instead=True)) == "face"
    assert mask_method(config("x", concept_mode="object")) is None
    assert mask_method(config("x", concept_mode="object", mask_target_prompts="a dog")) == "clipseg"
    assert mask_method(config("x", concept_mode="face", mask_target_prompts="a hat")) == "clipseg"
    assert mask_method(config("x", concept_mode="style", use_face_detection_instead=True,
                              mask_target_prompts="a hat")) == "face"
    assert split_prompts("a man, smiling | a hat\nthe sky") == ["a man, smiling", "a hat", "the sky"]


def test_face_mode_masks_and_crops_around_the_face(sandbox, astronaut):
    wide = Image.new("RGB", (1024, 512), (30, 30, 30))
    wide.paste(astronaut, (0, 0))  # the face sits in the left half of a wide picture
    wide.save(sandbox.inputs / "wide.png")
    dataset = prepare_dataset(config(sandbox.inputs, concept_mode="face", resolution=256, crop_based_on_salience=True,
                                     use_face_detection_instead=True, train_aspect_ratio=1.0),
                              sandbox.work_dir, limits=fast_limits())
    sample = dataset.samples[0]
    assert dataset.info["mask_method"] == "face" and dataset.info["images_with_faces"] == 1
    assert sample.target_size == (256, 256) and sample.resized_size == (256, 512)
    assert sample.crop_top_left[1] < 128  # the window moved left, to the face (a centre crop would start at 128)
    with Image.open(dataset.mask_path(0)) as mask:
        assert mask.mode == "L" and mask.size == (256, 256)
        values = np.asarray(mask)
    assert values.max() == 255 and values.min() < 20
    centred = prepare_dataset(config(sandbox.inputs, concept_mode="face", resolution=256, crop_based_on_salience=False,
                                     use_face_detection_instead=True, train_aspect_ratio=1.0),
                              sandbox.work_dir, limits=fast_limits())
    assert centred.samples[0].crop_top_left == (0, 128)


# ------------------------------------------------------------------------------------------------------ CLIPSeg
def test_clipseg_soft_masks_and_temperature(tiny_models):
    folder = tiny_models("clipseg")
    image = photo(120, 90, seed=5)
    cool = ClipSegMasker.from_config(config("x", mask_target_prompts="a red disc", clipseg_model_path=str(folder),
                                            clipseg_temperature=0.1))
    warm = ClipSegMasker.from_config(config("x", mask_target_prompts="a red disc", clipseg_model_path=str(folder),
                                            clipseg_temperature=5.0))
    sharp, soft = cool.mask(image), warm.mask(image)
    for mask in (sharp, soft):
        assert mask.shape == (90, 120) and mask.dtype == np.float32
        assert mask.min() > 0.0 and 0.95 < mask.max() <= 1.0  # scaled to a peak of 1 (before resizing)
        assert len(np.unique(np.round(mask, 3))) > 10  # soft, not a binary cut-out
    assert soft.std() < sharp.std()  # a higher temperature gives a softer mask
    both = ClipSegMasker.from_config(config("x", mask_target_prompts="a red disc | the sky",
                                            clipseg_model_path=str(folder)))
    union = both.probabilities(image)
    assert union.shape[0] == 2
    single = both.probabilities(image)[0]
    assert (union.max(axis=0) >= single - 1e-6).all()
    for masker in (cool, warm, both):
        masker.close()


def test_clipseg_masks_through_preparation(sandbox, tiny_models):
    folder = tiny_models("clipseg")
    for i in range(2):
        photo(160, 120, seed=i).save(sandbox.inputs / f"{i}.png")
    cfg = config(sandbox.inputs, mask_target_prompts="a red disc", clipseg_model_path=str(folder),
                 crop_based_on_salience=True)
    masker = create_masker(cfg)
    assert isinstance(masker, ClipSegMasker)
    masker.close()
    before = sandbox.snapshot()
    dataset = prepare_dataset(cfg, sandbox.work_dir, limits=fast_limits())
    sandbox.assert_nothing_written_outside(before)
    assert dataset.info["mask_method"] == "clipseg" and dataset.has_masks
    for index in range(len(dataset)):
        with Image.open(dataset.mask_path(index)) as mask, Image.open(dataset.image_path(index)) as image:
            assert mask.size == image.size and mask.mode == "L"


def test_transparency_is_the_mask_when_nothing_else_is(sandbox):
    cutout = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    cutout.paste(photo(100, 100, seed=8).convert("RGBA"), (50, 50))
    cutout.save(sandbox.inputs / "product.png")
    dataset = prepare_dataset(config(sandbox.inputs, resolution=128), sandbox.work_dir, limits=fast_limits())
    assert dataset.info["masks_from_transparency"] == 1
    with Image.open(dataset.mask_path(0)) as mask:
        values = np.asarray(mask)
    assert values[64, 64] == 255 and values[3, 3] == 0
    with Image.open(dataset.image_path(0)) as image:
        assert image.getpixel((3, 3)) == (255, 255, 255)
