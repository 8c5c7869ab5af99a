"""The embedding file is taken by ComfyUI, A1111, InvokeAI and diffusers, each by its own loading rules."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.clients import a1111_embedding, comfyui_embedding, invokeai_embedding, invokeai_embedding_base
from trainer.export import files

#: The real text encoders' widths: CLIP-L 768 (SD1.5, SDXL's first encoder), CLIP-G 1280.
WIDTHS = {"sd15": (768,), "sdxl": (768, 1280)}


def _written(tmp_path, version, n=3):
    torch.manual_seed(0)
    vectors = [torch.randn(n, width) for width in WIDTHS[version]]
    metadata = files.embeddings_metadata(name="concept", version=version, tokens=[f"<s{i}>" for i in range(n)])
    path = files.write_embeddings(tmp_path, "concept", version, vectors, metadata)
    return load_file(str(path)), vectors


def test_sd15_file_in_every_client(tmp_path):
    data, (clip_l,) = _written(tmp_path, "sd15")
    assert set(data) == {"emb_params"} and data["emb_params"].shape == (3, 768)
    assert torch.equal(a1111_embedding(data, expected_width=768), clip_l)
    assert torch.equal(comfyui_embedding(data, "clip_l", 768), clip_l)
    assert invokeai_embedding_base(data) == "sd-1", "InvokeAI's probe must classify it as SD1"
    assert torch.equal(invokeai_embedding(data)[0], clip_l)


def test_the_old_sd15_key_was_unknown_to_invokeai():
    """Why not ``clip_l`` for SD1.5: InvokeAI's probe reads shape[0] of such a file, the row count."""
    assert invokeai_embedding_base({"clip_l": torch.zeros(3, 768)}) == "unknown"


def test_sdxl_file_in_every_client(tmp_path):
    data, (clip_l, clip_g) = _written(tmp_path, "sdxl")
    assert set(data) == {"clip_l", "clip_g"}
    a1111 = a1111_embedding(data, expected_width=768 + 1280)
    assert torch.equal(a1111["clip_l"], clip_l) and torch.equal(a1111["clip_g"], clip_g)
    assert torch.equal(comfyui_embedding(data, "clip_l", 768), clip_l)
    assert torch.equal(comfyui_embedding(data, "clip_g", 1280), clip_g)
    assert invokeai_embedding_base(data) == "sdxl"
    first, second = invokeai_embedding(data)
    assert torch.equal(first, clip_g) and torch.equal(second, clip_l)


def test_embedding_vectors_reads_current_and_earlier_files():
    rows = torch.ones(2, 32)
    assert torch.equal(files.embedding_vectors({"emb_params": rows}, "sd15")[0], rows)
    assert torch.equal(files.embedding_vectors({"clip_l": rows}, "sd15")[0], rows)  # zips written before
    with pytest.raises(ValueError, match="no clip_l / clip_g vectors for this sdxl model"):
        files.embedding_vectors({"emb_params": rows}, "sdxl", "x.safetensors")


def _pipeline(trained):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from trainer.models.loading import model_cache_dir
    from trainer.models.tiny import tiny_model_dir

    session = trained["session"]
    folder = tiny_model_dir(session.models.source.location, model_cache_dir())
    if session.models.is_sdxl:
        return StableDiffusionXLPipeline.from_pretrained(folder)
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _embeddings_path(trained):
    result = trained["result"]
    return result.final_checkpoint / f"{result.config.name}_embeddings.safetensors"


def test_diffusers_takes_the_sd15_file_as_tensors_or_by_path(trained_sd15):
    path = _embeddings_path(trained_sd15)
    vectors = load_file(str(path))["emb_params"]
    pipe = _pipeline(trained_sd15)
    pipe.load_textual_inversion(vectors, token=["<s0>", "<s1>"])
    ids = pipe.tokenizer("<s0><s1>").input_ids[1:-1]
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], vectors)

    # By path, diffusers makes one multi-vector token: <s0>, <s0>_1, ... (a prompt then says <s0> alone).
    by_path = _pipeline(trained_sd15)
    by_path.load_textual_inversion(str(path), token="<s0>")
    vocab = by_path.tokenizer.get_vocab()
    assert "<s0>" in vocab and "<s0>_1" in vocab and "<s1>" not in vocab
    assert by_path.maybe_convert_prompt("a <s0>", by_path.tokenizer) == "a <s0> <s0>_1"
    ids = by_path.tokenizer("<s0> <s0>_1").input_ids[1:-1]
    assert torch.equal(by_path.text_encoder.get_input_embeddings().weight[ids], vectors)


def test_diffusers_refuses_the_sdxl_file_by_path(trained_sdxl):
    pipe = _pipeline(trained_sdxl)
    with pytest.raises(ValueError, match="Loaded state dictionary is incorrect"):
        pipe.load_textual_inversion(str(_embeddings_path(trained_sdxl)), token="<s0>")
