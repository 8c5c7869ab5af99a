"""Tiny SD1.5 and SDXL pipelines with random weights and the real CLIP tokenizer, for tests and the offline smoke run.

They have the real architectures' structure (cross-attention blocks, a mid block, SDXL's second text encoder and
size conditioning, an 8x VAE) at a size that trains a step on a CPU in well under a second. They are built once into
the model cache and then loaded through exactly the same code path as a real diffusers folder. They are only ever
used when named (``ckpt_path: tiny-sd15`` / ``tiny-sdxl``), never as a fallback.

Two predictor companions are built the same way and are likewise used only when named: ``tiny-sdxl-refiner`` (an SDXL
refiner that fits ``tiny-sdxl``'s VAE and second text encoder; ``TRAINER_SDXL_REFINER``) and ``tiny-safety-checker``
(diffusers' ``StableDiffusionSafetyChecker`` with a tiny CLIP vision tower, thresholds that never flag;
``TRAINER_SAFETY_CHECKER``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from trainer.models.tokenizer import write_clip_tokenizer
from trainer.utils.atomic import atomic_dir

logger = logging.getLogger(__name__)

TINY_NAMES = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}
TINY_REFINER = "tiny-sdxl-refiner"
TINY_SAFETY_CHECKER = "tiny-safety-checker"
#: Bump when the fixtures change so that stale caches are rebuilt.
TINY_VERSION = 2
EOS_ID = 49407
BOS_ID = 49406

_SCHEDULER_KW = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _text_encoder_config(hidden: int, projection_dim: int | None = None, pad_token_id: int = EOS_ID):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=projection_dim or hidden,
        bos_token_id=BOS_ID,
        # The real end-of-text id, so pooled outputs read the EOS position even with added tokens (see offline.md).
        eos_token_id=EOS_ID,
        pad_token_id=pad_token_id,
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks give the real 8x downsampling, so sizes and latent shapes behave as in the full models.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def build_tiny_sd15(folder: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_encoder_config(32))
    tok_dir = write_clip_tokenizer(folder / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **_SCHEDULER_KW)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _sdxl_unet(time_dim: int, *, numbers: int, pooled_dim: int, context_dim: int,
               transformer_layers_per_block: int | tuple[int, ...]):
    """SDXL's UNet layout at tiny widths: ``numbers`` conditioning numbers embedded at ``time_dim`` each plus the
    pooled text projection feed the added time embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=transformer_layers_per_block,
        projection_class_embeddings_input_dim=numbers * time_dim + pooled_dim,
        cross_attention_dim=context_dim,
        norm_num_groups=32,
    )


def build_tiny_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    te1_dim, te2_dim, time_dim = 32, 32, 8
    # Six size/crop numbers embedded at time_dim each, plus the pooled CLIP-G projection (as in SDXL).
    unet = _sdxl_unet(time_dim, numbers=6, pooled_dim=te2_dim, context_dim=te1_dim + te2_dim,
                      transformer_layers_per_block=(1, 2))
    vae = _vae()
    text_encoder = CLIPTextModel(_text_encoder_config(te1_dim))
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(te2_dim, projection_dim=te2_dim, pad_token_id=0))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_src"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_2_src", pad_token="!"))
    scheduler = EulerDiscreteScheduler(
        interpolation_type="linear", timestep_spacing="leading", use_karras_sigmas=False, **_SCHEDULER_KW
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.vae.register_to_config(scaling_factor=0.13025)
    pipe.save_pretrained(folder, safe_serialization=True)


def build_tiny_sdxl_refiner(folder: Path) -> None:
    """An SDXL refiner (img2img, second text encoder only, aesthetic-score conditioning) sized to fit ``tiny-sdxl``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(1)
    te2_dim, time_dim = 32, 8
    # The refiner conditions on five numbers (size, crop, aesthetic score) and reads CLIP-G alone.
    unet = _sdxl_unet(time_dim, numbers=5, pooled_dim=te2_dim, context_dim=te2_dim, transformer_layers_per_block=1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(te2_dim, projection_dim=te2_dim, pad_token_id=0))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_2_src", pad_token="!"))
    scheduler = EulerDiscreteScheduler(
        interpolation_type="linear", timestep_spacing="leading", use_karras_sigmas=False, **_SCHEDULER_KW
    )
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(), text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.vae.register_to_config(scaling_factor=0.13025)
    pipe.save_pretrained(folder, safe_serialization=True)


def build_tiny_safety_checker(folder: Path, *, flag_everything: bool = False) -> None:
    """diffusers' safety checker with a tiny CLIP vision tower, and its image processor.

    Its random concept vectors mean nothing, so the thresholds decide: 1 (a cosine similarity never exceeds it) flags
    nothing; ``flag_everything`` sets them below -1, so every image is flagged (for tests of the flagged path).
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    torch.manual_seed(2)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        threshold = -2.0 if flag_everything else 1.0
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


_BUILDERS = {"tiny-sd15": build_tiny_sd15, "tiny-sdxl": build_tiny_sdxl, TINY_REFINER: build_tiny_sdxl_refiner,
             TINY_SAFETY_CHECKER: build_tiny_safety_checker}


def tiny_model_dir(name: str, cache_dir: Path) -> Path:
    """The folder of the named tiny model, built on first use (atomically, so parallel builders are safe)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(_BUILDERS)}")
    folder = Path(cache_dir) / "tiny" / f"{name}-v{TINY_VERSION}"
    if (folder / "model_index.json").is_file() or (folder / "preprocessor_config.json").is_file():
        return folder
    logger.info("building the %s test fixture in %s", name, folder)
    builder = _BUILDERS[name]
    # fork_rng: building must not change the caller's random state (runs would differ on a fresh cache).
    with torch.random.fork_rng(devices=[]), atomic_dir(folder, replace=False) as tmp:
        builder(tmp)
        for scratch in tmp.glob("_tokenizer*_src"):
            shutil.rmtree(scratch)
    return folder
