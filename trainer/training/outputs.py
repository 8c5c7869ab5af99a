"""What a run leaves behind: checkpoints with the exported files and samples, and the zip."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from trainer.data import sizes
from trainer.data.captions import apply_prompt_modifier
from trainer.export.bundle import ExportSpec, usage_readme, write_export, write_zip
from trainer.export.eden import eden_training_attributes, empty_token_rows
from trainer.export.files import SAVE_DTYPES, safe_name
from trainer.inference import sampling
from trainer.training import checkpoint as ckpt
from trainer.training.errors import TrainingDiverged
from trainer.training.session import Session, offload_idle, training_state

logger = logging.getLogger(__name__)

LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"


def export_spec(session: Session) -> ExportSpec:
    config = session.config
    config.job_time = time.time() - config.start_time  # Eden's field: run time so far, in the exported args
    captions = [s.caption for s in session.dataset.samples]
    training_args = config.to_json_dict()
    training_args["training_attributes"] = eden_training_attributes(config, captions, len(session.dataset))
    return ExportSpec(
        name=safe_name(config.name),
        version=session.models.version,
        rank=config.lora_rank,
        alpha=config.lora_rank * config.lora_alpha_multiplier,
        te_rank=config.text_encoder_lora_rank,
        te_alpha=config.text_encoder_lora_rank * config.lora_alpha_multiplier,
        resolution=session.dataset.target_sizes[0],
        n_images=len(session.dataset),
        captions=captions,
        base_model=session.models.source.describe(),
        token_dict=config.token_dict if session.tokens else {config.trigger: config.trigger},
        tokens=config.inserting_list_tokens if session.tokens else [],
        training_args=training_args,
        save_dtype=SAVE_DTYPES[config.save_dtype],
        base_model_kind=session.models.source.kind,
    )


def sample_size(session: Session) -> tuple[int, int]:
    return sizes.sample_size(session.config.validation_img_size, session.models.version,
                             session.dataset.target_sizes[0])


def render_samples(session: Session, folder: Path, step: int) -> Path | None:
    config = session.config
    if config.n_sample_imgs == 0:
        return None
    models = session.models
    prompts = sampling.sample_prompts(config.concept_mode, config.n_sample_imgs, config.validation_prompts,
                                      config.negative_validation_prompts)
    if config.prompt_modifier:
        prompts = [(apply_prompt_modifier(config.prompt_modifier, p), n) for p, n in prompts]
    was_training = models.unet.training
    models.unet.eval()
    if config.offload_idle_modules:
        offload_idle(session, False)
    try:
        pipeline = models.pipeline()
        pipeline.set_progress_bar_config(disable=True)
        if config.enable_cpu_offload_during_validation and session.device.backend != "cpu":
            pipeline.enable_model_cpu_offload(device=session.device.device)
        with session.device.autocast():
            images = sampling.render(
                pipeline, prompts, trigger=config.trigger, token_string=session.token_string,
                size_hw=sample_size(session), steps=config.validation_num_inference_steps,
                guidance=config.validation_guidance_scale,
                lora_scale=sizes.sample_lora_scale(config.sample_imgs_lora_scale, models.version),
                seed=session.seed, device=session.device.device, lora_active=config.is_lora,
            )
    finally:
        models.unet.train(was_training)
        if config.offload_idle_modules:
            offload_idle(session, True)
    return sampling.save_samples(images, prompts, folder / "samples", f"step-{step:06d}")


def save_checkpoint(session: Session, step: int, with_samples: bool) -> Path:
    if not session.dist.is_main:
        session.dist.barrier()
        return ckpt.checkpoint_dir(session.run_dir, step)

    def write_files(folder: Path) -> None:
        _check_finite_parameters(session, step)
        write_export(
            folder, export_spec(session), unet=session.models.unet, text_encoders=session.models.text_encoders,
            token_rows=_token_rows(session), unet_lora=session.config.is_lora,
            te_lora=session.te_lora, full_unet=not session.config.is_lora,
        )
        if with_samples:
            render_samples(session, folder, step)

    try:
        return ckpt.write_checkpoint(session.run_dir, step, write_files, training_state(session, step),
                                     session.config.max_checkpoints, protect={session.total_steps})
    finally:
        session.dist.barrier()


def _token_rows(session: Session) -> dict[str, torch.Tensor]:
    # Without trained tokens the file still exists, empty: Eden's loaders require an embeddings file.
    return session.tokens.rows() if session.tokens else empty_token_rows(session.models.text_encoders)


def _check_finite_parameters(session: Session, step: int) -> None:
    params = [p for g in session.groups for p in g.params]
    norms = torch._foreach_norm(params)
    if not torch.isfinite(torch.stack(norms)).all():
        raise TrainingDiverged(
            f"weights became NaN or infinite before step {step}; no checkpoint was written for it. "
            "Lower unet_lr / ti_lr, set max_grad_norm, or use weight_type 'bf16' or 'fp32'."
        )


def build_zip(session: Session, final: Path, extras: dict[str, Path] | None = None) -> Path:
    spec = export_spec(session)
    extras = dict(extras or {})
    extras.setdefault(LOSS_CSV, session.run_dir / LOSS_CSV)
    extras.setdefault(LOSS_PNG, session.run_dir / LOSS_PNG)
    extras.setdefault("dataset_preview.jpg", session.run_dir / "dataset_preview.jpg")
    readme = usage_readme(spec, has_lora=session.config.is_lora or session.te_lora,
                          has_embeddings=session.tokens is not None, full_unet=not session.config.is_lora)
    return write_zip(session.run_dir / f"{spec.name}.zip", final, extras, readme)
