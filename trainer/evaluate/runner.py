"""Evaluating the checkpoints of a run: render each with the fixed prompt set, score, report, recommend.

Order of work, so that a mistake fails before minutes of rendering: the run folder and the requested checkpoints are
checked, the training images found, every checkpoint opened as a bundle, the aesthetic weights and the CLIP model
loaded (and checked against each other); only then is the base model loaded and rendering started. Rendering goes
through the predictor's :class:`~trainer.inference.generator.Generator`, so a checkpoint is scored exactly as it
will be used. The base model without the LoRA also renders the prompts without the token (the *baseline*): the
reference that likeness should rise above, adherence stay near and diversity not collapse below.

Everything lands in ``RUN/evaluation/``, written in a temporary folder that replaces the old one only when complete.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from trainer.config.schema import DEFAULT_CLIP_MODEL
from trainer.data.images import IMAGE_SUFFIXES
from trainer.data.manifest import MANIFEST_NAME, PreparedDataset
from trainer.data.sizes import sample_size
from trainer.evaluate.aesthetic import AestheticPredictor, load_aesthetic_predictor
from trainer.evaluate.chart import plot_scores
from trainer.evaluate.clip import BATCH, ClipScorer
from trainer.evaluate.metrics import adherence, diversity, likeness, nearest
from trainer.evaluate.prompts import EvalPrompt, evaluation_prompts, subject_phrase
from trainer.evaluate.recommend import RULE_TEXT, Candidate, Recommendation, RuleParams, recommend
from trainer.evaluate.recommended import EVALUATION_DIR, REPORT_NAME
from trainer.evaluate.settings import EvaluationSettings
from trainer.inference.bundle import LoraBundle
from trainer.inference.generator import GenerationRequest, Generator
from trainer.inference.sampling import image_grid
from trainer.models.loading import model_cache_dir
from trainer.training.checkpoint import CHECKPOINTS_DIR, list_checkpoints
from trainer.utils.atomic import atomic_dir
from trainer.utils.download import redact_url

logger = logging.getLogger(__name__)

CHART_NAME = "scores.png"
SUMMARY_NAME = "summary.md"
GRIDS_DIR = "grids"
REPORT_VERSION = 1
#: Longest side of one image in a grid: grids stay a few MB even for many 1024 px renders, and they go in the zip.
GRID_TILE = 256
DATASET_DIR = "dataset"
TRAINING_ARGS = "training_args.json"


@dataclass
class EvaluationResult:
    folder: Path
    report: dict
    recommendation: Recommendation

    @property
    def report_path(self) -> Path:
        return self.folder / REPORT_NAME

    @property
    def chart_path(self) -> Path:
        return self.folder / CHART_NAME


@dataclass
class _Scored:
    scores: dict[str, float | None]
    images: list[dict]


# ------------------------------------------------------------------------------------------------ inputs
def inspect_run(run_dir: Path, steps: list[int] | None = None) -> tuple[dict, list[tuple[int, Path]]]:
    """The run's training arguments and the checkpoints to evaluate, or a ValueError that says what is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ValueError(f"{run_dir} does not exist: pass the folder of a training run (it holds {TRAINING_ARGS} "
                         f"and {CHECKPOINTS_DIR}/)")
    if run_dir.is_dir() and run_dir.name.startswith("checkpoint-") and run_dir.parent.name == CHECKPOINTS_DIR:
        step = run_dir.name.removeprefix("checkpoint-")
        raise ValueError(f"{run_dir} is a checkpoint folder, not a run folder: pass {run_dir.parent.parent} "
                         f"with --checkpoint {step}")
    if not run_dir.is_dir() or not (run_dir / TRAINING_ARGS).is_file():
        raise ValueError(f"{run_dir} is not a training run folder: {TRAINING_ARGS} is missing. Pass the folder a "
                         f"training created (it holds {TRAINING_ARGS}, loss.csv and {CHECKPOINTS_DIR}/), not the zip")
    try:
        training_args = json.loads((run_dir / TRAINING_ARGS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{run_dir / TRAINING_ARGS} is not readable JSON ({error})") from None
    available = list_checkpoints(run_dir)
    if not available:
        raise ValueError(f"{run_dir} has no complete checkpoints ({CHECKPOINTS_DIR}/checkpoint-<step>/ with its "
                         "training state): nothing to evaluate. Let the training finish, or check the folder")
    if steps is None:
        # checkpoint-0 (Eden's rule saves one before training) holds the untrained tokens: a baseline, not a
        # candidate to recommend. Asked for by number, it is evaluated like any other.
        return training_args, [item for item in available if item[0] > 0] or available
    by_step = dict(available)
    missing = sorted({s for s in steps if s not in by_step})
    if missing:
        have = ", ".join(str(s) for s, _ in available)
        raise ValueError(f"checkpoint {', '.join(map(str, missing))} is not in {run_dir}: its checkpoints are at "
                         f"steps {have}")
    return training_args, [(s, by_step[s]) for s in sorted(set(steps))]


def training_image_paths(location: Path) -> tuple[list[Path], tuple[int, int] | None]:
    """The training images (prepared dataset, augmented copies left out) and the training size (h, w) if known."""
    location = Path(location)
    if (location / MANIFEST_NAME).is_file():
        return _dataset_paths(PreparedDataset.load(location))
    if location.is_dir():
        paths = sorted(p for p in location.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if paths:
            return paths, None
    raise ValueError(f"{location} holds no training images: likeness compares the outputs with them. Pass a "
                     "prepared dataset folder (with manifest.json) or a folder of the training images")


def _dataset_paths(dataset) -> tuple[list[Path], tuple[int, int] | None]:
    # Augmented copies are crops and flips of the same images: counting them would weight some images twice.
    indices = [i for i, s in enumerate(dataset.samples) if not s.augmented] or list(range(len(dataset)))
    if not indices:
        raise ValueError(f"the prepared dataset in {dataset.root} is empty")
    return [dataset.image_path(i) for i in indices], dataset.target_sizes[0]


def _default_size(training_args: dict, pipeline, train_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) of the run's sample images: the same rule as the training's (``ResolvedRun.sample_size``)."""
    configured = training_args.get("validation_img_size")
    version = training_args.get("sd_model_version") or ("sdxl" if hasattr(pipeline, "text_encoder_2") else "sd15")
    resolution = int(training_args.get("resolution") or 512)
    height, width = sample_size(configured, version, train_hw or (resolution, resolution))
    return width, height


# ------------------------------------------------------------------------------------------------ scoring
class _Scorers:
    def __init__(self, clip: ClipScorer, aesthetic: AestheticPredictor | None, training_embeds: torch.Tensor):
        self.clip, self.aesthetic, self.training_embeds = clip, aesthetic, training_embeds

    def score(self, rendered: list[tuple[EvalPrompt, int, Image.Image]], text_embeds: torch.Tensor) -> _Scored:
        embeds = self.clip.embed_images([image for _, _, image in rendered])
        texts = torch.stack([text_embeds[p.index] for p, _, _ in rendered])
        per_image = {
            "adherence": adherence(embeds, texts),
            "likeness": likeness(embeds, self.training_embeds),
            "nearest": nearest(embeds, self.training_embeds),
        }
        if self.aesthetic is not None:
            per_image["aesthetic"] = self.aesthetic(embeds)
        scores: dict[str, float | None] = {name: float(values.double().mean()) for name, values in per_image.items()}
        scores["diversity"] = diversity(embeds)
        scores.setdefault("aesthetic", None)
        images = [
            {"prompt": p.index, "image": j, "seed": p.seed,
             **{name: _round(float(values[k])) for name, values in per_image.items()}}
            for k, (p, j, _) in enumerate(rendered)
        ]
        return _Scored(scores, images)


def _render(generator, prompts: list[EvalPrompt], *, baseline: bool, lora_scale: float, width: int, height: int,
            steps: int, guidance: float, scheduler: str, per_prompt: int) -> list[tuple[EvalPrompt, int, Image.Image]]:
    rendered = []
    for prompt in prompts:
        request = GenerationRequest(
            prompt=prompt.adherence_text if baseline else prompt.prompt, width=width, height=height,
            num_outputs=per_prompt, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
            seed=prompt.seed, lora_scale=lora_scale,
        )
        rendered += [(prompt, j, image) for j, image in enumerate(generator.generate(request))]
    return rendered


def _save_grid(rows: list[list[Image.Image]], path: Path) -> None:
    tiles = []
    for row in rows:
        for image in row:
            tile = image.convert("RGB")
            tile.thumbnail((GRID_TILE, GRID_TILE), Image.Resampling.LANCZOS)
            tiles.append(tile)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(tiles, columns=len(rows[0])).save(path, format="JPEG", quality=90)


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class _Inputs:
    training_args: dict
    checkpoints: list[tuple[int, Path]]
    bundles: list
    prompts: list[EvalPrompt]
    scales: list[float]
    image_paths: list[Path]
    images_source: str
    train_hw: tuple[int, int] | None


def _gather_inputs(run_dir: Path, settings: EvaluationSettings, dataset) -> _Inputs:
    """Everything that can be checked without loading a model, so that mistakes fail in seconds."""
    training_args, checkpoints = inspect_run(run_dir, settings.checkpoints)
    if dataset is not None and settings.training_images is None:
        image_paths, train_hw = _dataset_paths(dataset)
        images_source = str(dataset.root)
    else:
        location = Path(settings.training_images).expanduser() if settings.training_images else run_dir / DATASET_DIR
        if not location.exists():
            raise ValueError(f"{location} does not exist: likeness compares the outputs with the training images. "
                             "Pass --training-images with the prepared dataset folder or a folder of the images")
        image_paths, train_hw = training_image_paths(location)
        images_source = str(location)
    bundles = [LoraBundle.open(folder) for _, folder in checkpoints]
    prompts = evaluation_prompts(training_args.get("concept_mode", "object"), trigger=bundles[0].trigger,
                                 subject=subject_phrase(training_args), n_prompts=settings.n_prompts,
                                 seed=settings.seed)
    if len(prompts) * settings.images_per_prompt < 2:
        raise ValueError("diversity needs at least 2 images per checkpoint and scale: raise the images per prompt "
                         "or the number of prompts")
    scales = list(settings.lora_scales)
    if all(bundle.lora is None for bundle in bundles) and len(scales) > 1:
        # Embeddings-only and full fine-tunes have no LoRA to scale: every scale would render the same images.
        logger.warning("the checkpoints hold no LoRA; evaluating at one scale instead of %s", scales)
        scales = [1.0]
    return _Inputs(training_args, checkpoints, bundles, prompts, scales, image_paths, images_source, train_hw)


def _load_scorers(settings: EvaluationSettings, device: torch.device, cache_dir: Path,
                  image_paths: list[Path]) -> _Scorers:
    # A few small matrices: the aesthetic head runs on the CPU, where the embeddings already are. Loaded first
    # because a missing file is the likelier mistake and the cheaper one to report.
    aesthetic = load_aesthetic_predictor(settings.aesthetic_weights, cache_dir) if settings.aesthetic_weights else None
    clip = ClipScorer.load(settings.clip_model, device)
    if aesthetic is not None and aesthetic.input_dim != clip.embed_dim:
        raise ValueError(
            f"the aesthetic weights expect {aesthetic.input_dim}-d CLIP image embeddings but {settings.clip_model} "
            f"gives {clip.embed_dim}-d: use the CLIP model the predictor was trained on (LAION's "
            f"sac+logos+ava1-l14-linearMSE.pth pairs with {DEFAULT_CLIP_MODEL})"
        )
    return _Scorers(clip, aesthetic, _embed_paths(clip, image_paths))


def evaluate_run(run_dir: Path, settings: EvaluationSettings | None = None, *, dataset=None,
                 rule: RuleParams | None = None) -> EvaluationResult:
    """Evaluate the checkpoints of ``run_dir`` and write ``run_dir/evaluation/``.

    ``dataset``: the run's :class:`~trainer.data.manifest.PreparedDataset` when the caller holds it (the training
    loop); otherwise the training images come from ``settings.training_images`` or ``run_dir/dataset``.
    """
    started = time.perf_counter()
    settings = settings or EvaluationSettings()
    rule = rule or RuleParams()
    run_dir = Path(run_dir)
    inputs = _gather_inputs(run_dir, settings, dataset)
    args, prompts = inputs.training_args, inputs.prompts

    configured_cache = args.get("model_cache_dir")
    cache_dir = model_cache_dir(configured_cache if configured_cache and Path(configured_cache).is_dir() else None)
    generator = Generator(settings.device, settings.weight_type or args.get("weight_type") or "bf16",
                          cache_dir=cache_dir)
    scorers = _load_scorers(settings, generator.device.device, cache_dir, inputs.image_paths)
    text_embeds = scorers.clip.embed_texts([p.adherence_text for p in prompts])

    generator.load_base(inputs.bundles[0].base_source(cache_dir, settings.base_model))
    width, height = settings.size or _default_size(args, generator.pipeline, inputs.train_hw)
    guidance = settings.guidance if settings.guidance is not None else args.get("validation_guidance_scale") or 7.0
    render = {"width": width, "height": height, "guidance": float(guidance), "scheduler": settings.scheduler,
              "steps": settings.steps or int(args.get("validation_num_inference_steps") or 25),
              "per_prompt": settings.images_per_prompt}
    logger.info("evaluating %d checkpoint(s) x %d scale(s), %d images each at %dx%d, %d steps",
                len(inputs.checkpoints), len(inputs.scales), len(prompts) * settings.images_per_prompt, width,
                height, render["steps"])

    folder = run_dir / EVALUATION_DIR
    with atomic_dir(folder) as tmp:
        baseline = None
        if settings.baseline:
            generator.deactivate()
            rendered = _render(generator, prompts, baseline=True, lora_scale=1.0, **render)
            baseline = scorers.score(rendered, text_embeds)
            _save_grid([[image for _, _, image in rendered]], tmp / GRIDS_DIR / "base.jpg")
        results: list[dict] = []
        for (step, checkpoint), bundle in zip(inputs.checkpoints, inputs.bundles, strict=True):
            logger.info("evaluating %s", checkpoint.name)
            generator.activate(bundle, settings.base_model)
            rows = []
            for scale in inputs.scales:
                rendered = _render(generator, prompts, baseline=False, lora_scale=scale, **render)
                scored = scorers.score(rendered, text_embeds)
                rows.append([image for _, _, image in rendered])
                results.append({"step": step, "checkpoint": checkpoint.name, "lora_scale": scale,
                                "scores": scored.scores, "grid": f"{GRIDS_DIR}/{checkpoint.name}.jpg",
                                "images": scored.images})
            generator.deactivate()
            _save_grid(rows, tmp / GRIDS_DIR / f"{checkpoint.name}.jpg")

        candidates = [Candidate(r["step"], r["lora_scale"], r["scores"]) for r in results]
        recommendation = recommend(candidates, baseline.scores["diversity"] if baseline else None, rule)
        for row, ranked in zip(results, recommendation.ranked, strict=True):
            row.update(normalised=ranked.normalised, combined=ranked.combined,
                       diversity_ratio=ranked.diversity_ratio, collapsed=ranked.collapsed)
        report = _report(
            run_dir=run_dir, inputs=inputs, settings=settings, render=render, device=generator.device.describe(),
            base_model=generator.base_source.describe() if generator.base_source else "", baseline=baseline,
            results=results,
            recommendation=recommendation, rule=rule, seconds=time.perf_counter() - started,
        )
        _write_outputs(tmp, report, recommendation)

    del generator, scorers
    gc.collect()
    logger.info("recommended: %s", recommendation.reason)
    return EvaluationResult(folder, report, recommendation)


def _write_outputs(folder: Path, report: dict, recommendation: Recommendation) -> None:
    # Plain writes: the whole folder is being written under a temporary name and appears only when complete.
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / SUMMARY_NAME).write_text(_summary(report), encoding="utf-8")
    best = recommendation.best.candidate
    plot_scores(report["results"], folder / CHART_NAME,
                baseline=report["baseline"]["scores"] if report["baseline"] else None,
                best=(best.step, best.lora_scale), title=f"checkpoint evaluation: {report['run']}")


def _embed_paths(clip: ClipScorer, paths: list[Path]) -> torch.Tensor:
    # Opened a batch at a time: a large training set is never held in memory as decoded images.
    chunks = []
    for start in range(0, len(paths), BATCH):
        batch = []
        for path in paths[start : start + BATCH]:
            try:
                with Image.open(path) as image:
                    batch.append(image.convert("RGB"))
            except OSError as error:
                raise ValueError(f"training image {path} cannot be read ({error})") from None
        chunks.append(clip.embed_images(batch))
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------------------ report
def _round(value, digits: int = 6):
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return value


def _report(*, run_dir: Path, inputs: _Inputs, settings: EvaluationSettings, render: dict, device: str,
            base_model: str, baseline: _Scored | None, results: list[dict], recommendation: Recommendation,
            rule: RuleParams, seconds: float) -> dict:
    best = recommendation.best.candidate
    training_args, prompts = inputs.training_args, inputs.prompts
    weights = settings.aesthetic_weights
    return _round({
        "version": REPORT_VERSION,
        "run": run_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "concept_mode": training_args.get("concept_mode"),
        "base_model": base_model,
        "settings": {
            "clip_model": settings.clip_model,
            "aesthetic_weights": (redact_url(weights) if weights and weights.startswith(("http://", "https://"))
                                  else weights),
            "lora_scales": inputs.scales,
            "width": render["width"], "height": render["height"], "steps": render["steps"],
            "guidance": render["guidance"], "scheduler": render["scheduler"],
            "images_per_prompt": render["per_prompt"], "seed": settings.seed, "baseline": settings.baseline,
            "device": device,
        },
        "training_images": {"count": len(inputs.image_paths), "source": inputs.images_source},
        "prompts": [{"index": p.index, "prompt": p.prompt, "adherence_text": p.adherence_text, "seed": p.seed}
                    for p in prompts],
        "scores": {
            "adherence": "mean CLIP cosine similarity of each image to its prompt without the trained token",
            "likeness": "mean CLIP cosine similarity of each image to every training image",
            "nearest": "mean over images of the similarity to the closest training image (near 1: copying)",
            "diversity": "mean pairwise CLIP cosine distance among the outputs of one checkpoint and scale",
            "aesthetic": "mean LAION aesthetic-predictor score (about 1-10), null without weights",
        },
        "rule": {
            "text": RULE_TEXT, **rule.to_dict(), "scores_used": list(recommendation.used_scores),
            "reference_diversity": recommendation.reference_diversity, "reference": recommendation.reference,
        },
        "baseline": {"prompts": "adherence_text, base model without the LoRA", "scores": baseline.scores,
                     "grid": f"{GRIDS_DIR}/base.jpg", "images": baseline.images} if baseline else None,
        "grids": "one grid per checkpoint: a row per LoRA scale (in settings.lora_scales order), a column per image "
                 "(prompt by prompt, images_per_prompt each)",
        "results": results,
        "recommendation": {
            "step": best.step, "checkpoint": f"checkpoint-{best.step}", "lora_scale": best.lora_scale,
            "combined": recommendation.best.combined, "all_collapsed": recommendation.all_collapsed,
            "reason": recommendation.reason,
        },
        "seconds": seconds,
    })


def _summary(report: dict) -> str:
    def cell(value, fmt=".3f"):
        return "-" if value is None else format(value, fmt)

    lines = [f"# Checkpoint evaluation: {report['run']}", "", f"**Recommended:** {report['recommendation']['reason']}",
             "", "| checkpoint | LoRA scale | likeness | adherence | diversity | aesthetic | nearest | combined | "
             "collapsed |", "|---|---|---|---|---|---|---|---|---|"]
    if report["baseline"]:
        s = report["baseline"]["scores"]
        lines.append(f"| base model | - | {cell(s['likeness'])} | {cell(s['adherence'])} | {cell(s['diversity'])} | "
                     f"{cell(s['aesthetic'], '.2f')} | {cell(s['nearest'])} | - | - |")
    for row in report["results"]:
        s = row["scores"]
        lines.append(f"| {row['checkpoint']} | {row['lora_scale']:g} | {cell(s['likeness'])} | "
                     f"{cell(s['adherence'])} | {cell(s['diversity'])} | {cell(s['aesthetic'], '.2f')} | "
                     f"{cell(s['nearest'])} | {cell(row['combined'], '.2f')} | {'yes' if row['collapsed'] else 'no'} |")
    lines += ["", f"Rule: {report['rule']['text']}", ""]
    return "\n".join(lines)
