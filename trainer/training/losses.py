"""Losses: the denoising objective and the regularisers of pivotal tuning.

Every term with weight 0 is skipped entirely (no extra forward work, no extra kernels), so defaults cost nothing
beyond what is switched on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------- denoising
def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at the given timesteps."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (arXiv 2303.09556): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped / snr_values


def target_for(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               scheduler) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def denoising_loss(model_pred: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel MSE, weighted by the mask where given (normalised by mask area), then by per-sample weights."""
    error = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if mask is not None:
        # The mask weights pixels; dividing by its area keeps small masks from shrinking the loss scale.
        per_sample = (error * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * error.shape[1]).clamp(min=1e-6)
    else:
        per_sample = error.mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    """Add a per-sample, per-channel constant so the model learns to shift overall brightness."""
    if strength == 0:
        return noise
    shift = torch.randn(noise.shape[0], noise.shape[1], 1, 1, device=noise.device, dtype=noise.dtype,
                        generator=generator)
    return noise + strength * shift


# ---------------------------------------------------------------------------------------------- regularisers
def lora_l1(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean absolute value of all LoRA weights (normalised by their count, as the Eden trainer does)."""
    total = sum(p.numel() for p in params)
    norms = torch._foreach_norm(list(params), 1)
    return torch.stack(norms).sum() / total


@torch.no_grad()
def add_l1_gradient(params: Sequence[torch.Tensor], weight: float) -> None:
    """Add the gradient of ``weight × lora_l1(params)`` to the parameters' gradients directly.

    Autograd through the penalty would launch a few kernels per LoRA tensor (over a thousand on SDXL) in the
    backward pass; its gradient is simply ``weight / count × sign(p)``, which two multi-tensor kernels apply.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    total = sum(p.numel() for p in params)
    grads = [p.grad for p in with_grad if p.grad is not None]
    torch._foreach_add_(grads, torch._foreach_sign(with_grad), alpha=weight / total)


def token_covariance_loss(rows: torch.Tensor, mean: torch.Tensor, inverse_covariance: torch.Tensor) -> torch.Tensor:
    """Mean squared Mahalanobis distance of the new rows from the pretrained distribution, per dimension."""
    centred = rows.float() - mean
    return ((centred @ inverse_covariance) * centred).sum(dim=-1).mean() / rows.shape[-1]


def conditioning_loss(prompt_embeds: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean square of the prompt embeddings (over all positions, or only where ``token_mask`` is true)."""
    squares = prompt_embeds.float().pow(2).mean(dim=-1)
    if token_mask is None:
        return squares.mean()
    weights = token_mask.to(squares.dtype)
    return (squares * weights).sum() / weights.sum().clamp(min=1.0)
