"""What a run leaves behind besides its resumable state: the exported files, the sample images and the zip."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.data import sizes
from trainer.data.captions import apply_prompt_modifier
from trainer.data.preview import PREVIEW_NAME
from trainer.export.bundle import ExportSpec, usage_readme, write_export, write_zip
from trainer.export.eden import eden_training_attributes, empty_token_rows
from trainer.export.files import SAVE_DTYPES, safe_name
from trainer.inference import sampling

if TYPE_CHECKING:  # the session module imports the checkpoint module, which imports this one
    from trainer.training.session import Session


LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"


def export_spec(session: Session) -> ExportSpec:
    config, run = session.config, session.run
    captions = [s.caption for s in session.dataset.samples]
    training_args = run.training_args(config, now=time.time())
    training_args["training_attributes"] = eden_training_attributes(config, captions, len(session.dataset))
    # Eden records the prompts of its sample grid here, and its cog output returns them as grid_prompts.
    training_args["training_attributes"]["validation_prompts"] = [prompt for prompt, _ in sample_prompt_list(config)]
    return ExportSpec(
        name=safe_name(run.name),
        version=run.version,
        rank=config.lora_rank,
        alpha=config.lora_rank * config.lora_alpha_multiplier,
        te_rank=config.text_encoder_lora_rank,
        te_alpha=config.text_encoder_lora_rank * config.lora_alpha_multiplier,
        resolution=session.dataset.target_sizes[0],
        n_images=len(session.dataset),
        captions=captions,
        base_model=session.models.source.describe(),
        token_dict=dict(run.token_dict) if session.tokens else {run.trigger: run.trigger},
        tokens=list(run.tokens) if session.tokens else [],
        training_args=training_args,
        save_dtype=SAVE_DTYPES[config.save_dtype],
        base_model_kind=session.models.source.kind,
    )


def export_files(session: Session, folder: Path) -> None:
    """The LoRA, the embeddings and the usage files, as users load them, into ``folder``."""
    write_export(
        folder, export_spec(session), unet=session.models.unet, text_encoders=session.models.text_encoders,
        token_rows=_token_rows(session), unet_lora=session.config.is_lora,
        te_lora=session.te_lora, full_unet=not session.config.is_lora,
    )


def sample_prompt_list(config) -> list[tuple[str, str | None]]:
    """The (prompt, negative prompt) pairs of the sample grid, the prompt modifier applied."""
    prompts = sampling.sample_prompts(config.concept_mode, config.n_sample_imgs, config.validation_prompts,
                                      config.negative_validation_prompts)
    if config.prompt_modifier:
        prompts = [(apply_prompt_modifier(config.prompt_modifier, p), n) for p, n in prompts]
    return prompts


def render_samples(session: Session, folder: Path, step: int) -> Path | None:
    config, run = session.config, session.run
    if config.n_sample_imgs == 0:
        return None
    models = session.models
    prompts = sample_prompt_list(config)
    was_training = models.unet.training
    models.unet.eval()
    if config.offload_idle_modules:
        session.offload_idle(False)
    try:
        pipeline = models.pipeline()
        pipeline.set_progress_bar_config(disable=True)
        if config.enable_cpu_offload_during_validation and session.device.backend != "cpu":
            pipeline.enable_model_cpu_offload(device=session.device.device)
        # Sampling runs the compiled blocks eager: its CFG batch, other size and no-grad mode would each compile
        # new graphs for a few dozen denoising steps, costing more than they save and spending the recompile budget.
        with session.device.autocast(), torch.compiler.set_stance("force_eager"):
            images = sampling.render(
                pipeline, prompts, trigger=run.trigger, token_string=session.token_string,
                size_hw=run.sample_size, steps=config.validation_num_inference_steps,
                guidance=config.validation_guidance_scale,
                lora_scale=sizes.sample_lora_scale(config.sample_imgs_lora_scale, run.version),
                seed=run.seed, device=session.device.device, lora_active=config.is_lora,
            )
    finally:
        models.unet.train(was_training)
        if config.offload_idle_modules:
            session.offload_idle(True)
    return sampling.save_samples(images, prompts, folder / "samples", f"step-{step:06d}")


def _token_rows(session: Session) -> dict[str, torch.Tensor]:
    # Without trained tokens the file still exists, empty: Eden's loaders require an embeddings file.
    return session.tokens.rows() if session.tokens else empty_token_rows(session.models.text_encoders)


def build_zip(session: Session, final: Path, extras: dict[str, Path] | None = None,
              leave_out: frozenset[str] = frozenset()) -> Path:
    """The zip users get: the final checkpoint's files (less ``leave_out``), the extras, the loss log and plot, the
    dataset preview and a usage README."""
    spec = export_spec(session)
    extras = dict(extras or {})
    extras.setdefault(LOSS_CSV, session.run_dir / LOSS_CSV)
    extras.setdefault(LOSS_PNG, session.run_dir / LOSS_PNG)
    extras.setdefault(PREVIEW_NAME, session.run_dir / PREVIEW_NAME)
    readme = usage_readme(spec, has_lora=session.config.is_lora or session.te_lora,
                          has_embeddings=session.tokens is not None, full_unet=not session.config.is_lora)
    return write_zip(session.run_dir / f"{spec.name}.zip", final, extras, readme, leave_out)
