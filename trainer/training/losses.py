"""Losses: the denoising objective and the regularisers of pivotal tuning.

Every term with weight 0 is skipped entirely (no extra forward work, no extra kernels), so defaults cost nothing
beyond what is switched on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
def lora_l1(params: list[torch.Tensor]) -> torch.Tensor:
    """Mean absolute value of all LoRA weights (normalised by their count, as the Eden trainer does)."""
    total = sum(p.numel() for p in params)
    norms = torch._foreach_norm(params, 1)
    return torch.stack(norms).sum() / total


@torch.no_grad()
def add_l1_gradient(params: list[torch.Tensor], weight: float) -> None:
    """Add the gradient of ``weight × lora_l1(params)`` to the parameters' gradients directly.

    Autograd through the penalty would launch a few kernels per LoRA tensor (over a thousand on SDXL) in the
    backward pass; its gradient is simply ``weight / count × sign(p)``, which two multi-tensor kernels apply.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    total = sum(p.numel() for p in params)
    torch._foreach_add_([p.grad for p in with_grad], torch._foreach_sign(with_grad), alpha=weight / total)


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


# ---------------------------------------------------------------------------------- token attention loss
class TokenAttentionProbe:
    """Records, in chosen cross-attention layers, how much attention each pixel gives the new tokens.

    Installed as the attention processor of those layers only while its weight is non-zero. The output of each
    layer is computed as usual (SDPA); the probe adds one small matrix product (queries × 77 keys) to get the
    attention probabilities and keeps the share that falls on the new-token positions.

    The loss (:meth:`loss`) is the mean share outside the concept mask when masks exist (the tokens should describe
    the concept, not the background), and the mean share overall when they do not (tokens that take attention from
    every pixel and every other word are the usual sign of an overfit embedding).
    """

    def __init__(self):
        self.token_mask: torch.Tensor | None = None  # [B, 77] bool, set per step
        self.maps: list[torch.Tensor] = []

    def reset(self, token_mask: torch.Tensor) -> None:
        """Arm the probe for one forward pass."""
        self.token_mask = token_mask
        self.maps = []

    def processor(self):
        return _ProbeProcessor(self)

    def loss(self, concept_mask: torch.Tensor | None) -> torch.Tensor:
        if not self.maps:
            raise RuntimeError("token attention probe recorded nothing: no probed layer ran")
        values = []
        for share in self.maps:  # [B, Q]
            if concept_mask is None:
                values.append(share.mean())
                continue
            side_h, side_w = _layer_grid(share.shape[1], concept_mask.shape[-2], concept_mask.shape[-1])
            mask = F.adaptive_avg_pool2d(concept_mask.float(), (side_h, side_w)).flatten(1)
            outside = 1.0 - mask
            values.append((share * outside).sum(dim=1).div(outside.sum(dim=1).clamp(min=1.0)).mean())
        self.maps = []
        return torch.stack(values).mean()

    def disarm(self) -> None:
        """Stop recording, after the backward pass: gradient checkpointing re-runs the forward during backward,
        and that recomputation must take the same path as the original forward."""
        self.token_mask = None
        self.maps = []


def _layer_grid(n_queries: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    factor = math.sqrt(latent_h * latent_w / n_queries)
    return max(1, round(latent_h / factor)), max(1, round(latent_w / factor))


class _ProbeProcessor:
    def __init__(self, probe: TokenAttentionProbe):
        self.probe = probe

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError("the token attention probe is only installed on cross-attention layers")
        batch = hidden_states.shape[0]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        head_dim = query.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)

        if self.probe.token_mask is not None:  # armed for this training step; otherwise plain attention
            scores = (query @ key.transpose(-1, -2)) * attn.scale
            probs = scores.float().softmax(dim=-1)  # [B, H, Q, K]
            token_mask = self.probe.token_mask.to(probs.dtype)[:, None, None, :]
            self.probe.maps.append((probs * token_mask).sum(dim=-1).mean(dim=1))  # [B, Q]

        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            raise RuntimeError("residual attention is not used by SD1.5/SDXL cross-attention")
        return out / attn.rescale_output_factor


def probe_layer_names(unet) -> list[str]:
    """The cross-attention layers the probe watches: those of the mid block (lowest resolution, cheapest)."""
    names = [name for name in unet.attn_processors if name.startswith("mid_block") and ".attn2." in name]
    if not names:
        names = [name for name in unet.attn_processors if ".attn2." in name]
    return names


@dataclass
class LossWeights:
    l1: float = 0.0
    tok_cov: float = 0.0
    cond: float = 0.0
    tok_cond: float = 0.0
    attention: float = 0.0
