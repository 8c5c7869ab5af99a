"""The whole preparation on local folders: manifest, sizes, SDXL conditioning, augmentation, preview, reuse."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from tests.data.factories import config, fast_limits, photo
from trainer.data.errors import SourceError
from trainer.data.manifest import PreparedDataset
from trainer.data.prepare import SCRATCH_DIR, prepare_dataset
from trainer.data.preview import PREVIEW_NAME


def _folder(sandbox, sizes=((300, 200), (200, 300), (256, 256)), captions=None):
    for i, (width, height) in enumerate(sizes):
        photo(width, height, seed=i).save(sandbox.inputs / f"p{i}.png")
    for i, text in (captions or {}).items():
        (sandbox.inputs / f"p{i}.txt").write_text(text)
    return sandbox.inputs


def _digests(dataset):
    return [hashlib.sha256(dataset.image_path(i).read_bytes()).hexdigest() for i in range(len(dataset))]


def test_manifest_sizes_and_sdxl_conditioning(sandbox):
    source = _folder(sandbox, sizes=((600, 300), (300, 600), (400, 400)))
    before = sandbox.snapshot()
    dataset = prepare_dataset(config(source, aspect_ratio_bucketing=True, resolution=256, train_batch_size=1,
                                     crop_based_on_salience=False), sandbox.work_dir, limits=fast_limits())
    sandbox.assert_nothing_written_outside(before)
    assert not (sandbox.work_dir / SCRATCH_DIR).exists()
    wide, tall, square = dataset.samples
    assert wide.original_size == (300, 600) and tall.original_size == (600, 300) and square.original_size == (400, 400)
    assert wide.target_size[1] > wide.target_size[0] and tall.target_size[0] > tall.target_size[1]
    assert square.target_size == (256, 256) and square.crop_top_left == (0, 0)
    for sample in dataset.samples:
        height, width = sample.target_size
        assert height % 64 == 0 and width % 64 == 0 and height * width <= 256 * 256
        rh, rw = sample.resized_size
        assert sample.crop_top_left == ((rh - height) // 2, (rw - width) // 2)  # centre crop in resized pixels
        with Image.open(dataset.image_path(dataset.samples.index(sample))) as image:
            assert image.size == (width, height) and image.mode == "RGB"
    reloaded = PreparedDataset.load(dataset.root)
    assert reloaded.samples == dataset.samples and reloaded.trigger == "TOK"
    assert reloaded.info["buckets"] == dataset.info["buckets"]


def test_augmentation_is_reproducible_and_captions_follow_mirrors(sandbox):
    source = _folder(sandbox, captions={0: "a lamp on the left of a sofa"})
    cfg = config(source, augment_imgs_up_to_n=9, seed=7, resolution=128)
    first = prepare_dataset(cfg, sandbox.work_dir / "a", limits=fast_limits())
    second = prepare_dataset(cfg, sandbox.work_dir / "b", limits=fast_limits())
    other = prepare_dataset(config(source, augment_imgs_up_to_n=9, seed=8, resolution=128), sandbox.work_dir / "c",
                            limits=fast_limits())
    assert len(first) == 9 and sum(s.augmented for s in first.samples) == 6
    assert _digests(first) == _digests(second) and first.samples == second.samples
    assert _digests(first) != _digests(other)
    flips = first.info["augmentation"]
    assert any(v["flip"] for v in flips)
    captions = {s.caption for s in first.samples if s.source.endswith("p0.png")}
    assert captions == {"TOK, a lamp on the left of a sofa", "TOK, a lamp on the right of a sofa"}


def test_face_mode_copies_are_never_mirrored(sandbox):
    source = _folder(sandbox)
    dataset = prepare_dataset(config(source, concept_mode="face", augment_imgs_up_to_n=8, resolution=128,
                                     use_face_detection_instead=True),
                              sandbox.work_dir, limits=fast_limits())
    assert len(dataset) == 8
    assert not any(v["flip"] for v in dataset.info["augmentation"])
    assert all(sample.mask is not None for sample in dataset.samples)  # no face found: full masks, not none
    with Image.open(dataset.mask_path(0)) as mask:
        assert np.asarray(mask).min() == 255


def test_preview_contact_sheet(sandbox):
    cutout = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    cutout.paste(photo(100, 100, seed=2).convert("RGBA"), (50, 50))
    cutout.save(sandbox.inputs / "cut.png")
    _folder(sandbox, sizes=((300, 200),), captions={0: "a very long caption " * 20})
    dataset = prepare_dataset(config(sandbox.inputs, resolution=128), sandbox.work_dir, limits=fast_limits())
    preview = sandbox.work_dir / PREVIEW_NAME
    assert preview.is_file() and dataset.info["preview"] == PREVIEW_NAME
    with Image.open(preview) as sheet:
        assert sheet.format == "JPEG" and sheet.width >= 2 * 256
        pixels = np.asarray(sheet.convert("RGB"), dtype=int)
    veil = (pixels[..., 0] > 150) & (pixels[..., 1] < 120) & (pixels[..., 2] < 120)
    assert veil.sum() > 500  # the transparent border of the cut-out shows under the red veil
    text = (pixels.min(axis=-1) > 200).sum()
    assert text > 200  # captions are written


def test_prepared_dataset_is_reused_only_with_the_same_settings(sandbox):
    source = _folder(sandbox)
    cfg = config(source, resolution=128)
    first = prepare_dataset(cfg, sandbox.work_dir, limits=fast_limits())
    stamp = first.image_path(0).stat().st_mtime_ns
    again = prepare_dataset(cfg, sandbox.work_dir, limits=fast_limits())
    assert again.samples == first.samples and again.image_path(0).stat().st_mtime_ns == stamp
    changed = prepare_dataset(config(source, resolution=192), sandbox.work_dir, limits=fast_limits())
    assert changed.samples[0].target_size == (192, 192)
    changed.image_path(0).unlink()
    rebuilt = prepare_dataset(config(source, resolution=192), sandbox.work_dir, limits=fast_limits())
    assert rebuilt.image_path(0).is_file()


def test_small_images_are_enlarged_with_a_warning(sandbox):
    photo(80, 80, seed=1).save(sandbox.inputs / "small.png")
    dataset = prepare_dataset(config(sandbox.inputs, resolution=256), sandbox.work_dir, limits=fast_limits())
    assert any("small.png" in w and "enlarged 3.2×" in w for w in dataset.info["warnings"])


def test_local_sources_refused_through_the_api(sandbox):
    source = _folder(sandbox)
    before = sandbox.snapshot()
    with pytest.raises(SourceError, match="local paths are not accepted here"):
        prepare_dataset(config(source), sandbox.work_dir, allow_local=False, limits=fast_limits())
    sandbox.assert_nothing_written_outside(before)
    assert not sandbox.work_dir.exists() or not any(sandbox.work_dir.iterdir())


def test_source_folder_holding_the_run_folder(sandbox):
    source = _folder(sandbox)
    work_dir = source / "runs" / "run-1"
    first = prepare_dataset(config(source, resolution=128), work_dir, limits=fast_limits())
    again = prepare_dataset(config(source, resolution=128), work_dir, limits=fast_limits(), reuse=False)
    assert len(first) == len(again) == 3  # its own output is not read back as training images
