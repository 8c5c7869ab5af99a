"""Optimisers and schedules."""

from __future__ import annotations

import pytest
import torch

from trainer.device import DeviceInfo
from trainer.training.optimizers import ParamGroup, build_groups, lr_lambda, state_bytes

CPU = DeviceInfo(torch.device("cpu"), torch.float32)


def test_warmup_then_schedule_shapes():
    constant = lr_lambda("constant", 4, 20)
    assert [round(constant(s), 3) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    linear = lr_lambda("linear", 0, 10)
    assert linear(0) == 1.0 and linear(5) == pytest.approx(0.5) and linear(10) == 0.0
    cosine = lr_lambda("cosine", 0, 10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    restarts = lr_lambda("cosine_with_restarts", 0, 10)
    assert restarts(9) < restarts(0)
    assert lr_lambda("polynomial", 0, 10)(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown lr_scheduler"):
        lr_lambda("exotic", 0, 10)(0)


def test_groups_get_their_own_optimizers_and_learning_rates():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    groups = build_groups(
        [ParamGroup("unet", [a], "prodigy", 3e-4, 0.01, 0), ParamGroup("ti", [b], "adamw", 1e-3, 0.0, 2)],
        CPU, schedule="constant", total_steps=10, d_coef=1.0, growth_rate=1.05,
    )
    prodigy, adamw = groups[0].optimizer, groups[1].optimizer
    assert type(prodigy).__name__ == "FlatProdigy" and prodigy.param_groups[0]["lr"] == 1.0
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)
    for group in groups:
        group.params[0].sum().backward()
        group.optimizer.step()
        group.scheduler.step()
    assert state_bytes(adamw) > 0 and prodigy.param_groups[0]["d"] > 0


def test_adamw8bit_needs_cuda():
    group = ParamGroup("unet", [torch.nn.Parameter(torch.randn(2))], "AdamW8bit", 1e-4, 0.0, 0)
    with pytest.raises(ValueError, match="needs bitsandbytes on an NVIDIA CUDA device; this run is on cpu"):
        build_groups([group], CPU, schedule="constant", total_steps=1, d_coef=1.0, growth_rate=1.05)


def test_empty_group_is_refused():
    with pytest.raises(ValueError, match="parameter group unet is empty"):
        build_groups([ParamGroup("unet", [], "adamw", 1e-4, 0.0, 0)], CPU, schedule="constant", total_steps=1,
                     d_coef=1.0, growth_rate=1.05)
