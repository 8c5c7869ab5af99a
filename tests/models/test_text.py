"""Prompt encoding: a batch that repeats a caption encodes it once, with the same outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.models.text import PromptEncoder
from trainer.models.tiny import tiny_model_dir


@pytest.fixture(scope="module")
def encoder(model_cache) -> PromptEncoder:
    folder = tiny_model_dir("tiny-sdxl", model_cache)
    encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")]
    tokenizers = [CLIPTokenizer.from_pretrained(folder / name) for name in ("tokenizer", "tokenizer_2")]
    return PromptEncoder(encoders, tokenizers, is_sdxl=True, device=torch.device("cpu"))


def _encode_and_grads(encoder: PromptEncoder, run):
    tables = [e.get_input_embeddings().weight for e in encoder.text_encoders]
    for table in tables:
        table.grad = None
        table.requires_grad_(True)
    prompt, pooled = run()
    weights = torch.linspace(-1, 1, prompt.numel()).view_as(prompt)
    ((prompt * weights).sum() + pooled.pow(2).sum()).backward()
    return prompt.detach(), pooled.detach(), [t.grad.clone() for t in tables]


def test_repeated_captions_are_encoded_once_with_the_same_results(encoder, monkeypatch):
    texts = ["a photo of sks", "sks on a table", "a photo of sks", "a photo of sks"]
    batch_sizes = []
    original = encoder.encode_ids
    monkeypatch.setattr(encoder, "encode_ids", lambda ids: batch_sizes.append(len(ids[0])) or original(ids))
    deduplicated = _encode_and_grads(encoder, lambda: encoder.encode(texts))
    every_row = _encode_and_grads(encoder, lambda: original(encoder.token_ids(texts)))
    assert batch_sizes == [2]  # two distinct captions went through the encoders, not four
    assert deduplicated[0].shape == every_row[0].shape and deduplicated[1].shape == every_row[1].shape
    torch.testing.assert_close(deduplicated[0], every_row[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deduplicated[1], every_row[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(deduplicated[2], every_row[2], strict=True):
        # The padding token's row sums ~70 positions per caption, in another order: compare the table as a whole.
        assert b.abs().sum() > 0
        assert ((a - b).norm() / b.norm()).item() < 1e-5
