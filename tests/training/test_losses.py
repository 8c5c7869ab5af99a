"""Loss terms: properties of each; terms with weight 0 install nothing."""

from __future__ import annotations

import pytest
import torch

from trainer.training.losses import (
    conditioning_loss,
    denoising_loss,
    lora_l1,
    min_snr_weights,
    offset_noise,
    snr,
    target_for,
    token_covariance_loss,
)


def test_min_snr_weights_cap_easy_timesteps():
    values = torch.tensor([0.5, 5.0, 50.0])
    eps = min_snr_weights(values, 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 0.1]))
    v = min_snr_weights(values, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0]))


def test_snr_falls_with_the_timestep():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    values = snr(scheduler.alphas_cumprod, torch.tensor([0, 500, 999]))
    assert values[0] > values[1] > values[2] > 0


def test_v_prediction_target_differs_from_noise():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    steps = torch.tensor([10, 900])
    assert torch.equal(target_for("epsilon", latents, noise, steps, scheduler), noise)
    velocity = target_for("v_prediction", latents, noise, steps, scheduler)
    assert not torch.allclose(velocity, noise)
    with pytest.raises(ValueError, match="prediction_type must be"):
        target_for("sample", latents, noise, steps, scheduler)


def test_mask_weights_pixels_and_keeps_scale():
    pred, target = torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4)
    target[..., :2] = 3.0  # error 9 on the left half, 1 on the right
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:] = 1.0
    assert denoising_loss(pred, target, mask=mask).item() == pytest.approx(1.0)
    assert denoising_loss(pred, target).item() == pytest.approx(5.0)
    # A full mask equals no mask; per-sample weights scale samples.
    assert denoising_loss(pred, target, mask=torch.ones(1, 1, 4, 4)).item() == pytest.approx(5.0)
    assert denoising_loss(pred, target, weights=torch.tensor([0.5])).item() == pytest.approx(2.5)


def test_offset_noise_is_a_per_channel_constant():
    noise = torch.zeros(2, 4, 8, 8)
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shifted[..., :1, :1].expand_as(shifted))
    assert shifted.abs().sum() > 0
    assert offset_noise(noise, 0.0, None) is noise


def test_l1_is_the_mean_absolute_weight():
    params = [torch.full((2, 3), -2.0), torch.full((4,), 1.0)]
    assert lora_l1(params).item() == pytest.approx((12 + 4) / 10)


def test_l1_gradient_matches_autograd():
    from trainer.training.losses import add_l1_gradient

    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=generator, requires_grad=True) for _ in range(3)]
    params[1].data[0, 0] = 0.0  # the subgradient at 0 is 0 for both
    (0.7 * lora_l1(params)).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    add_l1_gradient(params, 0.7)
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, want)


def test_covariance_loss_is_small_inside_the_distribution_and_large_outside():
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(5000, 8, generator=generator) * torch.linspace(0.5, 2.0, 8)
    mean = table.mean(0)
    inverse = torch.linalg.inv(torch.cov(table.T))
    typical = token_covariance_loss(table[:10], mean, inverse)
    outlier = token_covariance_loss(torch.full((2, 8), 10.0), mean, inverse)
    assert typical.item() == pytest.approx(1.0, rel=0.5)
    assert outlier > 20 * typical


def test_conditioning_loss_can_focus_on_new_token_positions():
    embeds = torch.ones(1, 4, 2)
    embeds[0, 1] = 3.0
    mask = torch.tensor([[False, True, False, False]])
    assert conditioning_loss(embeds).item() == pytest.approx((1 + 9 + 1 + 1) / 4)
    assert conditioning_loss(embeds, mask).item() == pytest.approx(9.0)


def test_zero_weight_terms_install_nothing(tmp_path, model_cache):
    from tests.helpers import make_concept_images, prepared_dataset, tiny_config
    from trainer.training.session import setup

    images = make_concept_images(tmp_path / "images", n=2)
    config = tiny_config(images, tmp_path / "runs", token_attention_loss_w=0.0, tok_cov_reg_w=0.0)
    session, _ = setup(config, dataset=prepared_dataset(images, tmp_path))
    assert session.probe is None and session.cov_stats == []
    names = {type(p).__name__ for p in session.models.unet.attn_processors.values()}
    assert "_ProbeProcessor" not in names
