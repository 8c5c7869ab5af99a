"""New-token insertion: ids, initialisation, isolation of the pretrained rows, and clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trainer.adapters.tokens import ExtendedEmbedding, NewTokens, TokenInit, load_embedding_file
from trainer.models.loading import load_models, model_cache_dir, resolve_source


@pytest.fixture
def sdxl(model_cache):
    source = resolve_source("tiny-sdxl", None, None, model_cache_dir())
    return load_models(source)


def test_insertion_gives_consecutive_ids_in_every_tokenizer(sdxl):
    tokens = NewTokens.insert(sdxl.text_encoders, sdxl.tokenizers, ["<s0>", "<s1>", "<s2>"], TokenInit(word="dog"))
    assert tokens.token_ids == [[49408, 49409, 49410]] * 2
    for tokenizer in sdxl.tokenizers:
        assert tokenizer("a <s0><s1><s2> dog").input_ids[2:5] == [49408, 49409, 49410]


def test_rows_start_from_the_initializer_word(sdxl):
    tables = [e.get_input_embeddings().weight.detach().clone() for e in sdxl.text_encoders]
    dog = sdxl.tokenizers[0]("dog", add_special_tokens=False).input_ids[0]
    tokens = NewTokens.insert(sdxl.text_encoders, sdxl.tokenizers, ["<s0>", "<s1>"], TokenInit(word="dog"))
    for index, table in enumerate(tables):
        rows = tokens.rows()[("clip_l", "clip_g")[index]]
        assert torch.equal(rows, table[dog].expand(2, -1).float())


def test_rows_start_from_a_phrase_in_order(sdxl):
    ids = sdxl.tokenizers[0]("red disc", add_special_tokens=False).input_ids
    table = sdxl.text_encoders[0].get_input_embeddings().weight.detach().clone()
    tokens = NewTokens.insert(sdxl.text_encoders, sdxl.tokenizers, ["<a>", "<b>"], TokenInit(phrase="red disc"))
    assert torch.equal(tokens.rows()["clip_l"], table[ids].float())


def test_phrase_length_must_match(sdxl):
    with pytest.raises(ValueError, match=r"initial_phrase 'a small red disc' has 4 tokens but n_tokens is 2"):
        NewTokens.insert(sdxl.text_encoders, sdxl.tokenizers, ["<a>", "<b>"], TokenInit(phrase="a small red disc"))


def test_multi_token_initializer_word_is_refused(sdxl):
    with pytest.raises(ValueError, match=r"initializer_token 'xyzzyplugh' is \d+ tokens .* must be a single token"):
        NewTokens.insert(sdxl.text_encoders, sdxl.tokenizers, ["<a>"], TokenInit(word="xyzzyplugh"))


def test_existing_vocabulary_tokens_are_refused(sdxl):
    with pytest.raises(ValueError, match=r"inserting_list_tokens \['dog</w>'\] already exist"):
        NewTokens.insert(sdxl.text_encoders, sdxl.tokenizers, ["dog</w>"], TokenInit(word="dog"))


def test_only_new_rows_get_gradients_and_old_rows_stay_identical(sdxl):
    encoder = sdxl.text_encoders[0]
    tokens = NewTokens.insert(sdxl.text_encoders, sdxl.tokenizers, ["<s0>", "<s1>"], TokenInit(word="dog"))
    table = encoder.get_input_embeddings()
    assert isinstance(table, ExtendedEmbedding)
    base_before = table.base.weight.detach().clone()
    optimizer = torch.optim.AdamW(tokens.parameters(), lr=0.1, weight_decay=0.1)
    ids = sdxl.tokenizers[0](["a photo of <s0><s1> dog"], return_tensors="pt", padding="max_length").input_ids
    for _ in range(3):
        encoder(ids)[0].pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(table.base.weight, base_before)
    assert table.base.weight.grad is None
    state_shapes = {tuple(v.shape) for s in optimizer.state.values() for v in s.values() if v.dim()}
    assert state_shapes == {(2, 32)}


def test_full_weight_view_lists_new_rows_after_the_table(sdxl):
    tokens = NewTokens.insert(sdxl.text_encoders, sdxl.tokenizers, ["<s0>"], TokenInit(word="dog"))
    weight = sdxl.text_encoders[0].get_input_embeddings().weight
    assert weight.shape == (49409, 32)
    assert torch.equal(weight[-1].float(), tokens.rows()["clip_l"][0])


@pytest.mark.parametrize("layout", ["ours", "kohya", "a1111", "diffusers"])
def test_embedding_files_of_common_layouts_initialise_rows(tmp_path, layout):
    vectors = torch.randn(2, 32)
    if layout == "ours":
        path = tmp_path / "e.safetensors"
        save_file({"clip_l": vectors, "clip_g": vectors * 2}, str(path))
        widths = [32, 32]
    elif layout == "kohya":
        path = tmp_path / "e.safetensors"
        save_file({"emb_params": vectors}, str(path))
        widths = [32]
    elif layout == "a1111":
        path = tmp_path / "e.pt"
        torch.save({"string_to_param": {"*": vectors}}, path)
        widths = [32]
    else:
        path = tmp_path / "e.safetensors"
        save_file({"<my-token>": vectors}, str(path))
        widths = [32]
    rows = load_embedding_file(path, widths, 2)
    assert torch.equal(rows[0], vectors)
    if layout == "ours":
        assert torch.equal(rows[1], vectors * 2)


def test_embedding_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_embedding_file(tmp_path / "nope.safetensors", [32], 2)
    path = tmp_path / "e.safetensors"
    save_file({"clip_l": torch.randn(3, 32)}, str(path))
    with pytest.raises(ValueError, match=r"clip_l has shape \(3, 32\), expected \(2, 32\) for n_tokens=2"):
        load_embedding_file(path, [32], 2)
    with pytest.raises(ValueError, match=r"has no 'clip_g' vectors"):
        load_embedding_file(path, [32, 32], 3)


def test_loading_rows_checks_shapes(sdxl):
    tokens = NewTokens.insert(sdxl.text_encoders, sdxl.tokenizers, ["<s0>", "<s1>"], TokenInit(word="dog"))
    with pytest.raises(ValueError, match=r"saved clip_l embeddings have shape \(3, 32\) but this run trains \(2, 32\)"):
        tokens.load_rows({"clip_l": torch.zeros(3, 32), "clip_g": torch.zeros(3, 32)})
