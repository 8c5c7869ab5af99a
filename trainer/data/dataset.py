"""The training side of the data: batches of one size, flips, and the latent cache.

Every batch comes from one target size (one aspect-ratio bucket) and has exactly ``batch_size`` samples (a short
bucket is topped up with other samples of the same bucket), so tensor shapes stay static from step to step. Batch
order and flips depend only on (seed, epoch) and (seed, step): a resumed run sees the same data as an uninterrupted
one.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.data.manifest import PreparedDataset

logger = logging.getLogger(__name__)


def load_pixels(path, flip: bool) -> torch.Tensor:
    """RGB image as a [3, H, W] float tensor in [-1, 1]."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    tensor = torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)
    return tensor.flip(-1) if flip else tensor


def load_mask(path, flip: bool, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Mask as a [1, h, w] tensor in [0, 1] at latent resolution (area-averaged, so soft edges survive)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)[None, None]
    tensor = torch.nn.functional.adaptive_avg_pool2d(tensor, latent_hw)[0]
    return tensor.flip(-1) if flip else tensor


@dataclass(frozen=True)
class Batch:
    indices: list[int]
    flips: list[bool]
    target_size: tuple[int, int]


class BatchPlan:
    """Which samples (and flips) make up each step's batch."""

    def __init__(self, dataset: PreparedDataset, batch_size: int, seed: int, flip: bool):
        self.batch_size = batch_size
        self.seed = seed
        self.flip = flip
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(dataset.samples):
            self.buckets.setdefault(tuple(sample.target_size), []).append(index)
        self._epoch_cache: dict[int, list[tuple[tuple[int, int], list[int]]]] = {}

    @property
    def batches_per_epoch(self) -> int:
        return sum(-(-len(members) // self.batch_size) for members in self.buckets.values())

    def _epoch(self, epoch: int) -> list[tuple[tuple[int, int], list[int]]]:
        if epoch not in self._epoch_cache:
            rng = random.Random(f"{self.seed}-epoch-{epoch}")
            batches = []
            for size in sorted(self.buckets):
                members = self.buckets[size][:]
                rng.shuffle(members)
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start : start + self.batch_size]
                    while len(chunk) < self.batch_size:
                        chunk.append(rng.choice(self.buckets[size]))
                    batches.append((size, chunk))
            rng.shuffle(batches)
            self._epoch_cache = {epoch: batches}
        return self._epoch_cache[epoch]

    def batch(self, micro_step: int) -> Batch:
        """The batch of global micro-step ``micro_step`` (step × accumulation + micro)."""
        per_epoch = self.batches_per_epoch
        epoch, position = divmod(micro_step, per_epoch)
        size, indices = self._epoch(epoch)[position]
        if self.flip:
            rng = random.Random(f"{self.seed}-flip-{micro_step}")
            flips = [rng.random() < 0.5 for _ in indices]
        else:
            flips = [False] * len(indices)
        return Batch(indices=list(indices), flips=flips, target_size=size)


class LatentSource:
    """Latents (and latent-size masks) for a batch: from the cache, or encoded on the fly."""

    def __init__(self, dataset: PreparedDataset, vae, device, *, vae_dtype: torch.dtype, cache: bool, flip: bool,
                 use_masks: bool, scale_factor: int, encode_batch: int = 4, workers: int = 0):
        self.dataset = dataset
        self.vae = vae
        self.device = device
        self.vae_dtype = vae_dtype
        self.use_masks = use_masks and dataset.has_masks
        self.scale_factor = scale_factor
        self.flip = flip
        self.cache_enabled = cache
        self.encode_batch = encode_batch
        # Image decoding releases the GIL, so threads load a batch's images in parallel.
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load") if workers > 0 else None
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.masks: dict[tuple[int, bool], torch.Tensor] = {}
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        self._scaling, self._shift = scaling, shift

    def latent_hw(self, index: int) -> tuple[int, int]:
        h, w = self.dataset.samples[index].target_size
        return h // self.scale_factor, w // self.scale_factor

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.vae_dtype)
        # The distribution's mean, not a sample: deterministic, so cached and uncached training agree exactly.
        latents = self.vae.encode(pixels).latent_dist.mode()
        return ((latents.float() - self._shift) * self._scaling).float()

    def build_cache(self, progress=None) -> None:
        """Encode every (sample, flip) once. After this the VAE is only needed for sampling."""
        if not self.cache_enabled:
            return
        keys = [(i, f) for i in range(len(self.dataset)) for f in ((False, True) if self.flip else (False,))]
        by_size: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for key in keys:
            by_size.setdefault(tuple(self.dataset.samples[key[0]].target_size), []).append(key)
        for group in by_size.values():
            for start in range(0, len(group), self.encode_batch):
                chunk = group[start : start + self.encode_batch]
                pixels = self._load(chunk)
                for key, latent in zip(chunk, self._encode(pixels), strict=True):
                    self.latents[key] = latent
                if progress is not None:
                    progress(len(chunk))
        if self.use_masks:
            for index, flip in keys:
                self.masks[(index, flip)] = self._mask(index, flip)
        logger.info("cached %d latents", len(self.latents))

    def _load(self, keys: list[tuple[int, bool]]) -> torch.Tensor:
        def one(key: tuple[int, bool]) -> torch.Tensor:
            return load_pixels(self.dataset.image_path(key[0]), key[1])

        return torch.stack(list(self.pool.map(one, keys)) if self.pool is not None else [one(k) for k in keys])

    def _mask(self, index: int, flip: bool) -> torch.Tensor:
        path = self.dataset.mask_path(index)
        if path is None:
            return torch.ones(1, *self.latent_hw(index), device=self.device)
        return load_mask(path, flip, self.latent_hw(index)).to(self.device)

    def get(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys = list(zip(batch.indices, batch.flips, strict=True))
        if self.cache_enabled:
            latents = torch.stack([self.latents[key] for key in keys])
        else:
            latents = self._encode(self._load(keys))
        masks = None
        if self.use_masks:
            if self.cache_enabled:
                masks = torch.stack([self.masks[key] for key in keys])
            else:
                masks = torch.stack([self._mask(i, f) for i, f in keys])
        return latents, masks
