"""The plain LoRA file, rebuilt by ComfyUI's, A1111's and InvokeAI's formulas, is the trained UNet and text encoders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.clients import CLIENT_WEIGHTS
from tests.export.test_dora import _fresh_unet, _patched, _relative, _unet_output
from trainer.export.kohya import TE_PREFIXES
from trainer.models.loading import model_cache_dir
from trainer.models.tiny import tiny_model_dir


def _lora(trained):
    result = trained["result"]
    return load_file(str(result.final_checkpoint / f"{result.run.name}_lora.safetensors"))


def _kohya_text_names(encoder, prefix):
    """kohya's text-encoder names keep CLIP's ``text_model`` level, which transformers 5 dropped from CLIPTextModel."""
    names = {}
    for path, module in encoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            full = path if path.startswith("text_model.") else f"text_model.{path}"
            names[f"{prefix}_{full.replace('.', '_')}"] = module
    return names


@pytest.mark.parametrize("client", sorted(CLIENT_WEIGHTS))
@pytest.mark.parametrize("trained_name", ["trained_sdxl", "trained_sd15"])
def test_each_client_reproduces_the_trained_unet(client, trained_name, request):
    trained = request.getfixturevalue(trained_name)
    session = trained["session"]
    sdxl = session.models.is_sdxl
    model = session.models.source.location
    lora = _lora(trained)
    unet_part = {k: v for k, v in lora.items() if k.startswith("lora_unet_")}
    trained_out = _unet_output(session.models.unet.eval(), sdxl)
    base = _unet_output(_fresh_unet(model), sdxl)
    rebuilt = _unet_output(_patched({"model": model}, CLIENT_WEIGHTS[client], unet_part), sdxl)
    # SDXL run: fp32 file; SD1.5 run: the default fp16 file.
    assert _relative(rebuilt, trained_out, base) < (1e-4 if sdxl else 5e-3)


@pytest.mark.parametrize("client", sorted(CLIENT_WEIGHTS))
def test_each_client_reproduces_the_trained_text_encoders(client, trained_sdxl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    session, lora = trained_sdxl["session"], _lora(trained_sdxl)
    folder = tiny_model_dir("tiny-sdxl", model_cache_dir())
    ids = CLIPTokenizer.from_pretrained(folder / "tokenizer")("a photo of a red disc", return_tensors="pt").input_ids
    classes = (CLIPTextModel, CLIPTextModelWithProjection)
    for index, (prefix, cls) in enumerate(zip(TE_PREFIXES["sdxl"], classes, strict=True)):
        suffix = ".lora_down.weight"
        keys = {k[: -len(suffix)] for k in lora if k.startswith(f"{prefix}_") and k.endswith(suffix)}
        assert keys, f"the file has no {prefix} LoRA"
        fresh = cls.from_pretrained(folder / ("text_encoder" if index == 0 else "text_encoder_2")).eval()
        with torch.no_grad():
            base = fresh(ids).last_hidden_state
            modules = _kohya_text_names(fresh, prefix)
            assert keys <= set(modules), "every text-encoder module must name a CLIP layer"
            for key in keys:
                modules[key].weight.copy_(CLIENT_WEIGHTS[client](modules[key].weight, lora, key))
            rebuilt = fresh(ids).last_hidden_state
            trained = session.models.text_encoders[index].eval()(ids).last_hidden_state
        assert _relative(rebuilt, trained, base) < 1e-4
