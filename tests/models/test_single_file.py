"""Single-file (A1111 / ComfyUI / civitai layout) checkpoints: from a path and from a URL, for SD1.5 and SDXL.

The checkpoints are made offline from the tiny diffusers fixtures by :mod:`tests.models.ldm_format`; loading one must
give exactly the models that loading the diffusers folder gives, compared on real forward passes.
"""

from __future__ import annotations

import http.server
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.ldm_format import pipeline_to_ldm, save_single_file
from trainer.models import loading
from trainer.models.loading import load_models, resolve_source, version_of_single_file
from trainer.models.tiny import TINY_NAMES, tiny_model_dir
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS

FAMILIES = sorted(TINY_NAMES)  # tiny-sd15, tiny-sdxl
PROMPT = "a photo of a sks dog on the beach"


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def folders(model_cache) -> dict[str, Path]:
    return {name: tiny_model_dir(name, model_cache) for name in FAMILIES}


@pytest.fixture(scope="module")
def single_files(folders, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("single-files")
    return {name: save_single_file(folder, out / f"{name}.safetensors") for name, folder in folders.items()}


@pytest.fixture(scope="module")
def references(folders, model_cache):
    return {
        name: load_models(resolve_source(str(folder), None, None, model_cache), cache_dir=model_cache)
        for name, folder in folders.items()
    }


@pytest.fixture(scope="module")
def reference_outputs(references) -> dict[str, dict[str, torch.Tensor]]:
    return {name: _outputs(models) for name, models in references.items()}


def _load_file(path: Path, folder: Path, cache: Path, declared=None):
    source = resolve_source(str(path), None, declared, cache)
    return load_models(source, cache_dir=cache, single_file_config=str(folder))


# -------------------------------------------------------------------------------------------------- comparison
def _outputs(models) -> dict[str, torch.Tensor]:
    """Forward passes of every frozen module on fixed inputs: what training and sampling actually use."""
    generator = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        image = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
        out["vae.encode"] = models.vae.encode(image).latent_dist.mean
        out["vae.decode"] = models.vae.decode(torch.randn(1, 4, 4, 4, generator=generator)).sample

        hidden, pooled = [], None
        for index, (encoder, tokenizer) in enumerate(zip(models.text_encoders, models.tokenizers, strict=True)):
            ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            result = encoder(ids, output_hidden_states=True)
            out[f"te{index}.last"] = result.last_hidden_state
            out[f"te{index}.penultimate"] = result.hidden_states[-2]
            pooled = result.text_embeds if hasattr(result, "text_embeds") else result.pooler_output
            out[f"te{index}.pooled"] = pooled
            hidden.append(result.hidden_states[-2])

        context = torch.cat(hidden, dim=-1)
        sample = torch.randn(1, 4, 8, 8, generator=generator)
        added = None
        if models.is_sdxl:
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            added = {"text_embeds": pooled, "time_ids": time_ids}
        out["unet"] = models.unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample
    return out


def assert_same_models(expected, got, expected_outputs: dict[str, torch.Tensor] | None = None) -> None:
    """Same modules, same weights, same outputs (``expected_outputs``: ``expected``'s, if already computed)."""
    assert got.version == expected.version
    assert len(got.text_encoders) == len(expected.text_encoders)
    modules = {"unet": (expected.unet, got.unet), "vae": (expected.vae, got.vae)}
    encoders = zip(expected.text_encoders, got.text_encoders, strict=True)
    modules.update({f"te{i}": pair for i, pair in enumerate(encoders)})
    for name, (a, b) in modules.items():
        assert type(a) is type(b), name
        want, have = a.state_dict(), b.state_dict()
        assert set(want) == set(have), f"{name}: {sorted(set(want) ^ set(have))[:5]}"
        for key, value in want.items():
            assert have[key].dtype == torch.float32 and torch.equal(have[key], value), f"{name}.{key} differs"
    want, have = expected_outputs or _outputs(expected), _outputs(got)
    for key, value in want.items():
        torch.testing.assert_close(have[key], value, rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    assert type(got.scheduler) is type(expected.scheduler)
    assert [t.eos_token_id for t in got.tokenizers] == [t.eos_token_id for t in expected.tokenizers]


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", FAMILIES)
def test_safetensors_single_file_loads_like_the_diffusers_folder(name, folders, single_files, references,
                                                                 reference_outputs, model_cache):
    path = single_files[name]
    assert version_of_single_file(path) == TINY_NAMES[name]
    source = resolve_source(str(path), None, None, model_cache)
    assert source.kind == "single_file"
    models = load_models(source, cache_dir=model_cache, single_file_config=str(folders[name]))
    assert models.version == TINY_NAMES[name]
    assert_same_models(references[name], models, reference_outputs[name])


@pytest.mark.parametrize("name", FAMILIES)
def test_ckpt_single_file_loads_like_the_diffusers_folder(name, folders, references, reference_outputs, model_cache,
                                                          tmp_path):
    path = save_single_file(folders[name], tmp_path / f"{name}.ckpt")
    assert version_of_single_file(path) == TINY_NAMES[name]
    # A declared version that agrees with the file is accepted.
    models = _load_file(path, folders[name], model_cache, declared=TINY_NAMES[name])
    assert_same_models(references[name], models, reference_outputs[name])


def test_comparison_notices_a_changed_weight(folders, references, reference_outputs, model_cache, tmp_path):
    """The equality checks above must be able to fail: one nudged UNet weight has to show."""
    state = pipeline_to_ldm(folders["tiny-sd15"])
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    state[key] = state[key] + 0.01
    save_file(state, str(tmp_path / "nudged.safetensors"))
    models = _load_file(tmp_path / "nudged.safetensors", folders["tiny-sd15"], model_cache)
    nudged = re.escape("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight differs")
    with pytest.raises(AssertionError, match=nudged):
        assert_same_models(references["tiny-sd15"], models, reference_outputs["tiny-sd15"])
    # ... and so do the outputs, had the weights not been compared first.
    outputs = _outputs(models)
    assert not torch.allclose(outputs["unet"], reference_outputs["tiny-sd15"]["unet"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["te0.last"], reference_outputs["tiny-sd15"]["te0.last"])


@pytest.mark.parametrize(("name", "declared"), [("tiny-sd15", "sdxl"), ("tiny-sdxl", "sd15")])
def test_declared_version_mismatch_is_a_clear_error(name, declared, folders, single_files, model_cache):
    detected = TINY_NAMES[name]
    with pytest.raises(ValueError, match=rf"sd_model_version is '{declared}' but {name}\.safetensors .*'{detected}'"):
        _load_file(single_files[name], folders[name], model_cache, declared=declared)


@pytest.mark.parametrize(
    "drop",
    [
        lambda key: key == "model.diffusion_model.out.2.bias",
        lambda key: key.startswith("first_stage_model."),
        lambda key: key == "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ],
    ids=["one-unet-weight", "no-vae", "one-text-encoder-weight"],
)
def test_incomplete_checkpoint_is_a_clear_error(drop, folders, model_cache, tmp_path):
    state = {k: v for k, v in pipeline_to_ldm(folders["tiny-sd15"]).items() if not drop(k)}
    save_file(state, str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(ValueError, match=r"incomplete\.safetensors is incomplete or does not match"):
        _load_file(tmp_path / "incomplete.safetensors", folders["tiny-sd15"], model_cache)


def test_sdxl_clip_g_of_clip_l_width_would_be_misloaded_by_diffusers(folders, single_files, model_cache,
                                                                     monkeypatch):
    """Why loading builds text_encoder_2 itself for tiny SDXL: diffusers alone would leave it half empty."""
    monkeypatch.setattr(loading, "_sdxl_text_encoder_2", lambda *args: None)
    with pytest.raises(ValueError, match=r"incomplete .*: no weights for \d+ text_encoder_2 parameters"):
        _load_file(single_files["tiny-sdxl"], folders["tiny-sdxl"], model_cache)


# ------------------------------------------------------------------------------------------------------ from URL
class _CountingServer:
    """A loopback HTTP server over one folder that counts the GETs it answers."""

    def __init__(self, root: Path):
        owner = self
        self.paths: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                owner.paths.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# Downloading is family-agnostic (the file then takes the single-file path above): SDXL, the harder one, suffices.
@pytest.mark.parametrize("name", ["tiny-sdxl"])
def test_url_is_downloaded_once_and_loads_like_the_folder(name, folders, single_files, references, reference_outputs,
                                                          tmp_path, monkeypatch):
    # requests would send even loopback traffic to a configured proxy.
    for variable in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    cache = tmp_path / "cache"
    with _CountingServer(single_files[name].parent) as server:
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"127.0.0.1:{server.server.server_address[1]}")
        url = server.url(f"{name}.safetensors")
        source = resolve_source(url, None, None, cache)
        assert source.kind == "url"

        first = load_models(source, cache_dir=cache, single_file_config=str(folders[name]))
        assert server.paths == [f"/{name}.safetensors"]
        downloaded = list((cache / "downloads").rglob("*.safetensors"))
        assert [p.name for p in downloaded] == [f"{name}.safetensors"]
        assert downloaded[0].read_bytes() == single_files[name].read_bytes()

        second = load_models(source, cache_dir=cache, single_file_config=str(folders[name]))
        assert server.paths == [f"/{name}.safetensors"], "the second load must reuse the cached file"

    assert first.version == second.version == TINY_NAMES[name]
    assert_same_models(references[name], first, reference_outputs[name])
    assert_same_models(references[name], second, reference_outputs[name])


def test_url_version_mismatch_is_a_clear_error(folders, single_files, tmp_path, monkeypatch):
    for variable in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    with _CountingServer(single_files["tiny-sdxl"].parent) as server:
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"127.0.0.1:{server.server.server_address[1]}")
        source = resolve_source(server.url("tiny-sdxl.safetensors"), None, "sd15", tmp_path)
        with pytest.raises(ValueError, match=r"sd_model_version is 'sd15' but tiny-sdxl\.safetensors is an SDXL"):
            load_models(source, cache_dir=tmp_path, single_file_config=str(folders["tiny-sdxl"]))


def test_a_checkpoint_url_larger_than_the_cap_is_refused_and_leaves_nothing(single_files, tmp_path, monkeypatch):
    """TRAINER_MAX_MODEL_BYTES bounds a ckpt_path URL; the refused download leaves no file, partial or not."""
    for variable in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    size = single_files["tiny-sdxl"].stat().st_size
    monkeypatch.setenv(loading.ENV_MAX_MODEL_BYTES, str(size - 1))
    cache = tmp_path / "cache"
    with _CountingServer(single_files["tiny-sdxl"].parent) as server:
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"127.0.0.1:{server.server.server_address[1]}")
        with pytest.raises(ValueError, match=r"tiny-sdxl\.safetensors: .*over the limit of .* for a checkpoint "
                                             r"\(TRAINER_MAX_MODEL_BYTES"):
            loading.download_checkpoint(server.url("tiny-sdxl.safetensors"), cache)
        assert server.paths == ["/tiny-sdxl.safetensors"]
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    monkeypatch.setenv(loading.ENV_MAX_MODEL_BYTES, str(size))
    with _CountingServer(single_files["tiny-sdxl"].parent) as server:
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"127.0.0.1:{server.server.server_address[1]}")
        assert loading.download_checkpoint(server.url("tiny-sdxl.safetensors"), cache).stat().st_size == size


# ------------------------------------------------------------------------------------------- not a checkpoint
def _lora_like() -> dict[str, torch.Tensor]:
    # kohya-style names, as LoRAs from civitai have them
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {
        f"{base}.lora_down.weight": torch.zeros(4, 32),
        f"{base}.lora_up.weight": torch.zeros(32, 4),
        f"{base}.alpha": torch.tensor(4.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
    }


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (_lora_like(), "is a LoRA or a lone diffusers component"),
        ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3)}, "is a LoRA or a lone diffusers component"),
        ({"weight": torch.randn(3, 3), "bias": torch.randn(3)}, "not a Stable Diffusion 1.x or SDXL checkpoint"),
        # a UNet alone (no text encoder) cannot be told apart from other models
        ({"model.diffusion_model.out.2.bias": torch.zeros(4)}, "not a Stable Diffusion 1.x or SDXL checkpoint"),
    ],
    ids=["kohya-lora", "diffusers-unet", "random", "unet-only"],
)
def test_non_checkpoint_safetensors_are_refused(state, message, folders, model_cache, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=message):
        version_of_single_file(path)
    with pytest.raises(ValueError, match=message):
        _load_file(path, folders["tiny-sd15"], model_cache)


def test_unreadable_files_are_refused(tmp_path):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 10)
    with pytest.raises(ValueError, match=r"is not a readable \.safetensors file"):
        version_of_single_file(garbage)
    text = tmp_path / "broken.ckpt"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        version_of_single_file(text)


def test_converter_round_trips_every_weight(folders):
    """Each diffusers weight lands in exactly one original-layout key, under the family's prefixes."""
    for name, folder in folders.items():
        state = pipeline_to_ldm(folder)
        loaded = {
            part: load_file(str(next((folder / part).glob("*.safetensors"))))
            for part in ("unet", "vae", "text_encoder", "text_encoder_2")
            if (folder / part).is_dir()
        }
        # the OpenCLIP layout fuses q, k and v into one tensor: count those as three
        fused = sum(k.endswith(("in_proj_weight", "in_proj_bias")) for k in state)
        assert len(state) + 2 * fused == sum(len(v) for v in loaded.values()), name
        prefixes = {"model.diffusion_model.", "first_stage_model."}
        prefixes |= (
            {"conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."}
            if TINY_NAMES[name] == "sdxl"
            else {"cond_stage_model.transformer.text_model."}
        )
        assert {p for p in prefixes if any(k.startswith(p) for k in state)} == prefixes
        assert all(k.startswith(tuple(prefixes)) for k in state)


def test_converter_writes_the_original_key_layout(folders):
    """Names real A1111/ComfyUI checkpoints use, where diffusers' loader would also accept other ones."""
    sd15 = pipeline_to_ldm(folders["tiny-sd15"])
    unet = "model.diffusion_model."
    # An upsampler sits at .1 after a block without attention and at .2 after one with (real SD1.5: 2.1 and 5.2).
    assert f"{unet}output_blocks.2.1.conv.weight" in sd15
    assert f"{unet}input_blocks.3.0.op.weight" in sd15
    assert f"{unet}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in sd15
    assert f"{unet}middle_block.2.skip_connection.weight" not in sd15  # same width: no shortcut
    assert f"{unet}output_blocks.0.0.skip_connection.weight" in sd15
    assert sd15["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in sd15
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in sd15  # the full-resolution block
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd15

    sdxl = pipeline_to_ldm(folders["tiny-sdxl"])
    assert f"{unet}output_blocks.2.2.conv.weight" in sdxl
    assert f"{unet}label_emb.0.0.weight" in sdxl
    assert f"{unet}input_blocks.5.1.transformer_blocks.1.attn1.to_q.weight" in sdxl  # 2 transformer layers
    clip_g = "conditioner.embedders.1.model."
    assert sdxl[f"{clip_g}transformer.resblocks.2.attn.in_proj_weight"].shape == (96, 32)
    assert {f"{clip_g}{k}" for k in ("positional_embedding", "token_embedding.weight", "ln_final.weight",
                                     "text_projection")} <= set(sdxl)
    projection = load_file(str(folders["tiny-sdxl"] / "text_encoder_2" / "model.safetensors"))["text_projection.weight"]
    assert torch.equal(sdxl[f"{clip_g}text_projection"], projection.T)
