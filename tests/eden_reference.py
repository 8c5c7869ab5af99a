"""Eden's trainer, reimplemented from its source for the tests: how it saves a run, how it loads one back.

Read in ``edenartlab/sd-lora-trainer``:
- save: ``trainer/checkpoint.py`` (``save_checkpoint``, ``convert_pytorch_lora_safetensors_to_webui``) and ``main.py``
  at 01523350e1d3ba231f17884ea5c97b1c9f0a1a1f, ``trainer/embedding_handler.py`` (``save_embeddings``) at
  0496ccdbef31eb7dd3e356f937719ad1f5779ecb, ``trainer/config.py`` at e83a7971e5547c3e802896791066f404ed1957db,
  ``trainer/preprocess.py`` (``training_attributes``) at 9ac8d69bfc3e084dd4ba37e4633e66ec7e1c462c, and the tar of
  ``predict.py`` (``<name>_eden_concept_lora_<time>.tar``).
- load: ``prepare_prompt_for_lora`` of ``trainer/inference.py`` at c01a99c17feda32b7456f81dc8378557b1515cd8 (the same
  rules as ``eden_utils/lora_utils.py`` of ``edenartlab/eden_comfy_pipelines`` at a90a4067); ``load_ti_embeddings``
  and ``TokenEmbeddingsHandler.load_embeddings``; the LoRA file rule of its ComfyUI node (``node.py`` at 2b7e174e:
  the top-level ``.safetensors`` that is not the embeddings), which its ComfyUI workflows load with *LoraLoader*.
  Its Python-side ``PeftModel.from_pretrained`` path needs ``adapter_model.safetensors``, which its own
  ``save_checkpoint`` deletes, so it reads no finished Eden folder and is not modelled here.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.adapters.lora import ADAPTER_NAME, lora_state_dict

# ================================================================================================= save side


def _eden_name(name: str) -> str:
    for char in ' /\\:*?"<>|':
        name = name.replace(char, "_")
    return name


def _scaled_peft_state(module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapter as Eden's ``get_peft_model_state_dict`` gives it, with the peft scale folded into ``lora_B``.

    Eden's kohya file stores alpha = rank (diffusers' ``convert_state_dict_to_kohya``), which is its trained scale
    with its default ``lora_alpha_multiplier`` of 1; folding the scale keeps the same weights for any multiplier.
    """
    config = module.peft_config[ADAPTER_NAME]
    scale = config.lora_alpha / config.r
    state = {}
    for key, value in lora_state_dict(module).items():
        state[prefix + key] = value * scale if ".lora_B." in key else value
    return state


def _with_text_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Eden's transformers kept the text_model level that transformers 5 dropped from CLIPTextModel.
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def _kohya_via_diffusers(pipeline_cls, folder: Path, **layers) -> dict[str, torch.Tensor]:
    """Eden's chain: diffusers' ``save_lora_weights``, then ``convert_pytorch_lora_safetensors_to_webui``."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    pipeline_cls.save_lora_weights(str(folder), **layers)
    diffusers_file = folder / "pytorch_lora_weights.safetensors"
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(str(diffusers_file))))
    diffusers_file.unlink()  # Eden's save removes it ("to_remove")
    # Eden's own fix-up: PeftModel's "base_model.model." prefix survives the conversion as "base_model_model_".
    return {key.replace("base_model_model_", ""): value for key, value in kohya.items()}


def write_eden_output(session, folder: Path, *, name: str = "eden concept", dtype: torch.dtype = torch.float32
                      ) -> Path:
    """The checkpoint folder Eden's ``main.py`` leaves for a run with the weights of ``session``.

    ``dtype``: the LoRA's storage type (Eden stores its fp32 training weights; pass our export's type to compare the
    two layouts on the very same values).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    config, models = session.config, session.models
    version = models.version
    folder.mkdir(parents=True, exist_ok=True)
    name = _eden_name(name)
    tokens = list(session.run.tokens or config.inserting_list_tokens)

    # {name}_embeddings.safetensors: the new rows of each text encoder (clip_l, clip_g), also when disable_ti.
    if session.tokens is not None:
        rows = session.tokens.rows()
    else:  # Eden inserts and saves its (untrained) tokens whatever disable_ti says
        rows = {key: torch.zeros(len(tokens), encoder.get_input_embeddings().weight.shape[1])
                for key, encoder in zip(("clip_l", "clip_g"), models.text_encoders, strict=False)}
    save_file({k: v.contiguous() for k, v in rows.items()}, str(folder / f"{name}_embeddings.safetensors"))
    (folder / "special_params.json").write_text(json.dumps({"TOK": "".join(tokens)}, indent=4))

    # The LoRA: peft -> diffusers -> save_lora_weights -> peft -> kohya, in diffusers' block names. Eden converts
    # the text encoders in the same call; with this diffusers that call mangles the UNet keys when both are present,
    # so each part goes through the chain on its own (Eden's final save passes the UNet alone).
    pipeline_cls = StableDiffusionXLPipeline if version == "sdxl" else StableDiffusionPipeline
    unet_layers = convert_state_dict_to_diffusers(_scaled_peft_state(models.unet, "base_model.model."))
    kohya = _kohya_via_diffusers(pipeline_cls, folder, unet_lora_layers=unet_layers)
    if session.te_lora:
        arguments = ("text_encoder_lora_layers", "text_encoder_2_lora_layers")
        for argument, encoder in zip(arguments, models.text_encoders, strict=False):
            layers = convert_state_dict_to_diffusers(_with_text_model(_scaled_peft_state(encoder)))
            kohya.update(_kohya_via_diffusers(pipeline_cls, folder, **{argument: layers}))
    kohya = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kohya.items()}
    save_file(kohya, str(folder / f"{name}_{version}.safetensors"))
    # peft's PeftModel.save_pretrained leaves its config (its weights file is deleted by Eden's save).
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": config.lora_rank, "lora_alpha": config.lora_rank * config.lora_alpha_multiplier,
         "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}, indent=2))

    source = models.source.location
    trigger_text = "in the style of TOK, " if config.concept_mode == "style" else "TOK, "
    training_args = {  # TrainingConfig.save_as_json: Eden's field names
        "lora_training_urls": "https://example.invalid/images.zip", "concept_mode": config.concept_mode,
        "caption_prefix": "", "caption_model": "florence", "sd_model_version": version, "ckpt_path": source,
        "pretrained_model": {"path": source, "url": None, "version": version}, "seed": session.seed,
        "resolution": config.resolution, "train_batch_size": config.train_batch_size,
        "max_train_steps": session.total_steps, "is_lora": True, "lora_rank": config.lora_rank,
        "lora_alpha_multiplier": config.lora_alpha_multiplier, "use_dora": False, "name": name,
        "output_dir": f"eden_lora_training_runs/{name}", "disable_ti": config.disable_ti, "weight_type": "bf16",
        "n_tokens": len(tokens), "inserting_list_tokens": tokens, "token_dict": {"TOK": "".join(tokens)},
        "device": "cuda:0", "text_encoder_lora_optimizer": "adamw" if session.te_lora else None,
        "training_attributes": {"n_training_imgs": len(session.dataset), "trigger_text": trigger_text,
                                "segmentation_prompt": None, "gpt_description": None,
                                "captions": [s.caption for s in session.dataset.samples],
                                "validation_prompts": ["<concept>"]},
        "job_time": 12.5,
    }
    (folder / "training_args.json").write_text(json.dumps(training_args, indent=4))
    from PIL import Image

    Image.new("RGB", (16, 16), "gray").save(folder / f"img_{session.total_steps:04d}_0.jpg")
    Image.new("RGB", (32, 32), "gray").save(folder / "validation_grid.jpg")
    return folder


def write_diffusers_lora(session, folder: Path) -> Path:
    """``pytorch_lora_weights.safetensors``, diffusers' own file, which older Eden checkpoints kept: the UNet and
    text-encoder layers of ``session`` through ``save_lora_weights`` (Eden's chain before its kohya conversion)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    models = session.models
    pipeline_cls = StableDiffusionXLPipeline if models.version == "sdxl" else StableDiffusionPipeline
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(_scaled_peft_state(models.unet))}
    if session.te_lora:
        arguments = ("text_encoder_lora_layers", "text_encoder_2_lora_layers")
        for argument, encoder in zip(arguments, models.text_encoders, strict=False):
            layers[argument] = convert_state_dict_to_diffusers(_with_text_model(_scaled_peft_state(encoder)))
    pipeline_cls.save_lora_weights(str(folder), **layers)
    return folder / "pytorch_lora_weights.safetensors"


def eden_tar(folder: Path, out_dir: Path, name: str = "eden concept", stamp: int = 1718000000) -> Path:
    """``predict.py``'s tar: the checkpoint folder's files at the top, its README and ComfyUI workflows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_eden_name(name)}_eden_concept_lora_{stamp}.tar"
    readme = out_dir / "instructions_README.md"
    readme.write_text("# Eden concept\n")
    workflow = out_dir / "inference_Eden_LoRa_txt2img.json"
    workflow.write_text("{}")
    with tarfile.open(path, "w") as tar:
        for file_path in sorted(folder.rglob("*")):
            tar.add(file_path, arcname=str(file_path.relative_to(folder)))
        tar.add(readme, arcname="README.md")
        tar.add(workflow, arcname="ComfyUI_workflows/inference_Eden_LoRa_txt2img.json")
    return path


def eden_outputs(session, root: Path) -> dict[str, Path]:
    """One Eden run of ``session``'s weights in its three forms: the checkpoint folder, Eden's tar, that folder zipped.

    The LoRA is stored in our export's type, so both layouts carry the very same values.
    """
    import zipfile

    from trainer.export.files import SAVE_DTYPES

    folder = write_eden_output(session, root / f"checkpoint-{session.total_steps}",
                               dtype=SAVE_DTYPES[session.config.save_dtype])
    zip_path = root / "eden_concept.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for entry in sorted(folder.rglob("*")):
            archive.write(entry, entry.relative_to(folder).as_posix())
    return {"folder": folder, "tar": eden_tar(folder, root / "out"), "zip": zip_path}


# ================================================================================================= load side


def replace_in_string(text: str, replacements: dict[str, str]) -> str:
    """Eden's: every key is a case-insensitive regular expression, applied again until nothing changes."""
    while True:
        replaced = False
        for target, replacement in replacements.items():
            new_text = re.sub(target, replacement, text, flags=re.IGNORECASE)
            if new_text != text:
                text, replaced = new_text, True
        if not replaced:
            return text


def fix_prompt(prompt: str) -> str:
    return replace_in_string(prompt, {r",,": ",", r"\s\s+": " ", r"\s\.": ".", r"\s,": ","})


def prepare_prompt_for_lora(prompt: str, lora_path: Path) -> str:
    """Eden's prompt preparation: the trigger text put in, then the token map applied."""
    lora_path = Path(lora_path)
    if "_no_token" in str(lora_path):
        return prompt
    if not (lora_path / "special_params.json").exists():
        raise ValueError("This concept is from an old lora trainer that was deprecated.")
    token_map = json.loads((lora_path / "special_params.json").read_text())
    training_args = json.loads((lora_path / "training_args.json").read_text())
    trigger_text = training_args["training_attributes"]["trigger_text"]  # the KeyError of issue 14
    lora_name = str(training_args.get("name", "concept"))
    wrapped = f"<{lora_name}>"
    mode = training_args.get("concept_mode", training_args.get("mode", "object"))
    if mode != "style":
        prompt = replace_in_string(prompt, {
            "<concept>": trigger_text, "<concepts>": trigger_text + "'s", wrapped: trigger_text,
            wrapped.lower(): trigger_text, lora_name: trigger_text, lora_name.lower(): trigger_text,
        })
        if trigger_text not in prompt:
            prompt = trigger_text + ", " + prompt
    else:
        prompt = replace_in_string(prompt, {
            f"in the style of {x}": "in the style of TOK"
            for x in ("<concept>", wrapped, wrapped.lower(), lora_name, lora_name.lower())
        })
        if "in the style of TOK" not in prompt:
            prompt = "in the style of TOK, " + prompt
    prompt = replace_in_string(prompt, {"<concept>": "TOK", wrapped: "TOK"})
    prompt = replace_in_string(prompt, token_map)
    return fix_prompt(prompt)


def embeddings_file(lora_path: Path) -> Path:
    """``load_ti_embeddings``: the first directory entry ending in ``embeddings.safetensors`` (IndexError if none)."""
    names = [f for f in os.listdir(lora_path) if f.endswith("embeddings.safetensors")]
    return Path(lora_path) / names[0]


def load_ti_embeddings(pipe, lora_path: Path) -> list[str]:
    """``TokenEmbeddingsHandler.load_embeddings``: rows named ``<s0>``, ``<s1>``, ... added to every tokenizer."""
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    tokenizers = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)]
    tokens: list[str] = []
    with open(embeddings_file(lora_path), "rb") as handle:
        from safetensors.torch import load

        data = load(handle.read())
    for index, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers, strict=True)):
        if encoder is None:
            continue
        key = ("clip_l", "clip_g")[index]
        loaded = data[key] if key in data else data[f"text_encoders_{index}"]
        tokens = [f"<s{i}>" for i in range(loaded.shape[0])]
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
        encoder.resize_token_embeddings(len(tokenizer))
        ids = tokenizer.convert_tokens_to_ids(tokens)
        with torch.no_grad():
            encoder.get_input_embeddings().weight.data[ids] = loaded.to(encoder.dtype)
    return tokens


def lora_file(lora_path: Path) -> Path:
    """The node's rule: of the top-level ``.safetensors`` files, the one that is not the embeddings."""
    paths = [Path(lora_path) / f for f in os.listdir(lora_path) if f.endswith(".safetensors")]
    found = [p for p in paths if "_embeddings.safetensors" not in p.name]
    assert len(found) == 1, f"Eden's node takes one LoRA file, found {found}"
    return found[0]
