"""Optimisers and learning-rate schedules, one per parameter group.

Groups with different learning rates get separate optimisers: Prodigy estimates one step size per optimiser and
refuses mixed learning rates, and separate optimisers also let each group freeze on its own schedule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from trainer.device import DeviceInfo
from trainer.training.prodigy import FlatProdigy

logger = logging.getLogger(__name__)


class GroupName(str, Enum):
    """The parts of the model that train, each with its own optimiser. The values name the groups in checkpoints
    (``training_state.pt``) and logs."""

    UNET = "unet"
    TOKENS = "ti"
    TEXT_ENCODER_LORA = "te_lora"

    def __str__(self) -> str:
        return self.value


@dataclass
class ParamGroup:
    name: GroupName
    params: list[torch.nn.Parameter]
    optimizer_type: str
    lr: float
    weight_decay: float
    warmup_steps: int
    optimizer: torch.optim.Optimizer = field(init=False)
    """Built by :func:`build_groups`."""
    scheduler: torch.optim.lr_scheduler.LRScheduler = field(init=False)
    lr_lambda: Callable[[int], float] | None = None
    """The step -> multiplier of this group's own curve (Eden's); ``None`` takes the named schedule."""

    @property
    def initial_lr(self) -> float:
        """The rate the optimiser is built with, which the schedule multiplies (Prodigy runs at 1.0)."""
        return 1.0 if self.optimizer_type == "prodigy" else self.lr


def _adamw(params, lr: float, weight_decay: float, device: DeviceInfo, betas=(0.9, 0.999)):
    # Fused AdamW runs one kernel for all tensors instead of several per tensor; it needs every parameter on the
    # device in floating point, which holds for our fp32 trainable parameters.
    kwargs = {"fused": True} if device.supports_fused_adamw else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, **kwargs)


def _prodigy(params, weight_decay: float, d_coef: float, growth_rate: float):
    # Settings of the Eden trainer and the diffusers pivotal-tuning guide; Prodigy runs at lr 1.0 and the schedule
    # multiplies its estimate. prodigyopt's update over one flat buffer (trainer/training/prodigy.py): prodigyopt
    # itself reads two values back from the device per tensor, ~2,300 synchronisations a step on SDXL.
    return FlatProdigy(
        params, lr=1.0, d_coef=d_coef, growth_rate=growth_rate, decouple=True, use_bias_correction=True,
        safeguard_warmup=True, weight_decay=weight_decay, betas=(0.9, 0.99),
    )


def _adamw_8bit(params, lr: float, weight_decay: float, device: DeviceInfo):
    if not device.supports_bitsandbytes:
        raise ValueError(
            f"unet_optimizer_type 'AdamW8bit' needs bitsandbytes on an NVIDIA CUDA device; this run is on "
            f"{device.backend}. Use 'adamw' or 'prodigy'."
        )
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ValueError(
            "unet_optimizer_type 'AdamW8bit' needs the bitsandbytes package (requirements/cuda.txt)"
        ) from error
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def build_optimizer(group: ParamGroup, device: DeviceInfo, *, d_coef: float, growth_rate: float):
    kind = group.optimizer_type
    if kind == "adamw":
        return _adamw(group.params, group.lr, group.weight_decay, device)
    if kind == "prodigy":
        return _prodigy(group.params, group.weight_decay, d_coef, growth_rate)
    if kind == "AdamW8bit":
        return _adamw_8bit(group.params, group.lr, group.weight_decay, device)
    raise ValueError(f"unknown optimizer {kind!r} for {group.name}")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0):
    """A step -> multiplier function: linear warm-up, then the named schedule over the remaining steps."""
    warmup_steps = max(0, warmup_steps)
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
        if schedule == "polynomial":
            return max(0.0, (1.0 - progress) ** power)
        raise ValueError(f"unknown lr_scheduler {schedule!r}")

    return factor


def build_groups(groups: list[ParamGroup], device: DeviceInfo, *, schedule: str, total_steps: int, d_coef: float,
                 growth_rate: float) -> list[ParamGroup]:
    for group in groups:
        if not group.params:
            raise ValueError(f"parameter group {group.name} is empty")
        group.optimizer = build_optimizer(group, device, d_coef=d_coef, growth_rate=growth_rate)
        curve = group.lr_lambda or lr_lambda(schedule, group.warmup_steps, total_steps)
        group.scheduler = torch.optim.lr_scheduler.LambdaLR(group.optimizer, curve)
        n = sum(p.numel() for p in group.params)
        logger.info("%s: %s, lr %g, %d trainable values", group.name, group.optimizer_type, group.lr, n)
    return groups


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimiser state (for tests and the benchmark)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total
