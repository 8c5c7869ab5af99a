"""Turn a diffusers SD1.5 / SDXL pipeline folder into one original-layout (LDM / SGM) checkpoint.

This is the inverse of diffusers' single-file conversion (its scripts ``convert_diffusers_to_original_stable_diffusion``
and ``convert_diffusers_to_original_sdxl``), so that tests can make A1111/ComfyUI/civitai-style checkpoints from the
tiny fixtures without any download. Unlike those scripts it derives block indices from the folder's configs instead of
hard-coding the real models' sizes, and it refuses keys it does not know: a silently dropped weight would otherwise
only show up as a puzzling output mismatch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SD15_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Older diffusers folders name the VAE mid-block attention query/key/value/proj_attn; newer ones to_q/…/to_out.0.
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_VAE_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}


def _read_component(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            from safetensors.torch import load_file

            return load_file(str(folder / name))
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return torch.load(folder / name, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no (unsharded) weights in {folder}")


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _split(key: str, pattern: str) -> re.Match | None:
    return re.fullmatch(pattern, key)


# ---------------------------------------------------------------------------------------------------------- UNet
def _resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    if layer not in _UNET_RESNET:
        raise KeyError(rest)
    return f"{_UNET_RESNET[layer]}.{param}"


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel keys → ``model.diffusion_model.*`` (input/middle/output blocks)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        # diffusers' single-file loader itself only understands one count for all blocks.
        raise ValueError(f"layers_per_block must be one number for the LDM layout, got {per_block!r}")
    stride = per_block + 1  # LDM numbers every resnet and every down/upsampler as its own block
    up_has_attention = ["CrossAttn" in name for name in config["up_block_types"]]

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        if head in _UNET_TOP:
            new = f"{_UNET_TOP[head]}.{param}"
        elif m := _split(key, r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"):
            block, layer, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + block * stride + layer}.0.{_resnet(rest)}"
        elif m := _split(key, r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"):
            block, layer, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + block * stride + layer}.1.{rest}"
        elif m := _split(key, r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"):
            new = f"input_blocks.{(int(m[1]) + 1) * stride}.0.op.{m[2]}"
        elif m := _split(key, r"mid_block\.resnets\.(\d+)\.(.+)"):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := _split(key, r"mid_block\.attentions\.0\.(.+)"):
            new = f"middle_block.1.{m[1]}"
        elif m := _split(key, r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"):
            block, layer, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{block * stride + layer}.0.{_resnet(rest)}"
        elif m := _split(key, r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"):
            block, layer, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{block * stride + layer}.1.{rest}"
        elif m := _split(key, r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"):
            block = int(m[1])
            # The upsampler follows the last resnet, and its attention when the block has one.
            slot = 2 if up_has_attention[block] else 1
            new = f"output_blocks.{block * stride + per_block}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"unet key {key!r} has no LDM counterpart in this converter")
        out[UNET_PREFIX + new] = value
    return out


# ----------------------------------------------------------------------------------------------------------- VAE
def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL keys → ``first_stage_model.*``."""
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        if head in ("quant_conv", "post_quant_conv"):
            new = key
        elif m := _split(head, r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)"):
            new = f"{m[1]}.{_VAE_TOP[m[2]]}.{param}"
        elif m := _split(key, r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := _split(key, r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := _split(key, r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"):
            # LDM numbers decoder blocks from the lowest resolution up, diffusers in execution order.
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := _split(key, r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := _split(key, r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)"):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := _split(head, r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)"):
            layer = m[2]
            if layer not in _VAE_ATTENTION:
                raise KeyError(f"vae key {key!r} has no LDM counterpart in this converter")
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[layer]}.{param}"
            # The LDM attention uses 1x1 convolutions where diffusers uses linear layers.
            if param == "weight" and layer != "group_norm" and value.ndim == 2:
                value = value[:, :, None, None]
        else:
            raise KeyError(f"vae key {key!r} has no LDM counterpart in this converter")
        out[VAE_PREFIX + new] = value
    return out


# -------------------------------------------------------------------------------------------------- text encoders
def _without_text_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers 5's CLIPTextModel saves without the ``text_model.`` level, older folders with it.
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel → the original layout, which is the transformers one under ``prefix``."""
    return {prefix + k: v for k, v in _without_text_model(state).items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str = SDXL_CLIP_G_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection → OpenCLIP's layout (SDXL's CLIP-G)."""
    top = {
        "embeddings.position_embedding.weight": "positional_embedding",
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    inner = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in _without_text_model(state).items():
        if key == "text_projection.weight":
            # OpenCLIP multiplies ``x @ text_projection``; transformers stores the Linear's (out, in) weight.
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key in top:
            out[prefix + top[key]] = value
        elif m := _split(key, r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)"):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif (m := _split(key, r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")) and m[2] in inner:
            out[f"{prefix}transformer.resblocks.{m[1]}.{inner[m[2]]}.{m[3]}"] = value
        else:
            raise KeyError(f"text encoder key {key!r} has no OpenCLIP counterpart in this converter")
    for (layer, param), parts in qkv.items():
        # OpenCLIP's nn.MultiheadAttention keeps q, k and v in one in_proj, in that order.
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


# --------------------------------------------------------------------------------------------------------- whole
def pipeline_to_ldm(folder: Path | str) -> dict[str, torch.Tensor]:
    """One original-layout state dict (UNet, VAE, text encoders) from a diffusers SD1.5 or SDXL folder."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    state = unet_to_ldm(_read_component(folder / "unet"), _config(folder / "unet"))
    state.update(vae_to_ldm(_read_component(folder / "vae"), _config(folder / "vae")))
    if "text_encoder_2" in index:
        state.update(clip_to_ldm(_read_component(folder / "text_encoder"), SDXL_CLIP_L_PREFIX))
        state.update(open_clip_to_ldm(_read_component(folder / "text_encoder_2")))
    else:
        state.update(clip_to_ldm(_read_component(folder / "text_encoder"), SD15_TEXT_PREFIX))
    # Safetensors refuses views that share storage (the VAE reshapes, the CLIP-G transpose).
    return {k: v.contiguous() for k, v in state.items()}


def save_single_file(folder: Path | str, target: Path | str) -> Path:
    """Write :func:`pipeline_to_ldm` as ``.safetensors``, or for any other suffix as a torch ``{"state_dict": …}``."""
    target = Path(target)
    state = pipeline_to_ldm(folder)
    if target.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(target))
    else:
        # The layout of the original LDM training checkpoints (.ckpt): the weights under "state_dict".
        torch.save({"state_dict": state}, target)
    return target
