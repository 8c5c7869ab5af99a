"""The exported files load into a fresh diffusers pipeline and reproduce the trained model."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.helpers import fresh_pipeline


def _load_exported(pipe, result, tokens):
    name = result.run.name
    final = result.final_checkpoint
    pipe.load_lora_weights(str(final), weight_name=f"{name}_lora.safetensors")
    embeddings = load_file(str(final / f"{name}_embeddings.safetensors"))
    if "clip_g" in embeddings:
        pipe.load_textual_inversion(embeddings["clip_l"], token=tokens, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(embeddings["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    else:  # SD1.5: the text encoder's name, which Eden's loader needs (InvokeAI's copy is in invokeai/)
        assert set(embeddings) == {"clip_l"}
        pipe.load_textual_inversion(embeddings["clip_l"], token=tokens)


def _lora_layers(unet) -> set[str]:
    return {name for name, module in unet.named_modules() if hasattr(module, "lora_A") and module.lora_A}


def _assert_every_trained_layer_loaded(session, pipe):
    """diffusers' kohya loader puts a LoRA on exactly the layers that trained one, the ResNet conv2 layers (Eden's
    targets) included: none is dropped, so the output match below is not a near miss."""
    trained = _lora_layers(session.models.unet)
    assert any(name.endswith(".conv2") for name in trained)
    assert _lora_layers(pipe.unet) == trained


def _unet_inputs(session, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([100, 700])
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    return latents, timesteps, time_ids


def _trained_output(session, prompt):
    session.models.unet.eval()
    ids = session.text.token_ids([prompt, prompt])
    with torch.no_grad():
        prompt_embeds, pooled = session.text.encode_ids(ids)
        latents, timesteps, time_ids = _unet_inputs(session)
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}} if pooled is not None else {}
        return prompt_embeds, session.models.unet(latents, timesteps, prompt_embeds, **kwargs).sample


def _fresh_output(session, pipe, prompt):
    with torch.no_grad():
        if session.models.is_sdxl:
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=2,
                                                             do_classifier_free_guidance=False)
        else:
            prompt_embeds, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=2,
                                                  do_classifier_free_guidance=False)
            pooled = None
        latents, timesteps, time_ids = _unet_inputs(session)
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}} if pooled is not None else {}
        return prompt_embeds, pipe.unet(latents, timesteps, prompt_embeds, **kwargs).sample


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_sdxl_lora_te_lora_and_embeddings_round_trip_through_diffusers(trained_sdxl):
    session, result = trained_sdxl["session"], trained_sdxl["result"]
    prompt = "a photo of <s0><s1> on a table"
    trained_embeds, trained_out = _trained_output(session, prompt)

    pipe = fresh_pipeline(session)
    _, base_out = _fresh_output(session, pipe, "a photo of on a table")
    _load_exported(pipe, result, ["<s0>", "<s1>"])
    _assert_every_trained_layer_loaded(session, pipe)
    fresh_embeds, fresh_out = _fresh_output(session, pipe, prompt)

    # Saved in fp32 (save_dtype), so the reload is exact up to float reassociation.
    assert _relative_error(fresh_embeds, trained_embeds) < 1e-5
    assert _relative_error(fresh_out, trained_out) < 1e-4
    # And the trained model is really different from the base model.
    assert _relative_error(base_out, trained_out) > 1e-3


def test_sd15_default_fp16_export_round_trips_within_tolerance(trained_sd15):
    session, result = trained_sd15["session"], trained_sd15["result"]
    prompt = "a cat, in the style of <s0><s1>"
    trained_embeds, trained_out = _trained_output(session, prompt)
    pipe = fresh_pipeline(session)
    _, base_out = _fresh_output(session, pipe, prompt.replace("<s0><s1>", ""))
    _load_exported(pipe, result, ["<s0>", "<s1>"])
    _assert_every_trained_layer_loaded(session, pipe)
    fresh_embeds, fresh_out = _fresh_output(session, pipe, prompt)
    assert _relative_error(fresh_embeds, trained_embeds) < 1e-5  # embeddings are saved in fp32
    assert _relative_error(fresh_out, trained_out) < 5e-3  # LoRA in fp16
    assert _relative_error(base_out, trained_out) > 1e-3


def test_sd15_lora_uses_diffusers_block_names(trained_sd15):
    result = trained_sd15["result"]
    lora = load_file(str(result.final_checkpoint / f"{result.run.name}_lora.safetensors"))
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k") for k in lora)
    assert all(v.dtype == torch.float16 for v in lora.values())
