"""Score properties through the real loading path: a tiny random CLIP saved to disk and loaded by ClipScorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.evaluate.conftest import EMBED_DIM
from trainer.evaluate.clip import ClipScorer
from trainer.evaluate.metrics import adherence, cosine_matrix, diversity, likeness, nearest


def _noise_images(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def scorer(tiny_clip) -> ClipScorer:
    return ClipScorer.load(str(tiny_clip), torch.device("cpu"))


def test_embeddings_are_unit_vectors_of_the_model_width(scorer):
    images = _noise_images(3)
    embeds = scorer.embed_images(images)
    texts = scorer.embed_texts(["a photo of a dog", "a mountain landscape"])
    assert embeds.shape == (3, EMBED_DIM) and texts.shape == (2, EMBED_DIM) and scorer.embed_dim == EMBED_DIM
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(embeds[0], embeds[1]), "different images must embed differently"


def test_identical_images_have_similarity_one_and_no_diversity(scorer):
    image = _noise_images(1)[0]
    embeds = scorer.embed_images([image, image.copy(), image.copy()])
    training = scorer.embed_images([image.copy()])
    assert torch.allclose(likeness(embeds, training), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(nearest(embeds, training), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert diversity(embeds) == pytest.approx(0.0, abs=1e-6)

    varied = scorer.embed_images(_noise_images(4, seed=1))
    assert diversity(varied) > 1e-4
    assert likeness(varied, training).max() < 1 - 1e-4


def test_metric_definitions_on_known_vectors():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # unnormalised on purpose
    torch.testing.assert_close(cosine_matrix(a, b), torch.tensor([[1.0, 0.5**0.5], [0.0, 0.5**0.5]],
                                                                 dtype=torch.float64))
    torch.testing.assert_close(adherence(a, b), torch.tensor([1.0, 0.5**0.5], dtype=torch.float64))
    torch.testing.assert_close(likeness(a, b), torch.tensor([(1 + 0.5**0.5) / 2, 0.5**0.5 / 2], dtype=torch.float64))
    torch.testing.assert_close(nearest(a, b), torch.tensor([1.0, 0.5**0.5], dtype=torch.float64))
    # Orthogonal pair: distance 1; with a copy of one of them: pairs (1, 0, 1) -> 2/3.
    assert diversity(a) == pytest.approx(1.0)
    assert diversity(torch.cat([a, a[:1]])) == pytest.approx(2 / 3)
    assert diversity(torch.cat([a, a]) * 5) == pytest.approx(diversity(torch.cat([a, a])))


def test_metric_input_errors():
    with pytest.raises(ValueError, match="at least 2 images"):
        diversity(torch.ones(1, 4))
    with pytest.raises(ValueError, match="one width"):
        cosine_matrix(torch.ones(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="one text per image"):
        adherence(torch.ones(3, 4), torch.ones(2, 4))


def test_clip_location_errors(tmp_path):
    with pytest.raises(ValueError, match="neither an existing folder nor a hub id"):
        ClipScorer.load(str(tmp_path / "missing" / "clip"), torch.device("cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        ClipScorer.load(str(tmp_path / "empty"), torch.device("cpu"))
    # A hub id that is not in the (offline) cache: the message says how to get the model.
    with pytest.raises(ValueError, match=r"could not load the CLIP model 'nobody/no-such-clip'.*huggingface-cli"):
        ClipScorer.load("nobody/no-such-clip", torch.device("cpu"))
