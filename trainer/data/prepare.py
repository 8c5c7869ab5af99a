"""From ``lora_training_urls`` to a prepared dataset (images at their training size, captions, masks).

The steps, each in its own module:

1. ingest (``ingest/``): split the sources, fetch them (http(s), S3, local), unpack archives safely, drop duplicates;
2. decode (``images``): keep what opens as an image within the limits, skip the rest with a warning naming it;
3. caption (``caption_files``, ``captioners/``): captions from files, else from ``caption_model``; the trigger is
   placed per concept mode (``captions``);
4. size (``buckets``): one fixed training size, or an aspect-ratio bucket per image;
5. mask and crop (``masks/``, ``saliency``, ``crops``): masks from faces, CLIPSeg or transparency; crops around the
   mask or the salient region; augmented copies (``augment``);
6. write the dataset atomically to ``work_dir/dataset`` (``manifest.json`` beside ``images/`` and ``masks/``) and
   the contact sheet to ``work_dir/dataset_preview.jpg`` (``preview``).

Everything written goes under ``work_dir``; downloads and unpacked archives live in ``work_dir/_ingest`` only while
preparing. Problems with the input raise :class:`~trainer.data.errors.DataError` (a ``ValueError``) with a message
that names the item.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from trainer.config.schema import TrainingConfig
from trainer.data.augment import (
    TOLERANCE,
    ZOOM_MIRRORED,
    ZOOM_PLAIN,
    AugmentView,
    flips_allowed,
    plan_augmentation,
)
from trainer.data.buckets import training_sizes
from trainer.data.caption_files import CaptionIndex
from trainer.data.captioners import create_captioner
from trainer.data.captioners.gpt4v import GPT4VCaptioner, inject_trigger
from trainer.data.captions import clean_generated_caption, place_trigger, swap_left_right
from trainer.data.crops import CropPlan, cover_size, plan_crop, render_image, render_mask
from trainer.data.errors import DataError
from trainer.data.images import ImageReadError, LoadedImage, open_image, oriented_size
from trainer.data.ingest.collect import Candidate, CaptionTable, ingest_sources
from trainer.data.ingest.sources import split_sources
from trainer.data.limits import DataLimits
from trainer.data.manifest import MANIFEST_NAME, PreparedDataset, Sample
from trainer.data.masks import Masker, create_masker, mask_method
from trainer.data.preview import PREVIEW_NAME, write_contact_sheet
from trainer.data.report import PrepReport
from trainer.data.saliency import importance_map
from trainer.utils.atomic import atomic_dir

logger = logging.getLogger(__name__)

DATASET_DIR = "dataset"
SCRATCH_DIR = "_ingest"
#: Bump when the output for the same inputs changes, so that older prepared datasets are not reused.
PREPARE_VERSION = 2
#: Side of the working copy that masks and saliency are computed on.
WORK_SIDE = 1024
#: Frames above this many pixels are reduced before the crops are rendered (see ``SourceImage.load``); below it the
#: crops come from the full frame, as they always did.
REDUCE_ABOVE_PIXELS = 24_000_000
#: The most a crop zooms in (augmented copies).
MAX_ZOOM = max(ZOOM_PLAIN[1], ZOOM_MIRRORED[1])
#: Upscaling beyond this factor gets a warning: the image will look soft.
UPSCALE_WARNING = 2.0
#: Settings that change the prepared dataset; a dataset prepared with the same ones is reused.
DATA_FIELDS = (
    "lora_training_urls", "concept_mode", "caption_prefix", "caption_trigger", "prompt_modifier", "disable_ti",
    "caption_model", "caption_model_path",
    "resolution", "train_img_size", "train_aspect_ratio", "aspect_ratio_bucketing", "train_batch_size",
    "left_right_flip_augmentation", "augment_imgs_up_to_n", "mask_target_prompts", "crop_based_on_salience",
    "use_face_detection_instead", "clipseg_temperature", "clipseg_model_path", "skip_gpt_cleanup", "seed",
    "use_masks", "token_dict", "max_train_images", "s3_endpoint_url",
)


@dataclass
class SourceImage:
    candidate: Candidate
    original_hw: tuple[int, int]
    """(height, width) after EXIF orientation: SDXL's original-size conditioning."""
    limits: DataLimits

    def load(self, max_side: int | None = None, render_hw: tuple[int, int] | None = None) -> LoadedImage:
        """Decode again (images are not kept in memory); ``max_side`` gives a smaller working copy.

        ``render_hw`` (the training size): a frame larger than :data:`REDUCE_ABOVE_PIXELS` is reduced while it still
        holds three times the pixels the most zoomed crop of that size needs, the margin ``render_image`` resamples
        with; smaller frames are used as they are.
        """
        draft = (max_side, max_side) if max_side else None
        reduce_to = (max_side, max_side) if max_side else None
        gap = 2.0
        height, width = self.original_hw
        if render_hw is not None and height * width > REDUCE_ABOVE_PIXELS:
            needed_h, needed_w = cover_size(self.original_hw, render_hw, zoom=MAX_ZOOM)
            reduce_to, gap = (needed_w, needed_h), 3.0
        loaded = open_image(self.candidate.path, max_pixels=self.limits.max_image_pixels, label=self.candidate.label,
                            draft_size=draft, reduce_to=reduce_to, reduce_gap=gap)
        if max_side and max(loaded.image.size) > max_side:
            loaded.image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            if loaded.alpha is not None:
                loaded.alpha = loaded.alpha.resize(loaded.image.size, Image.Resampling.BILINEAR)
        return loaded


def data_fingerprint(config: TrainingConfig, seed: int | None = None) -> str:
    settings = {name: getattr(config, name) for name in DATA_FIELDS}
    settings["seed"] = config.seed if seed is None else seed
    settings["version"] = PREPARE_VERSION
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_dataset(config: TrainingConfig, work_dir: Path, *, seed: int | None = None, allow_local: bool = True,
                    limits: DataLimits | None = None, reuse: bool = True) -> PreparedDataset:
    """Prepare the training set in ``work_dir/dataset`` and return it.

    ``allow_local`` admits local files and folders (the command line; the cog API passes False unless enabled).
    ``limits`` overrides the documented limits (default: :class:`DataLimits` with ``max_train_images``). With
    ``reuse``, a dataset already prepared in ``work_dir`` from the same settings is returned as it is (resume).
    ``seed``: the run's seed (drawn when the config has none); it picks the augmented views.
    """
    work_dir = Path(work_dir)
    limits = limits or DataLimits.from_config(config)
    root = work_dir / DATASET_DIR
    seed = config.seed if seed is None else seed
    fingerprint = data_fingerprint(config, seed)
    if reuse:
        existing = _reusable(root, fingerprint)
        if existing is not None:
            logger.info("reusing the dataset prepared in %s (same sources and settings)", root)
            return existing
    report = PrepReport()
    scratch = work_dir / SCRATCH_DIR
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        sources = split_sources(config.lora_training_urls)
        ingested = ingest_sources(sources, scratch, limits=limits, report=report, allow_local=allow_local,
                                  s3_endpoint=config.s3_endpoint_url)
        images = _decode_all(ingested.candidates, limits, report)
        captions, caption_sources = _caption_all(config, images, ingested.tables, limits, report)
        sizes = training_sizes(config, [image.original_hw for image in images], report)
        seed = seed if seed is not None else 0
        views = plan_augmentation(len(images), config.augment_imgs_up_to_n, seed=seed,
                                  allow_flip=flips_allowed(config.concept_mode, config.left_right_flip_augmentation))
        with atomic_dir(root) as building:
            samples, mask_info = _render_all(config, images, captions, sizes, views, building, report)
            info = {
                "fingerprint": fingerprint,
                "n_images": len(samples),
                "n_source_images": len(images),
                "n_augmented": len(views),
                "duplicates_removed": ingested.duplicates,
                "skipped": report.counts["skipped"],
                "caption_sources": dict(caption_sources),
                "caption_model": config.caption_model if caption_sources.get("model") else None,
                **mask_info,
                "buckets": {f"{w}x{h}": n for (h, w), n in sorted(Counter(s.target_size for s in samples).items())},
                "augmentation": [{"of": v.source, "zoom": round(v.zoom, 3), "flip": v.flip} for v in views],
                "seed": seed,
                "preview": PREVIEW_NAME,
                "warnings": report.warnings,
            }
            PreparedDataset(root=building, samples=samples, trigger=config.trigger, info=info).save()
        dataset = PreparedDataset(root=root, samples=samples, trigger=config.trigger, info=info)
    finally:
        report.finish()
        shutil.rmtree(scratch, ignore_errors=True)
    _write_preview(dataset, work_dir / PREVIEW_NAME, config)
    logger.info(
        "prepared %d training images (%d sources, %d augmented copies) in %s; preview: %s",
        len(dataset), len(images), len(views), root, work_dir / PREVIEW_NAME,
    )
    return dataset


def _reusable(root: Path, fingerprint: str) -> PreparedDataset | None:
    if not (root / MANIFEST_NAME).is_file():
        return None
    try:
        dataset = PreparedDataset.load(root)
    except (ValueError, KeyError, TypeError, OSError):
        return None
    if dataset.info.get("fingerprint") != fingerprint:
        return None
    for index in range(len(dataset)):
        mask = dataset.mask_path(index)
        if not dataset.image_path(index).is_file() or (mask is not None and not mask.is_file()):
            return None
    return dataset


# ------------------------------------------------------------------------------------------------------ decode
def _decode_all(candidates: list[Candidate], limits: DataLimits, report: PrepReport) -> list[SourceImage]:
    images: list[SourceImage] = []
    for candidate in tqdm(candidates, desc="checking images", unit="img", leave=False):
        try:
            # A reduced JPEG decode still reads the whole stream, so truncation is caught at a fraction of the cost;
            # other formats are decoded whole and reduced before any conversion.
            loaded = open_image(candidate.path, max_pixels=limits.max_image_pixels, label=candidate.label,
                                draft_size=(WORK_SIDE, WORK_SIDE), reduce_to=(WORK_SIDE, WORK_SIDE))
            width, height = _oriented_full_size(candidate, loaded, limits)
        except ImageReadError as error:
            report.skip_error(error)
            continue
        if min(width, height) < limits.min_image_side:
            report.skip(candidate.label, f"{width}×{height} is too small (the shorter side needs "
                                         f"{limits.min_image_side} pixels)")
            continue
        images.append(SourceImage(candidate, (height, width), limits))
        if len(images) > limits.max_images:
            raise DataError(
                f"the training sources hold more than {limits.max_images} images, the maximum (max_train_images); "
                "use fewer images or raise max_train_images"
            )
    if not images:
        reasons = "; ".join(report.warnings[:5]) or "no files were found"
        raise DataError(f"no usable training images in lora_training_urls ({reasons})")
    return images


def _oriented_full_size(candidate: Candidate, loaded: LoadedImage, limits: DataLimits) -> tuple[int, int]:
    """Full-resolution (width, height) after orientation (a draft decode may be smaller)."""
    if loaded.format not in ("JPEG", "MPO"):
        return loaded.full_size
    try:
        return oriented_size(candidate.path)
    except Exception as error:  # it decoded a moment ago; a header re-read failing means corrupt
        raise ImageReadError(f"{candidate.label}: unreadable header ({error})") from None


# ----------------------------------------------------------------------------------------------------- caption
def _caption_all(config: TrainingConfig, images: list[SourceImage], tables: list[CaptionTable],
                 limits: DataLimits, report: PrepReport) -> tuple[list[str], Counter]:
    index = CaptionIndex(tables, limits, report)
    texts: list[str] = []
    sources: Counter = Counter()
    missing: list[int] = []
    rewritten: set[int] = set()
    for i, image in enumerate(images):
        found = index.lookup(image.candidate, report)
        texts.append(found.text if found else "")
        if found:
            sources[found.origin] += 1
        else:
            missing.append(i)
    if missing and config.caption_model != "no_caption":
        generated, was_rewritten = _generate_captions(config, [images[i] for i in missing], limits)
        for i, text in zip(missing, generated, strict=True):
            texts[i] = text
        if was_rewritten:
            rewritten.update(missing)
        sources["model"] += len(missing)
    elif missing:
        sources["none"] += len(missing)
    final = [
        place_trigger(text, config.trigger, config.concept_mode, config.caption_prefix, config.prompt_modifier,
                      disable_ti=config.disable_ti, rewritten=i in rewritten, rule=config.caption_trigger)
        for i, text in enumerate(texts)
    ]
    return final, sources


def _generate_captions(config: TrainingConfig, images: list[SourceImage], limits: DataLimits
                       ) -> tuple[list[str], bool]:
    """The captions, and whether a GPT pass rewrote them around the trigger."""
    captioner = create_captioner(config, limits)
    assert captioner is not None
    logger.info("captioning %d image(s) with %s", len(images), captioner.name)
    results: list[str] = []
    try:
        with tqdm(total=len(images), desc=f"captioning ({captioner.name})", unit="img") as bar:
            for start in range(0, len(images), captioner.batch_size):
                batch = images[start:start + captioner.batch_size]
                pictures = [image.load(max_side=captioner.input_side).image for image in batch]
                results.extend(clean_generated_caption(text) for text in captioner.caption(pictures))
                bar.update(len(batch))
    finally:
        captioner.close()
    wants_rewrite = (config.caption_model == "gpt4-v" and not config.skip_gpt_cleanup
                     and not config.caption_prefix.strip() and config.concept_mode != "style" and not config.disable_ti)
    if wants_rewrite:
        assert isinstance(captioner, GPT4VCaptioner)
        results = inject_trigger(captioner.client, results, config.trigger, config.concept_mode)
    for image, text in zip(images, results, strict=True):
        logger.debug("caption of %s: %s", image.candidate.label, text)
    return results, wants_rewrite


# ------------------------------------------------------------------------------------------- mask, crop, write
def _render_all(config: TrainingConfig, images: list[SourceImage], captions: list[str],
                sizes: list[tuple[int, int]], views: list[AugmentView], root: Path,
                report: PrepReport) -> tuple[list[Sample], dict]:
    (root / "images").mkdir()
    (root / "masks").mkdir()
    copies: dict[int, list[AugmentView]] = defaultdict(list)
    for view in views:
        copies[view.source].append(view)
    method = mask_method(config)
    masker = create_masker(config) if method and (config.use_masks or config.crop_based_on_salience) else None
    samples: list[Sample] = []
    n_alpha = 0
    try:
        for i, image in enumerate(tqdm(images, desc="masks and crops", unit="img")):
            loaded = image.load(render_hw=sizes[i])
            mask, from_alpha = _mask_for(loaded, masker)
            n_alpha += from_alpha
            importance = _importance(loaded.image, mask) if config.crop_based_on_salience else None
            _warn_upscale(image, sizes[i], report)
            plans = [(plan_crop(image.original_hw, sizes[i], importance), False)]
            for view in copies[i]:
                plans.append((plan_crop(image.original_hw, sizes[i], importance, zoom=view.zoom, flip=view.flip,
                                        rng=view.rng(), tolerance=TOLERANCE), True))
            for copy_number, (plan, augmented) in enumerate(plans):
                name = f"{i:04d}" + (f"-aug{copy_number}" if augmented else "")
                caption = swap_left_right(captions[i]) if plan.flip else captions[i]
                samples.append(_write_sample(loaded, mask, plan, name, caption, image, augmented, root))
    finally:
        if masker is not None:
            masker.close()
    info = {"mask_method": method, "masks_from_transparency": n_alpha}
    if masker is not None and hasattr(masker, "faces_found"):
        info["images_with_faces"] = masker.faces_found
    return samples, info


def _mask_for(loaded: LoadedImage, masker: Masker | None) -> tuple[np.ndarray | None, bool]:
    """The image's mask at working size: the masker's, times the transparency (transparent areas never count)."""
    work = loaded.image
    if max(work.size) > WORK_SIDE:
        work = work.copy()
        work.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.LANCZOS)
    mask = None
    if masker is not None:
        view = work
        if max(view.size) > masker.input_side:
            view = view.copy()
            view.thumbnail((masker.input_side, masker.input_side), Image.Resampling.LANCZOS)
        mask = masker.mask(view)
    if loaded.alpha is None:
        return mask, False
    import cv2

    size = (mask.shape[1], mask.shape[0]) if mask is not None else work.size
    alpha = np.asarray(loaded.alpha.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    if mask is None:
        return alpha, True
    if mask.shape != alpha.shape:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_LINEAR)
    return mask * alpha, True


def _importance(image: Image.Image, mask: np.ndarray | None) -> np.ndarray:
    """What the crop should keep: the mask when it says something, else the saliency map."""
    if mask is not None and float(mask.min()) < 0.99:
        return mask
    work = image
    if max(work.size) > WORK_SIDE:
        work = work.copy()
        work.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BILINEAR)
    return importance_map(work)


def _warn_upscale(image: SourceImage, target_hw: tuple[int, int], report: PrepReport) -> None:
    oh, ow = image.original_hw
    rh, _ = cover_size(image.original_hw, target_hw)
    factor = rh / oh
    if factor > UPSCALE_WARNING:
        th, tw = target_hw
        report.warn(f"{image.candidate.label}: {ow}×{oh} is enlarged {factor:.1f}× to train at {tw}×{th} and may "
                    "look soft; larger images train better")


def _write_sample(loaded: LoadedImage, mask: np.ndarray | None, plan: CropPlan, name: str, caption: str,
                  image: SourceImage, augmented: bool, root: Path) -> Sample:
    image_rel = f"images/{name}.png"
    render_image(loaded.image, plan).save(root / image_rel, format="PNG", compress_level=3)
    mask_rel = None
    if mask is not None:
        mask_rel = f"masks/{name}.png"
        render_mask(mask, plan).save(root / mask_rel, format="PNG", compress_level=3)
    return Sample(
        image=image_rel,
        caption=caption,
        target_size=plan.target_hw,
        original_size=image.original_hw,
        crop_top_left=plan.crop_top_left,
        mask=mask_rel,
        source=image.candidate.label,
        augmented=augmented,
        resized_size=plan.resized_hw,
    )


# ------------------------------------------------------------------------------------------------------ preview
def _write_preview(dataset: PreparedDataset, target: Path, config: TrainingConfig) -> None:
    info = dataset.info
    buckets = ", ".join(f"{size}: {n}" for size, n in info.get("buckets", {}).items())
    captions = ", ".join(f"{k} {v}" for k, v in info.get("caption_sources", {}).items())
    title = (
        f"{len(dataset)} training images ({info.get('n_source_images')} sources, {info.get('n_augmented')} augmented) "
        f"- {config.concept_mode} - sizes {buckets} - captions: {captions} - masks: {info.get('mask_method') or 'none'}"
    )
    try:
        write_contact_sheet(dataset, target, title)
    except (OSError, ValueError) as error:
        # The preview helps people; a failure to draw it must not stop a run whose data is fine.
        logger.warning("could not write the dataset preview %s: %s", target, error)
