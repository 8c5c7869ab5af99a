"""What Eden's generation-side code reads from a trained folder, written into ours.

Eden's trainer (``edenartlab/sd-lora-trainer``) writes ``special_params.json`` as its token map (``{"TOK":
"<s0><s1><s2>"}``, the same file and meaning as ours) and keeps the rest in ``training_args.json``. Its prompt
preparation (``prepare_prompt_for_lora`` in ``trainer/inference.py`` and in the ComfyUI nodes of
``eden_comfy_pipelines``) reads ``training_args["training_attributes"]["trigger_text"]``, ``name`` and
``concept_mode`` there, and its token loading (``load_ti_embeddings``) takes the first file whose name ends in
``embeddings.safetensors``, with no fallback when there is none. So every run of ours records Eden's
``training_attributes`` and, when no tokens were trained (``disable_ti``), ships an embeddings file holding zero
vectors: Eden's loader then adds no token and the trigger stays the plain word the LoRA was trained with.
"""

from __future__ import annotations

import torch

from trainer.adapters.tokens import ENCODER_KEYS
from trainer.data.captions import STYLE_TEMPLATE, contains_trigger, normalise_whitespace


def eden_trigger_text(trigger: str, concept_mode: str, caption_prefix: str = "") -> str:
    """The caption lead-in that Eden records as ``trigger_text`` (its ``post_process_captions`` without GPT).

    A prefix that names the trigger is the trigger text itself; otherwise Eden leads with ``"TOK, "`` (face, object)
    or ``"in the style of TOK, "`` (style). Eden's ``prepare_prompt_for_lora`` puts it before any prompt that lacks
    it, then replaces the trigger by its tokens.
    """
    prefix = normalise_whitespace(caption_prefix)
    if prefix and contains_trigger(prefix, trigger):
        return prefix
    lead = STYLE_TEMPLATE.format(trigger=trigger) if concept_mode == "style" else trigger
    return f"{lead}, {prefix}" if prefix else f"{lead}, "


def eden_training_attributes(config, captions: list[str], n_images: int) -> dict:
    """``training_attributes`` as Eden's pre-processing fills them, over whatever the config already carried."""
    attributes = dict(config.training_attributes or {})
    attributes.update({
        "n_training_imgs": n_images,
        "trigger_text": eden_trigger_text(config.trigger, config.concept_mode, config.caption_prefix),
        "segmentation_prompt": config.mask_target_prompts,
        "gpt_description": attributes.get("gpt_description"),
        "captions": list(captions),
    })
    return attributes


def empty_token_rows(text_encoders: list) -> dict[str, torch.Tensor]:
    """Zero new vectors per text encoder, keyed like trained ones: the embeddings file of a run without tokens."""
    rows = {}
    for index, encoder in enumerate(text_encoders):
        width = encoder.get_input_embeddings().weight.shape[1]
        rows[ENCODER_KEYS[index]] = torch.zeros(0, width, dtype=torch.float32)
    return rows
