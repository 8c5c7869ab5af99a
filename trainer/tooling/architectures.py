"""The real SD1.5 and SDXL-base architectures (public configs), for speed and memory measurements offline.

Random weights change nothing about speed or memory, so the benchmark builds these from config instead of
downloading 7 GB. Never used for training a user's LoRA: they are only reachable through ``trainer.tooling.benchmark``.

``sdxl-narrow`` is SDXL-base's topology (the same blocks, transformer depths [1, 2, 10], 140 attention layers, both
text encoders at their real depths, the 4-level VAE) with narrow widths: a CPU step of it is overhead-bound, as the
real model's step is on a GPU, so its op count and per-op costs stand in for the GPU's launch overhead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from trainer.models.tokenizer import write_clip_tokenizer
from trainer.utils.atomic import atomic_dir

logger = logging.getLogger(__name__)

SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
#: SDXL-base with a tenth of the UNet widths, 32-wide text encoders and a narrow VAE; everything else as SDXL.
SDXL_NARROW_UNET = {
    **SDXL_UNET, "addition_time_embed_dim": 32, "attention_head_dim": [2, 4, 8], "block_out_channels": [32, 64, 128],
    "cross_attention_dim": 64, "projection_class_embeddings_input_dim": 6 * 32 + 32,
}
VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
          "hidden_act": "gelu", "projection_dim": 1280}
NARROW_VAE = {**VAE, "block_out_channels": [32, 64, 128, 128]}  # channel changes where SDXL has them
# 32 wide: wider 77-token text encoders of 12 + 32 layers become FLOP-bound on a CPU and hide the per-op overhead.
NARROW_CLIP_L = {**CLIP_L, "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4, "projection_dim": 32}
NARROW_CLIP_G = {**CLIP_G, "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4, "projection_dim": 32}
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1, "prediction_type": "epsilon"}

#: Parameter counts of the published models, in millions (checked by the tests against these configs).
REFERENCE_PARAMS_M = {"sdxl": {"unet": 2567.5, "vae": 83.7, "clip_l": 123.1, "clip_g": 694.7},
                      "sd15": {"unet": 859.5, "vae": 83.7, "clip_l": 123.1}}


def _text_config(values: dict, pad_token_id: int = 49407):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=pad_token_id, **values)


def build_components(version: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> dict:
    """UNet, VAE and text encoders of the real architecture with random weights (on ``meta``: shapes only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if version not in ("sdxl", "sd15", "sdxl-narrow"):
        raise ValueError(f"unknown architecture {version!r}: sdxl, sd15 or sdxl-narrow")
    narrow = version == "sdxl-narrow"
    xl = version in ("sdxl", "sdxl-narrow")
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL_NARROW_UNET if narrow else SDXL_UNET if xl else SD15_UNET))
        vae = AutoencoderKL(**(NARROW_VAE if narrow else VAE), sample_size=1024 if xl else 512,
                            scaling_factor=0.13025 if xl else 0.18215)
        encoders = {"text_encoder": CLIPTextModel(_text_config(NARROW_CLIP_L if narrow else CLIP_L))}
        if xl:
            encoders["text_encoder_2"] = CLIPTextModelWithProjection(
                _text_config(NARROW_CLIP_G if narrow else CLIP_G, pad_token_id=0))
    components = {"unet": unet, "vae": vae, **encoders}
    if device != "meta":
        for module in components.values():
            module.to(dtype)
    return components


def build_random_pipeline(version: str, folder: Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float16) -> Path:
    """Save a random-weight diffusers pipeline of the real architecture (about 7 GB for SDXL in fp16)."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    logger.info("building a random-weight %s pipeline in %s", version, folder)
    with torch.random.fork_rng(devices=[]), atomic_dir(folder, replace=False) as tmp:
        torch.manual_seed(0)
        parts = build_components(version, device, dtype)
        for module in parts.values():
            module.to("cpu")
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "_tok"))
        if version in ("sdxl", "sdxl-narrow"):
            tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "_tok2", pad_token="!"))
            pipe = StableDiffusionXLPipeline(
                tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **SCHEDULER), **parts,
            )
        else:
            pipe = StableDiffusionPipeline(
                tokenizer=tokenizer, scheduler=PNDMScheduler(skip_prk_steps=True, **SCHEDULER), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False, **parts,
            )
        pipe.save_pretrained(tmp, safe_serialization=True)
        import shutil

        for scratch in tmp.glob("_tok*"):
            shutil.rmtree(scratch)
    return folder
