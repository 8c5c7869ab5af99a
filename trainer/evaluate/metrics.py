"""The scores, as functions of CLIP embeddings (any width; inputs are normalised here, so raw features work too).

- **adherence**: cosine similarity of each image to its prompt *without* the trained token (CLIP-T).
- **likeness**: mean cosine similarity of each image to the training images (CLIP-I, as in DreamBooth's
  evaluation): how much of the concept the outputs carry.
- **nearest**: each image's similarity to its closest training image; near 1 means the output copies a training
  image (memorisation), which the mean hides. Reported, not used by the recommendation.
- **diversity**: mean pairwise cosine distance (1 - cosine similarity) among the outputs of one checkpoint and
  scale, over all pairs and with none dropped: identical outputs give 0. A LoRA that has overfit draws the same
  picture whatever the prompt and seed, and this falls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosine similarities of the rows of ``a`` (N, D) and ``b`` (M, D), clamped to [-1, 1]."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) embedding matrices of one width, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    similarity = F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T
    return similarity.clamp(-1.0, 1.0)


def adherence(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) similarity of image i to text i."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"one text per image is needed, got {image_embeds.shape[0]} images and "
                         f"{text_embeds.shape[0]} texts")
    return cosine_matrix(image_embeds, text_embeds).diagonal()


def likeness(image_embeds: torch.Tensor, training_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) mean similarity of each image to the training images."""
    return cosine_matrix(image_embeds, training_embeds).mean(dim=1)


def nearest(image_embeds: torch.Tensor, training_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) similarity of each image to its nearest training image."""
    return cosine_matrix(image_embeds, training_embeds).max(dim=1).values


def diversity(image_embeds: torch.Tensor) -> float:
    """Mean pairwise cosine distance among the images (0 when they are all the same)."""
    n = image_embeds.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {n}")
    similarity = cosine_matrix(image_embeds, image_embeds)
    upper = torch.triu_indices(n, n, offset=1)
    distances = 1.0 - similarity[upper[0], upper[1]]
    # Rounding can leave identical vectors a hair apart (either side); a distance is never negative.
    return float(distances.mean().clamp_min(0.0))
