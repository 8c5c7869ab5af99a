"""The SDXL refiner is found and loaded like a base model: hub id, diffusers folder, single file, URL.

The single-file refiner is made offline from the tiny refiner folder in the SGM layout of
``sd_xl_refiner_1.0.safetensors`` (OpenCLIP-G as conditioner embedder 0, no CLIP-L); loading it must give the same
UNet as the folder.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.models.ldm_format import (
    _config,
    _read_component,
    open_clip_to_ldm,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)
from trainer.models.loading import load_models, resolve_source
from trainer.models.refiner import ENV_REFINER, RefinerSource, load_refiner, resolve_refiner
from trainer.models.tiny import TINY_REFINER, tiny_model_dir
from trainer.tooling.cog_client import FileServer
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS

REFINER_CLIP_G = "conditioner.embedders.0.model."


@pytest.fixture(scope="module")
def base(model_cache):
    return load_models(resolve_source("tiny-sdxl", None, None, model_cache), cache_dir=model_cache)


@pytest.fixture(scope="module")
def refiner_folder(model_cache):
    return tiny_model_dir(TINY_REFINER, model_cache)


@pytest.fixture(scope="module")
def refiner_file(refiner_folder, tmp_path_factory):
    state = unet_to_ldm(_read_component(refiner_folder / "unet"), _config(refiner_folder / "unet"))
    state.update(vae_to_ldm(_read_component(refiner_folder / "vae"), _config(refiner_folder / "vae")))
    state.update(open_clip_to_ldm(_read_component(refiner_folder / "text_encoder_2"), prefix=REFINER_CLIP_G))
    path = tmp_path_factory.mktemp("refiner-file") / "sd_xl_refiner_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _load(source, base, cache, **kwargs):
    return load_refiner(source, vae=base.vae, text_encoder_2=base.text_encoders[1], dtype=torch.float32,
                        cache_dir=cache, **kwargs)


def test_locations_resolve_like_base_models(refiner_folder, refiner_file, monkeypatch):
    monkeypatch.delenv(ENV_REFINER, raising=False)
    assert resolve_refiner() == RefinerSource("hub", "stabilityai/stable-diffusion-xl-refiner-1.0")
    monkeypatch.setenv(ENV_REFINER, str(refiner_folder))
    assert resolve_refiner() == RefinerSource("diffusers_dir", str(refiner_folder))
    assert resolve_refiner(str(refiner_file)).kind == "single_file", "the set-up setting wins over the variable"
    assert resolve_refiner("https://example.com/r.safetensors?sig=1").describe() == "https://example.com/r.safetensors?…"
    assert resolve_refiner(TINY_REFINER).kind == "tiny"
    with pytest.raises(ValueError, match=f"{ENV_REFINER} 'no such thing' is not an existing file or folder"):
        resolve_refiner("no such thing")


def test_a_folder_refiner_wraps_the_base_modules(base, refiner_folder, model_cache):
    refiner = _load(RefinerSource("diffusers_dir", str(refiner_folder)), base, model_cache)
    assert refiner.vae is base.vae and refiner.text_encoder_2 is base.text_encoders[1]
    assert refiner.text_encoder is None and refiner.watermark is None
    assert refiner.tokenizer_2 is not base.tokenizers[1], "its own tokenizer, without any trained tokens"


def test_a_single_file_refiner_loads_the_same_unet(base, refiner_folder, refiner_file, model_cache):
    folder = _load(RefinerSource("diffusers_dir", str(refiner_folder)), base, model_cache)
    single = _load(RefinerSource("single_file", str(refiner_file)), base, model_cache,
                   single_file_config=str(refiner_folder))
    reference = folder.unet.state_dict()
    loaded = single.unet.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key
    assert single.vae is base.vae


def test_a_refiner_url_is_downloaded_once_into_the_cache(base, refiner_folder, refiner_file, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / refiner_file.name).write_bytes(refiner_file.read_bytes())
    with FileServer(served) as server:
        # The operator's URL goes through the guarded client like any other: this server is allowed by name.
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, server.address)
        url = server.url(refiner_file.name)
        first = _load(resolve_refiner(url), base, tmp_path / "cache", single_file_config=str(refiner_folder))
        # Gone from the server: a second load can only come from the cache.
        (served / refiner_file.name).unlink()
        second = _load(resolve_refiner(url), base, tmp_path / "cache", single_file_config=str(refiner_folder))
    assert [p.name for p in (tmp_path / "cache" / "downloads").rglob("*.safetensors")] == [refiner_file.name]
    for key, value in first.unet.state_dict().items():
        assert torch.equal(second.unet.state_dict()[key], value), key


def test_a_refiner_url_that_is_not_a_refiner_leaves_nothing_in_the_cache(base, model_cache, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    save_single_file(tiny_model_dir("tiny-sdxl", model_cache), served / "base.safetensors")
    with FileServer(served) as server:
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, server.address)
        with pytest.raises(ValueError, match=r"base\.safetensors is not an SDXL refiner checkpoint"):
            _load(resolve_refiner(server.url("base.safetensors")), base, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_a_refiner_url_at_an_internal_address_is_refused_without_the_allowance(base, tmp_path, monkeypatch):
    """The operator's URL goes through the same guarded client as a request's: no exception for internal hosts."""
    monkeypatch.delenv(ENV_ALLOW_PRIVATE_HOSTS, raising=False)
    with pytest.raises(ValueError, match=r"169\.254\.169\.254 is a link-local address"):
        _load(resolve_refiner("http://169.254.169.254/refiner.safetensors"), base, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_a_base_model_is_not_a_refiner(base, model_cache, tmp_path):
    with pytest.raises(ValueError, match="is a StableDiffusionXLPipeline model, not an SDXL refiner"):
        _load(RefinerSource("diffusers_dir", str(tiny_model_dir("tiny-sdxl", model_cache))), base, model_cache)
    base_file = save_single_file(tiny_model_dir("tiny-sdxl", model_cache), tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match=r"base\.safetensors is not an SDXL refiner checkpoint"):
        _load(RefinerSource("single_file", str(base_file)), base, model_cache)


def test_a_refiner_that_does_not_fit_the_base_model_is_refused(refiner_folder, model_cache):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sdxl = load_models(resolve_source("tiny-sdxl", None, None, model_cache), cache_dir=model_cache)
    wider = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=48, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=4,
                                                       projection_dim=48))
    with pytest.raises(ValueError, match="does not fit this base model: its UNet's cross_attention_dim is 32, the "
                                         "second text encoder's width gives 48"):
        load_refiner(RefinerSource("diffusers_dir", str(refiner_folder)), vae=sdxl.vae, text_encoder_2=wider,
                     dtype=torch.float32, cache_dir=model_cache)
