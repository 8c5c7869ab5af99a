"""The token attention probe: an attention processor that records how much attention the new tokens take.

It sits next to the adapters because, like them, it is installed into the UNet (as the attention processor of a few
cross-attention layers); the loss term it feeds is weighted in the training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class TokenAttentionProbe:
    """Records, in chosen cross-attention layers, how much attention each pixel gives the new tokens.

    Installed as the attention processor of those layers only while its weight is non-zero. The output of each
    layer is computed as usual (SDPA); the probe adds one small matrix product (queries × 77 keys) to get the
    attention probabilities and keeps the share that falls on the new-token positions.

    The loss (:meth:`loss`) is the mean share outside the concept mask when masks exist (the tokens should describe
    the concept, not the background), and the mean share overall when they do not (tokens that take attention from
    every pixel and every other word are the usual sign of an overfit embedding).
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None  # [B, 77] bool, set per step
        # Each probed layer keeps its own map (``_ProbeProcessor.map``) rather than appending to a list here: under
        # regional compilation a shared list's length is guarded on, so every probed layer compiled a graph of its
        # own (10 in SDXL's mid block) and hit Dynamo's recompile limit.
        self.processors: list[_ProbeProcessor] = []

    def reset(self, token_mask: torch.Tensor) -> None:
        """Arm the probe for one forward pass."""
        self.token_mask = token_mask
        self._clear()

    def processor(self) -> _ProbeProcessor:
        processor = _ProbeProcessor(self)
        self.processors.append(processor)
        return processor

    @property
    def maps(self) -> list[torch.Tensor]:
        """The maps recorded since the probe was armed, in layer order."""
        return [p.map for p in self.processors if p.map is not None]

    def _clear(self) -> None:
        for processor in self.processors:
            processor.map = None

    def loss(self, concept_mask: torch.Tensor | None) -> torch.Tensor:
        maps = self.maps
        if not maps:
            raise RuntimeError("token attention probe recorded nothing: no probed layer ran")
        values = []
        for share in maps:  # [B, Q]
            if concept_mask is None:
                values.append(share.mean())
                continue
            side_h, side_w = _layer_grid(share.shape[1], concept_mask.shape[-2], concept_mask.shape[-1])
            mask = F.adaptive_avg_pool2d(concept_mask.float(), (side_h, side_w)).flatten(1)
            outside = 1.0 - mask
            values.append((share * outside).sum(dim=1).div(outside.sum(dim=1).clamp(min=1.0)).mean())
        self._clear()
        return torch.stack(values).mean()

    def disarm(self) -> None:
        """Stop recording, after the backward pass: gradient checkpointing re-runs the forward during backward,
        and that recomputation must take the same path as the original forward."""
        self.token_mask = None
        self._clear()


def _layer_grid(n_queries: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    factor = math.sqrt(latent_h * latent_w / n_queries)
    return max(1, round(latent_h / factor)), max(1, round(latent_w / factor))


class _ProbeProcessor:
    def __init__(self, probe: TokenAttentionProbe) -> None:
        self.probe = probe
        self.map: torch.Tensor | None = None  # [B, Q], set while the probe is armed

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
            self.map = (probs * token_mask).sum(dim=-1).mean(dim=1)  # [B, Q]

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


def install_probe(unet) -> TokenAttentionProbe:
    """A probe installed as the attention processor of :func:`probe_layer_names`; the other layers keep theirs."""
    probe = TokenAttentionProbe()
    processors = dict(unet.attn_processors)
    for name in probe_layer_names(unet):
        processors[name] = probe.processor()
    unet.set_attn_processor(processors)
    return probe
