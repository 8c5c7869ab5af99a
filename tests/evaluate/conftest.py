"""A tiny random CLIP and a tiny LAION-layout aesthetic head, built from configs and saved like the real files.

The production code loads them by path exactly as it loads ``openai/clip-vit-large-patch14`` and
``sac+logos+ava1-l14-linearMSE.pth``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

#: Width of the tiny CLIP's shared embedding space (the real ViT-L/14 has 768).
EMBED_DIM = 16


def build_tiny_clip(folder: Path) -> Path:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    from trainer.models.tokenizer import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer"))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=EMBED_DIM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def laion_head(dims: tuple[int, ...]) -> nn.Module:
    """The module layout of LAION's improved-aesthetic-predictor MLP (dropout between the linear layers)."""

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = dims
            self.layers = nn.Sequential(
                nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
                nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], 1),
            )

        def forward(self, x):
            return self.layers(x)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        head = MLP()
        # Larger than the default init, so that scores differ visibly between images.
        for module in head.layers:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1.0)
                nn.init.normal_(module.bias, std=1.0)
    return head.eval()


def build_aesthetic_weights(path: Path, dims: tuple[int, ...] = (EMBED_DIM, 32, 8, 4, 2)) -> Path:
    torch.save(laion_head(dims).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_aesthetic(tmp_path_factory) -> Path:
    return build_aesthetic_weights(tmp_path_factory.mktemp("aesthetic") / "tiny-aesthetic.pth")


@pytest.fixture
def one_thread():
    """Run a test's tiny-model rendering on one thread, restoring the setting afterwards.

    The tiny models gain nothing from a second thread, and on a machine whose cores are busy with other work,
    OpenMP's waiting threads make them an order of magnitude slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
