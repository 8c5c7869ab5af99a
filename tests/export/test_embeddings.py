"""The embedding files are taken by ComfyUI, A1111, InvokeAI, diffusers and Eden, each by its own loading rules.

SD1.5 has two files with the same vectors and the same name: ``<name>_embeddings.safetensors`` (``clip_l``) at the
top level for Eden, ComfyUI, A1111 and diffusers, and ``invokeai/<name>_embeddings.safetensors`` (``emb_params``),
because InvokeAI's probe cannot classify the first. SDXL has one file that every client takes.
"""

from __future__ import annotations

import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.clients import (
    a1111_embedding,
    comfyui_embedding,
    invokeai_embedding,
    invokeai_embedding_base,
    invokeai_scan_folder,
)
from tests.helpers import fresh_pipeline
from trainer.export import files

#: The real text encoders' widths: CLIP-L 768 (SD1.5, SDXL's first encoder), CLIP-G 1280.
WIDTHS = {"sd15": (768,), "sdxl": (768, 1280)}


def _written(tmp_path, version, n=3):
    torch.manual_seed(0)
    vectors = [torch.randn(n, width) for width in WIDTHS[version]]
    metadata = files.embeddings_metadata(name="concept", version=version, tokens=[f"<s{i}>" for i in range(n)])
    paths = files.write_embeddings(tmp_path, "concept", version, vectors, metadata)
    return paths, vectors


def _data_section(path) -> bytes:
    """The tensor bytes of a safetensors file (everything after its header, which names the keys)."""
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def test_sd15_top_level_file_in_comfyui_a1111_and_eden(tmp_path):
    paths, (clip_l,) = _written(tmp_path, "sd15")
    assert paths["embeddings"] == tmp_path / "concept_embeddings.safetensors"
    data = load_file(str(paths["embeddings"]))
    assert set(data) == {"clip_l"} and data["clip_l"].shape == (3, 768)
    assert torch.equal(a1111_embedding(data, expected_width=768), clip_l)
    assert torch.equal(comfyui_embedding(data, "clip_l", 768), clip_l)
    # Why the InvokeAI copy exists: InvokeAI's probe reads shape[0] of this file, the row count, as the width.
    assert invokeai_embedding_base(data) == "unknown"


def test_sd15_invokeai_copy_is_the_same_vectors_under_emb_params(tmp_path):
    paths, (clip_l,) = _written(tmp_path, "sd15")
    copy = paths["invokeai_embeddings"]
    # Same file name, so InvokeAI's model name (the trigger) is <name>_embeddings as in every other client.
    assert copy == tmp_path / files.INVOKEAI_DIR / "concept_embeddings.safetensors"
    data = load_file(str(copy))
    assert set(data) == {"emb_params"}
    assert invokeai_embedding_base(data) == "sd-1", "InvokeAI's probe must classify it as SD1"
    vectors, second = invokeai_embedding(data)
    assert second is None and torch.equal(vectors, clip_l)
    # Bit-identical to the top-level file: the same bytes after the header, the same dtype and shape.
    top = load_file(str(paths["embeddings"]))["clip_l"]
    assert data["emb_params"].dtype == top.dtype and data["emb_params"].shape == top.shape
    assert _data_section(copy) == _data_section(paths["embeddings"])
    with safe_open(str(copy), "pt") as a, safe_open(str(paths["embeddings"]), "pt") as b:
        assert a.metadata() == b.metadata()


def test_invokeai_scan_folder_installs_only_the_copy(tmp_path):
    """*Scan Folder* on an unpacked SD1.5 export lists both files; its probe takes the copy alone, as SD1."""
    paths, _ = _written(tmp_path, "sd15")
    found = invokeai_scan_folder(tmp_path)
    assert found == sorted([paths["embeddings"], paths["invokeai_embeddings"]])
    bases = {path: invokeai_embedding_base(load_file(str(path))) for path in found}
    assert bases == {paths["embeddings"]: "unknown", paths["invokeai_embeddings"]: "sd-1"}


def test_sdxl_file_in_every_client(tmp_path):
    paths, (clip_l, clip_g) = _written(tmp_path, "sdxl")
    assert set(paths) == {"embeddings"}, "SDXL needs no InvokeAI copy"
    assert not (tmp_path / files.INVOKEAI_DIR).exists()
    data = load_file(str(paths["embeddings"]))
    assert set(data) == {"clip_l", "clip_g"}
    a1111 = a1111_embedding(data, expected_width=768 + 1280)
    assert torch.equal(a1111["clip_l"], clip_l) and torch.equal(a1111["clip_g"], clip_g)
    assert torch.equal(comfyui_embedding(data, "clip_l", 768), clip_l)
    assert torch.equal(comfyui_embedding(data, "clip_g", 1280), clip_g)
    assert invokeai_embedding_base(data) == "sdxl"
    first, second = invokeai_embedding(data)
    assert torch.equal(first, clip_g) and torch.equal(second, clip_l)
    assert invokeai_scan_folder(tmp_path) == [paths["embeddings"]]


def test_no_invokeai_copy_without_vectors(tmp_path):
    """A run without tokens keeps its zero-vector file (for Eden's loader) and gets no InvokeAI copy."""
    paths = files.write_embeddings(tmp_path, "concept", "sd15", [torch.zeros(0, 768)], {})
    assert set(paths) == {"embeddings"} and not (tmp_path / files.INVOKEAI_DIR).exists()


def test_embedding_vectors_reads_current_and_earlier_files():
    rows = torch.ones(2, 32)
    assert torch.equal(files.embedding_vectors({"clip_l": rows}, "sd15")[0], rows)
    assert torch.equal(files.embedding_vectors({"emb_params": rows}, "sd15")[0], rows)  # zips written before
    with pytest.raises(ValueError, match="no clip_l / clip_g vectors for this sdxl model"):
        files.embedding_vectors({"emb_params": rows}, "sdxl", "x.safetensors")


def _embeddings_path(trained):
    result = trained["result"]
    return result.final_checkpoint / f"{result.run.name}_embeddings.safetensors"


def test_diffusers_takes_the_sd15_file_as_tensors_or_by_path(trained_sd15):
    path = _embeddings_path(trained_sd15)
    vectors = load_file(str(path))["clip_l"]
    pipe = fresh_pipeline(trained_sd15["session"])
    pipe.load_textual_inversion(vectors, token=["<s0>", "<s1>"])
    ids = pipe.tokenizer("<s0><s1>").input_ids[1:-1]
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], vectors)

    # By path, diffusers makes one multi-vector token: <s0>, <s0>_1, ... (a prompt then says <s0> alone).
    by_path = fresh_pipeline(trained_sd15["session"])
    by_path.load_textual_inversion(str(path), token="<s0>")
    vocab = by_path.tokenizer.get_vocab()
    assert "<s0>" in vocab and "<s0>_1" in vocab and "<s1>" not in vocab
    assert by_path.maybe_convert_prompt("a <s0>", by_path.tokenizer) == "a <s0> <s0>_1"
    ids = by_path.tokenizer("<s0> <s0>_1").input_ids[1:-1]
    assert torch.equal(by_path.text_encoder.get_input_embeddings().weight[ids], vectors)


def test_the_sd15_run_ships_both_files_in_its_checkpoint_and_zip(trained_sd15, tmp_path):
    result, session = trained_sd15["result"], trained_sd15["session"]
    name = f"{result.run.name}{files.EMBEDDINGS_SUFFIX}"
    (trained,) = session.tokens.rows().values()
    for root in (result.final_checkpoint, _unzipped(result.zip_path, tmp_path)):
        top = load_file(str(root / name))
        copy = load_file(str(root / files.INVOKEAI_DIR / name))
        assert set(top) == {"clip_l"} and set(copy) == {"emb_params"}
        assert torch.equal(top["clip_l"], trained) and torch.equal(copy["emb_params"], trained)
        assert _data_section(root / name) == _data_section(root / files.INVOKEAI_DIR / name)
    # The zip's README sends InvokeAI users to the copy.
    readme = (tmp_path / "zip" / "README.md").read_text(encoding="utf-8")
    invokeai = next(line for line in readme.splitlines() if line.startswith("- **InvokeAI**"))
    assert f"`{files.INVOKEAI_DIR}/{name}`" in invokeai


def test_the_sdxl_run_ships_one_file(trained_sdxl, tmp_path):
    result = trained_sdxl["result"]
    for root in (result.final_checkpoint, _unzipped(result.zip_path, tmp_path)):
        assert not (root / files.INVOKEAI_DIR).exists()
        assert len(list(root.rglob(f"*{files.EMBEDDINGS_SUFFIX}"))) == 1
    readme = (tmp_path / "zip" / "README.md").read_text(encoding="utf-8")
    invokeai = next(line for line in readme.splitlines() if line.startswith("- **InvokeAI**"))
    assert f"`{result.run.name}{files.EMBEDDINGS_SUFFIX}`" in invokeai and files.INVOKEAI_DIR not in readme


def _unzipped(zip_path, tmp_path):
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "zip")
    return tmp_path / "zip"


def test_diffusers_refuses_the_sdxl_file_by_path(trained_sdxl):
    pipe = fresh_pipeline(trained_sdxl["session"])
    with pytest.raises(ValueError, match="Loaded state dictionary is incorrect"):
        pipe.load_textual_inversion(str(_embeddings_path(trained_sdxl)), token="<s0>")
