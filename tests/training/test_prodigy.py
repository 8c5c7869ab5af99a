"""FlatProdigy against prodigyopt.Prodigy: same d and parameters over many steps, state dicts that interchange."""

from __future__ import annotations

import io

import pytest
import torch
from prodigyopt import Prodigy

from trainer.training.prodigy import FlatProdigy

# The project's settings (trainer/training/optimizers.py).
SETTINGS = dict(lr=1.0, d_coef=1.0, growth_rate=1.05, decouple=True, use_bias_correction=True, safeguard_warmup=True,
                weight_decay=0.01, betas=(0.9, 0.99))
SHAPES = [(16, 8), (8,), (4, 4, 3, 3), (32, 16), (5,)]
#: The reductions differ in order and precision (float64 over all values against per-tensor fp32 dots summed in
#: Python doubles), so d and the parameters agree to rounding, not bit for bit.
D_RTOL, PARAM_ATOL = 1e-5, 1e-6


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]
    with torch.no_grad():
        params[3].zero_()  # an all-zero tensor, as LoRA's B at the start: prodigyopt keeps a 0-d p0 for it
    return params


def _targets() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _step(optimizer, params, targets, step: int, skip: int | None = None) -> None:
    # A consistent quadratic pull (so d grows, as in training) plus noise; ``skip`` leaves one tensor without grad.
    generator = torch.Generator().manual_seed(100 + step)
    for index, (p, t) in enumerate(zip(params, targets, strict=True)):
        p.grad = None if index == skip else (p.detach() - t) + 0.1 * torch.randn(p.shape, generator=generator)
    optimizer.step()


def _run(cls, steps: int, skip_at: dict[int, int] | None = None):
    params, targets = _params(), _targets()
    optimizer = cls(params, **SETTINGS)
    for step in range(steps):
        _step(optimizer, params, targets, step, (skip_at or {}).get(step))
    return optimizer, params


def _assert_same(a_opt, a_params, b_opt, b_params) -> None:
    assert a_opt.param_groups[0]["d"] == pytest.approx(b_opt.param_groups[0]["d"], rel=D_RTOL)
    assert a_opt.param_groups[0]["k"] == b_opt.param_groups[0]["k"]
    for a, b in zip(a_params, b_params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=PARAM_ATOL)


def test_flat_prodigy_follows_prodigyopt():
    reference, ref_params = _run(Prodigy, 40)
    flat, flat_params = _run(FlatProdigy, 40)
    d = reference.param_groups[0]["d"]
    assert d > 5e-6, "the test's gradients must make d grow (at most 1.05x a step from 1e-6), or it compares little"
    _assert_same(flat, flat_params, reference, ref_params)
    assert flat._flat is not None and all(p.data_ptr() >= flat._flat.data_ptr() for p in flat_params)


def test_steps_with_a_missing_gradient_take_the_foreach_path():
    skips = {3: 0, 4: 2, 10: 4}
    reference, ref_params = _run(Prodigy, 20, skips)
    flat, flat_params = _run(FlatProdigy, 20, skips)
    _assert_same(flat, flat_params, reference, ref_params)
    assert [flat.state[p]["step"] for p in flat_params] == [reference.state[p]["step"] for p in ref_params]


def test_a_first_step_without_gradient_starts_that_tensor_later():
    # prodigyopt takes p0 at the first step a tensor has a gradient, not at construction.
    skips = {0: 1, 1: 1, 2: 1}
    reference, ref_params = _run(Prodigy, 12, skips)
    flat, flat_params = _run(FlatProdigy, 12, skips)
    _assert_same(flat, flat_params, reference, ref_params)


def test_not_flat_when_dtypes_differ():
    params, targets = _params(), _targets()
    params[1] = torch.nn.Parameter(params[1].detach().double())
    targets[1] = targets[1].double()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    flat, reference = FlatProdigy(params, **SETTINGS), Prodigy(ref_params, **SETTINGS)
    assert flat._flat is None
    for step in range(10):
        _step(flat, params, targets, step)
        _step(reference, ref_params, targets, step)
    _assert_same(flat, params, reference, ref_params)


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("source", [FlatProdigy, Prodigy])
def test_resume_from_a_state_dict_equals_an_uninterrupted_run(source):
    uninterrupted, expected = _run(FlatProdigy, 20)
    first, params = _run(source, 10)
    saved = _roundtrip(first.state_dict())
    if source is Prodigy:
        assert saved["state"][3]["p0"].dim() == 0  # the case FlatProdigy must expand
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = FlatProdigy(resumed_params, **SETTINGS)
    resumed.load_state_dict(saved)
    targets = _targets()
    for step in range(10, 20):
        _step(resumed, resumed_params, targets, step)
    _assert_same(resumed, resumed_params, uninterrupted, expected)
    if source is FlatProdigy:  # same code on both sides: exact
        for a, b in zip(resumed_params, expected, strict=True):
            assert torch.equal(a.detach(), b.detach())


def test_prodigyopt_loads_a_flat_state_dict():
    uninterrupted, expected = _run(Prodigy, 20)
    first, params = _run(FlatProdigy, 10)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = Prodigy(ref_params, **SETTINGS)
    reference.load_state_dict(_roundtrip(first.state_dict()))
    targets = _targets()
    for step in range(10, 20):
        _step(reference, ref_params, targets, step)
    _assert_same(reference, ref_params, uninterrupted, expected)


def test_a_parameter_re_pointed_after_construction_still_trains():
    # module.to() or ``param.data = ...`` replaces the storage the buffer held; the next step gathers again.
    reference, ref_params = _run(Prodigy, 10)
    params, targets = _params(), _targets()
    flat = FlatProdigy(params, **SETTINGS)
    for step in range(10):
        if step == 5:
            params[2].data = params[2].data.clone()
        _step(flat, params, targets, step)
    _assert_same(flat, params, reference, ref_params)


def test_zero_learning_rate_changes_nothing():
    params, targets = _params(), _targets()
    flat = FlatProdigy(params, **SETTINGS)
    before = [p.detach().clone() for p in params]
    flat.param_groups[0]["lr"] = 0.0
    _step(flat, params, targets, 0)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
    assert flat.param_groups[0]["k"] == 0 and flat.param_groups[0]["d"] == SETTINGS.get("d0", 1e-6)


def test_one_group_only():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="one parameter group"):
        FlatProdigy([{"params": [a]}, {"params": [b]}])
