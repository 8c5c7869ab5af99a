"""A trained DoRA, exported, is the trained UNet in ComfyUI, A1111 and InvokeAI; diffusers drops its magnitudes.

Each client's rebuild (tests/clients.py, from its source) patches a fresh copy of the base UNet; its output is
compared with the trained UNet's, relative to the change the DoRA makes.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from tests.clients import CLIENT_WEIGHTS, comfyui_patched_weight
from tests.helpers import make_concept_images, prepared_dataset, tiny_config
from trainer.inference.dora import _kohya_names
from trainer.models.loading import model_cache_dir
from trainer.models.tiny import tiny_model_dir
from trainer.training import loop
from trainer.training.session import setup


@pytest.fixture(scope="module", params=[("tiny-sd15", "fp32"), ("tiny-sdxl", "fp16")], ids=["sd15-fp32", "sdxl-fp16"])
def dora_run(request, tmp_path_factory, model_cache):
    model, save_dtype = request.param
    root = tmp_path_factory.mktemp(f"dora-{model}")
    images = make_concept_images(root / "images", n=2)
    config = tiny_config(images, root / "runs", model=model, use_dora=True, unet_lr=2e-2, max_train_steps=4,
                         save_dtype=save_dtype, disable_ti=True, lora_alpha_multiplier=2.0)
    session, _ = setup(config, dataset=prepared_dataset(images, root / "prepared"))
    result = loop.run(session, make_zip=False)
    path = next(result.final_checkpoint.glob("*_lora.safetensors"))
    return {"session": session, "lora": load_file(str(path)), "path": path, "model": model, "save_dtype": save_dtype}


def _fresh_unet(model: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model_dir(model, model_cache_dir()) / "unet").eval()


def _unet_output(unet, sdxl: bool):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)}
    with torch.no_grad():
        return unet(latents, torch.tensor([100, 700]), text, **kwargs).sample


def _patched(run, rebuild, state):
    unet = _fresh_unet(run["model"])
    version = "sdxl" if run["model"] == "tiny-sdxl" else "sd15"
    modules = _kohya_names(unet, version)
    names = {k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")}
    assert names and names <= set(modules), "every LoRA module must name a UNet layer"
    with torch.no_grad():
        for name in names:
            layer = modules[name]
            layer.weight.copy_(rebuild(layer.weight, state, name))
    return unet


def _relative(a, b, base):
    return ((a - b).norm() / (b - base).norm()).item()


@pytest.mark.parametrize("client", sorted(CLIENT_WEIGHTS))
def test_each_client_reproduces_the_trained_unet(dora_run, client):
    session, lora = dora_run["session"], dora_run["lora"]
    sdxl = dora_run["model"] == "tiny-sdxl"
    scales = [v for k, v in lora.items() if k.endswith(".dora_scale")]
    assert len(scales) > 10 and all(v.dtype == torch.float32 for v in scales), "dora_scale must be stored in fp32"
    assert all(v.shape[0] == 1 for v in scales), "dora_scale on the input axis: [1, in]"
    session.models.unet.eval()
    trained = _unet_output(session.models.unet, sdxl)
    base = _unet_output(_fresh_unet(dora_run["model"]), sdxl)
    rebuilt = _unet_output(_patched(dora_run, CLIENT_WEIGHTS[client], lora), sdxl)
    assert (trained - base).norm() > 1e-3 * base.norm(), "the DoRA must change the UNet"
    # fp32 file: float error only (measured ~6e-6); fp16 file: the LoRA matrices' fp16 rounding (~6e-5), with
    # dora_scale itself in fp32.
    tolerance = 1e-4 if dora_run["save_dtype"] == "fp32" else 1e-3
    assert _relative(rebuilt, trained, base) < tolerance


def test_dropping_the_magnitudes_is_far_from_the_trained_unet(dora_run):
    """What diffusers does (next test): the LoRA direction alone is not the trained model."""
    session, lora = dora_run["session"], dora_run["lora"]
    sdxl = dora_run["model"] == "tiny-sdxl"
    plain = {k: v for k, v in lora.items() if not k.endswith(".dora_scale")}
    trained = _unet_output(session.models.unet.eval(), sdxl)
    base = _unet_output(_fresh_unet(dora_run["model"]), sdxl)
    direction_only = _unet_output(_patched(dora_run, comfyui_patched_weight, plain), sdxl)
    assert _relative(direction_only, trained, base) > 0.05


def test_diffusers_drops_dora_scale_with_a_warning(dora_run, caplog):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    sdxl = dora_run["model"] == "tiny-sdxl"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(tiny_model_dir(dora_run["model"], model_cache_dir()))
    diffusers_logging.enable_propagation()
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    try:
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(dict(dora_run["lora"]))
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.disable_propagation()
    assert "DoRA checkpoint that is not compatible in Diffusers" in caplog.text
    plain = {k: v for k, v in dora_run["lora"].items() if not k.endswith(".dora_scale")}
    expected = _unet_output(_patched(dora_run, comfyui_patched_weight, plain), sdxl)
    torch.testing.assert_close(_unet_output(pipe.unet.eval(), sdxl), expected, rtol=1e-3, atol=1e-4)


def test_the_file_says_it_is_a_dora(dora_run):
    from safetensors import safe_open

    with safe_open(str(dora_run["path"]), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["dora_wd"] == "True"
