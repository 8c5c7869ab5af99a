"""Model sources: what each config names, loading through one path, and errors for everything else."""

from __future__ import annotations

import json

import pytest

from trainer.models.loading import (
    DEFAULT_MODELS,
    fix_eos_token_id,
    load_models,
    model_cache_dir,
    resolve_source,
)
from trainer.models.tiny import tiny_model_dir


@pytest.fixture
def cache(model_cache):
    return model_cache_dir()


def test_sources_are_recognised(tmp_path, cache):
    folder = tiny_model_dir("tiny-sd15", cache)
    assert resolve_source("tiny-sd15", None, None, cache).kind == "tiny"
    assert resolve_source(str(folder), None, None, cache).kind == "diffusers_dir"
    assert resolve_source("https://example.com/m.safetensors", None, None, cache).kind == "url"
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"x")
    assert resolve_source(str(checkpoint), None, None, cache).kind == "single_file"
    hub = resolve_source("stabilityai/stable-diffusion-xl-base-1.0", None, None, cache)
    assert hub.kind == "hub"


def test_defaults_follow_sd_model_version(cache, monkeypatch):
    monkeypatch.delenv("TRAINER_SDXL_MODEL", raising=False)
    assert resolve_source(None, None, None, cache).location == DEFAULT_MODELS["sdxl"]
    assert resolve_source(None, None, "sd15", cache).location == DEFAULT_MODELS["sd15"]
    monkeypatch.setenv("TRAINER_SDXL_MODEL", "tiny-sdxl")
    assert resolve_source(None, None, "sdxl", cache).kind == "tiny"


def test_the_operators_default_may_be_a_local_folder_whoever_asks(cache, monkeypatch):
    """TRAINER_SDXL_MODEL is the operator's: a request that names no model gets it even when requests may not name
    local paths themselves."""
    folder = tiny_model_dir("tiny-sdxl", cache)
    monkeypatch.setenv("TRAINER_SDXL_MODEL", str(folder))
    source = resolve_source(None, None, "sdxl", cache, local_paths=False)
    assert (source.kind, source.location) == ("diffusers_dir", str(folder))
    with pytest.raises(ValueError, match="local paths are not accepted here"):
        resolve_source(str(folder), None, "sdxl", cache, local_paths=False)


def test_eden_pretrained_model_dicts(tmp_path, cache):
    existing = tmp_path / "juggernaut.safetensors"
    existing.write_bytes(b"x")
    source = resolve_source(None, {"path": str(existing), "url": "https://e.com/j.safetensors", "version": "sdxl"},
                            None, cache)
    assert source.kind == "single_file" and source.declared_version == "sdxl"
    source = resolve_source(None, {"path": str(tmp_path / "missing.safetensors"), "url": "https://e.com/j.safetensors",
                                   "version": "sdxl"}, None, cache)
    assert source.kind == "url"
    with pytest.raises(ValueError, match=r"sd_model_version is 'sd15' but pretrained_model.version is 'sdxl'"):
        resolve_source(None, {"path": str(existing), "version": "sdxl"}, "sd15", cache)
    with pytest.raises(ValueError, match=r"pretrained_model has unknown keys"):
        resolve_source(None, {"path": str(existing), "weights": 1}, None, cache)


def test_bad_sources_explain_themselves(tmp_path, cache):
    with pytest.raises(ValueError, match=r"is not an existing file or folder, an http\(s\) URL or a hub id"):
        resolve_source("./no/such/model", None, None, cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is a folder but not a diffusers model \(model_index.json is missing\)"):
        resolve_source(str(tmp_path / "empty"), None, None, cache)
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(ValueError, match=r"is a file but not a checkpoint"):
        resolve_source(str(text), None, None, cache)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_tiny_models_load_through_the_diffusers_folder_path(cache, name):
    models = load_models(resolve_source(name, None, None, cache), cache_dir=cache)
    assert models.version == {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}[name]
    assert models.vae_scale_factor == 8
    assert len(models.text_encoders) == (2 if name == "tiny-sdxl" else 1)
    assert all(len(t) == 49408 for t in models.tokenizers)
    assert not any(p.requires_grad for p in models.unet.parameters())
    # Loading the same folder by path gives the same weights: tiny models take the real loading path.
    by_path = load_models(resolve_source(str(tiny_model_dir(name, cache)), None, None, cache), cache_dir=cache)
    first = next(iter(models.unet.state_dict().values()))
    assert first.equal(next(iter(by_path.unet.state_dict().values())))


def test_version_mismatch_is_a_clear_error(cache):
    with pytest.raises(ValueError, match=r"sd_model_version is 'sd15' but .* is an SDXL model"):
        load_models(resolve_source("tiny-sdxl", None, "sd15", cache), cache_dir=cache)


def test_tiny_models_are_never_a_fallback(cache):
    """A real model that cannot be fetched is an error, not a silent swap for a tiny one."""
    with pytest.raises(ValueError, match=r"could not fetch 'stabilityai/stable-diffusion-xl-base-1.0'"):
        load_models(resolve_source(None, None, "sdxl", cache), cache_dir=cache)


def test_non_sd_pipelines_are_refused(tmp_path, cache):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": []}))
    with pytest.raises(ValueError, match=r"is a FluxPipeline pipeline, not Stable Diffusion 1.x or SDXL"):
        load_models(resolve_source(str(folder), None, None, cache), cache_dir=cache)


def test_eos_fix_makes_pooling_read_the_end_of_text_token(cache):
    models = load_models(resolve_source("tiny-sdxl", None, None, cache), cache_dir=cache)
    encoder, tokenizer = models.text_encoders[1], models.tokenizers[1]
    encoder.config.eos_token_id = 2  # what real SDXL checkpoints ship
    inner = getattr(encoder, "text_model", encoder)
    inner.eos_token_id = 2
    fix_eos_token_id(encoder, tokenizer)
    assert encoder.config.eos_token_id == 49407 and inner.eos_token_id == 49407
