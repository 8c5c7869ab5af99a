"""Export of a training state into a folder of standard files, and the delivered zip.

The zip holds, at its top level:

| file | what |
|---|---|
| ``<name>_lora.safetensors`` | UNet (and text-encoder) LoRA or DoRA in kohya form, true alpha, kohya/A1111 metadata |
| ``<name>_embeddings.safetensors`` | the tokens' vectors: ``clip_l`` (SD1.5), ``clip_l`` + ``clip_g`` (SDXL) |
| ``invokeai/<name>_embeddings.safetensors`` | SD1.5 only: the same vectors under ``emb_params``, for InvokeAI |
| ``special_params.json`` | maps the trigger (``TOK``) to the token string (``<s0><s1><s2>``) |
| ``training_args.json`` | the resolved configuration (base model, seed, everything) |
| ``README.md`` | how to use the files in ComfyUI, A1111/Forge, InvokeAI, diffusers and our predictor |
| ``unet/`` | full UNet weights instead of a LoRA when ``is_lora`` is false |
| ``samples/`` | sample images and their grid |
| ``loss.csv``, ``loss.png`` | the loss log and plot |
| ``dataset_preview.jpg`` | contact sheet of the prepared training images (crops, captions, masks) |
| ``evaluation/`` | checkpoint scores, when ``evaluate_checkpoints`` is on |
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.adapters.lora import lora_state_dict
from trainer.device import EXAMPLE_ACCELERATOR as ACCELERATOR
from trainer.export import files
from trainer.export.kohya import TE_PREFIXES, UNET_PREFIX, peft_to_kohya
from trainer.utils.atomic import atomic_path, atomic_write_text


@dataclass
class ExportSpec:
    name: str
    version: str
    """sdxl or sd15"""
    rank: int
    alpha: float
    te_rank: int
    te_alpha: float
    resolution: tuple[int, int]
    n_images: int
    captions: list[str]
    base_model: str
    """The base model as the run named it (hub id, path or redacted URL): ``base_model_name`` is what is shown."""
    token_dict: dict[str, str]
    tokens: list[str]
    training_args: dict
    save_dtype: torch.dtype = torch.float16
    base_model_kind: str = "hub"
    """How the base model was given (``trainer.models.loading.ModelSource.kind``)."""

    @property
    def base_model_name(self) -> str:
        return files.model_name(self.base_model_kind, self.base_model)


def collect_lora(unet, text_encoders: list, spec: ExportSpec, *, unet_lora: bool, te_lora: bool) -> dict:
    state: dict[str, torch.Tensor] = {}
    if unet_lora:
        layers = unet.config.layers_per_block if spec.version == "sdxl" else None
        if isinstance(layers, (list, tuple)):
            raise ValueError("SGM names need the same layers_per_block in every block")
        state.update(peft_to_kohya(lora_state_dict(unet), UNET_PREFIX, spec.alpha, sgm_layers_per_block=layers,
                                   dtype=spec.save_dtype))
    if te_lora:
        for prefix, encoder in zip(TE_PREFIXES[spec.version], text_encoders, strict=False):
            state.update(peft_to_kohya(lora_state_dict(encoder), prefix, spec.te_alpha, dtype=spec.save_dtype,
                                       text_encoder=True))
    return state


def write_export(folder: Path, spec: ExportSpec, *, unet, text_encoders: list, token_rows: dict | None,
                 unet_lora: bool, te_lora: bool, full_unet: bool) -> dict[str, Path]:
    """Write the standard files of one trained state into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if unet_lora or te_lora:
        state = collect_lora(unet, text_encoders, spec, unet_lora=unet_lora, te_lora=te_lora)
        metadata = files.lora_metadata(
            name=spec.name, version=spec.version, rank=spec.rank, alpha=spec.alpha, resolution=spec.resolution,
            n_images=spec.n_images, captions=spec.captions, state=state, base_model_name=spec.base_model_name,
            trigger_tokens="".join(spec.tokens), te_rank=spec.te_rank, te_alpha=spec.te_alpha,
        )
        written["lora"] = files.write_lora(folder, spec.name, state, metadata)
    if full_unet:
        unet_dir = folder / files.FULL_UNET_DIR
        unet.save_pretrained(unet_dir, safe_serialization=True)
        written["unet"] = unet_dir
    if token_rows:
        metadata = files.embeddings_metadata(name=spec.name, version=spec.version, tokens=spec.tokens)
        written.update(files.write_embeddings(folder, spec.name, spec.version, list(token_rows.values()), metadata))
    written["special_params"] = files.write_special_params(folder, spec.token_dict)
    path = folder / files.TRAINING_ARGS
    atomic_write_text(path, json.dumps(spec.training_args, indent=2) + "\n")
    written["training_args"] = path
    return written


PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}


def _base_model_lines(spec: ExportSpec, pipeline: str, full_unet: bool) -> list[str]:
    """The line that loads the base model, as the user will have it: a hub id, or a file or folder of theirs."""
    unet = "unet=unet, " if full_unet else ""
    if spec.base_model_kind in ("single_file", "url"):
        return ["# The base model file the LoRA was trained on: give its path or URL.",
                f'pipe = {pipeline}.from_single_file("{spec.base_model_name}", {unet}torch_dtype=torch.float16)']
    lines = ["# The base model's folder: give its path."] if spec.base_model_kind == "diffusers_dir" else []
    return [*lines, f'pipe = {pipeline}.from_pretrained("{spec.base_model_name}", {unet}torch_dtype=torch.float16)']


def diffusers_snippet(spec: ExportSpec, has_lora: bool, has_embeddings: bool, full_unet: bool) -> list[str]:
    """Python lines that load this zip's files into diffusers, run from the unpacked zip's folder."""
    name, sdxl = spec.name, spec.version == "sdxl"
    pipeline = PIPELINES[spec.version]
    emb = f"{name}{files.EMBEDDINGS_SUFFIX}"
    keys = files.EMBEDDING_KEYS[spec.version]
    trigger = next(iter(spec.token_dict), "TOK")
    prompt_tokens = "".join(spec.tokens) if has_embeddings else trigger
    lines = ["import torch", f"from diffusers import {pipeline}"]
    if full_unet:
        lines.append("from diffusers import UNet2DConditionModel")
    if has_embeddings:
        lines.append("from safetensors.torch import load_file")
    lines.append("")
    if full_unet:
        lines.append('unet = UNet2DConditionModel.from_pretrained("unet", torch_dtype=torch.float16)')
    lines += _base_model_lines(spec, pipeline, full_unet)
    lines.append(f'pipe = pipe.to("{ACCELERATOR}")')
    if has_lora:
        lines.append(f'pipe.load_lora_weights(".", weight_name="{name}{files.LORA_SUFFIX}")')
    if has_embeddings:
        token_list = json.dumps(spec.tokens)
        lines.append(f'emb = load_file("{emb}")')
        if sdxl:
            lines += [
                "# One tensor per text encoder, one vector per token. (By path, load_textual_inversion refuses this",
                "# file: \"Loaded state dictionary is incorrect\"; it wants one tensor per file.)",
                f'pipe.load_textual_inversion(emb["{keys[0]}"], token={token_list}, text_encoder=pipe.text_encoder, '
                "tokenizer=pipe.tokenizer)",
                f'pipe.load_textual_inversion(emb["{keys[1]}"], token={token_list}, text_encoder=pipe.text_encoder_2, '
                "tokenizer=pipe.tokenizer_2)",
                "# Pool CLIP at the end-of-text token, as training, ComfyUI and A1111 do: SDXL's text encoder configs",
                "# carry the legacy eos_token_id=2, with which transformers pools at the largest id: a new token.",
                "for encoder in (pipe.text_encoder, pipe.text_encoder_2):",
                "    encoder.config.eos_token_id = 49407",
                "    for module in (encoder, getattr(encoder, \"text_model\", None)):  # transformers 5 / 4",
                "        if hasattr(module, \"eos_token_id\"):",
                "            module.eos_token_id = 49407",
            ]
        else:
            lines += [
                "# One vector per token, loaded as the tokens written in the prompt. (By path, load_textual_inversion",
                f"# makes one multi-vector token instead: token=\"{spec.tokens[0]}\" adds {spec.tokens[0]}, "
                f"{spec.tokens[0]}_1, ... and the prompt must say {spec.tokens[0]} alone.)",
                f'pipe.load_textual_inversion(emb["{keys[0]}"], token={token_list})',
            ]
    scale = ', cross_attention_kwargs={"scale": 1.0}' if has_lora else ""
    lines += [f'image = pipe("a photo of {prompt_tokens}"{scale}).images[0]', 'image.save("sample.png")']
    return lines


def usage_readme(spec: ExportSpec, has_lora: bool, has_embeddings: bool, full_unet: bool) -> str:
    name = spec.name
    trigger = next(iter(spec.token_dict), "TOK")
    tokens = spec.token_dict.get(trigger, "")
    emb = f"{name}_embeddings"
    is_dora = has_lora and bool(spec.training_args.get("use_dora"))
    emb_files = files.embedding_files(spec.version, len(spec.tokens)) if has_embeddings else ()
    invokeai_copy = next((f"{f.folder}/{emb}.safetensors" for f in emb_files if f.folder == files.INVOKEAI_DIR), None)
    lines = [
        f"# {name}",
        "",
        f"{'An SDXL' if spec.version == 'sdxl' else 'A Stable Diffusion 1.5'} concept trained with pivotal tuning "
        f"(base model: `{spec.base_model_name}`).",
        "",
        "## Files",
        "",
        "| file | what |",
        "|---|---|",
    ]
    if has_lora:
        kind = "a DoRA (weight-decomposed LoRA), kohya/LyCORIS format" if is_dora else "the LoRA (kohya format)"
        lines.append(f"| `{name}_lora.safetensors` | {kind} |")
    if full_unet:
        lines.append("| `unet/` | the fine-tuned UNet (diffusers format) |")
    for emb_file in emb_files:
        keys = ", ".join(f"`{k}`" for k in emb_file.keys)
        if emb_file.folder == files.INVOKEAI_DIR:
            lines.append(f"| `{emb_file.folder}/{emb}.safetensors` | the same vectors under {keys}, for InvokeAI |")
        else:
            lines.append(f"| `{emb}.safetensors` | the trained token vectors ({keys}) |")
    if not has_embeddings:
        lines.append(f"| `{emb}.safetensors` | no vectors (0 rows): no tokens were trained; it is there because "
                     "Eden's loaders expect an embeddings file, other tools need not load it |")
    lines += [
        f"| `special_params.json` | `{trigger}` → `{tokens}` |",
        "| `training_args.json` | every training setting |",
        "",
        "## What to write instead of TOK",
        "",
    ]
    if has_embeddings:
        lines += [
            f"Training captions used `{trigger}` for the new concept. Where you load the files, write:",
            "",
            f"- **ComfyUI**: copy `{emb}.safetensors` to `models/embeddings` and the LoRA to `models/loras`; load "
            f"the LoRA with a *LoraLoader* node and write `embedding:{emb}` where the prompt had `{trigger}`.",
            f"- **A1111 / Forge**: copy `{emb}.safetensors` to `embeddings/` and the LoRA to `models/Lora`; write "
            f"`{emb}` where the prompt had `{trigger}` and add `<lora:{name}_lora:1>`.",
            f"- **InvokeAI**: install `{name}_lora.safetensors` and `{invokeai_copy or emb + '.safetensors'}` in "
            "the Model Manager (*Add Models*, *URL or Local Path*, or *Scan Folder* on the unpacked zip); pick the "
            f"LoRA in the generation settings' LoRA section and write `<{emb}>` (the embedding's model name, which "
            f"is its file name, in angle brackets) where the prompt had `{trigger}`.",
        ]
        if invokeai_copy:
            lines += [
                f"  Use the copy in `{files.INVOKEAI_DIR}/`, not the top-level `{emb}.safetensors` (*Scan Folder* "
                "lists both). Why two files: InvokeAI reads the width of a single-tensor embedding from its row "
                "count unless the tensor is named `emb_params`, so it cannot classify the top-level file "
                "(`clip_l`, the name Eden's tools need); the copy holds the same vectors under `emb_params` and has "
                "the same file name, so the trigger is the same.",
            ]
        lines += [
            f"- **diffusers**: load the tokens as `{tokens}` (see below) and write `{tokens}` in the prompt.",
            f"- **our predictor**: write `{trigger}`; it is replaced for you.",
        ]
    else:
        lines += [f"No new tokens were trained: write `{trigger}` as a plain word in the prompt."]
    if full_unet and not has_lora:
        lines += ["", "The UNet is fully fine-tuned (`unet/`): ComfyUI, A1111 and InvokeAI need it converted to a "
                      "checkpoint first; diffusers and our predictor load it as it is."]
    lines += ["", "## diffusers", "", "Run from the unpacked zip's folder:", "", "```python"]
    lines += diffusers_snippet(spec, has_lora, has_embeddings, full_unet)
    lines += ["```", ""]
    if is_dora:
        lines += [
            "This LoRA is a DoRA. diffusers' `load_lora_weights` drops its `dora_scale` tensors (it logs \"a DoRA "
            "checkpoint that is not compatible in Diffusers\") and applies the LoRA direction alone, which is not the "
            "trained model. ComfyUI, A1111/Forge, InvokeAI and our predictor apply it exactly.",
            "",
        ]
    lines += [
        "## Our predictor",
        "",
        "Give this zip's URL as the predictor's weights (`COG_WEIGHTS`) or as `lora_url`, and write `TOK` in the "
        "prompt. It reads `training_args.json` for the base model and `special_params.json` for the tokens.",
        "",
    ]
    return "\n".join(lines)


def write_zip(zip_path: Path, checkpoint: Path, extras: dict[str, Path], readme: str,
              leave_out: frozenset[str] = frozenset()) -> Path:
    """Zip the final checkpoint's files (less those named in ``leave_out``) plus extras (samples, loss log,
    evaluation) atomically."""
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in sorted(checkpoint.rglob("*")):
            if entry.is_file() and entry.name not in leave_out:
                archive.write(entry, entry.relative_to(checkpoint).as_posix())
        for arcname, source in extras.items():
            source = Path(source)
            if source.is_dir():
                for entry in sorted(source.rglob("*")):
                    if entry.is_file():
                        archive.write(entry, f"{arcname}/{entry.relative_to(source).as_posix()}")
            elif source.is_file():
                archive.write(source, arcname)
        archive.writestr("README.md", readme)
    return zip_path
