"""The token attention probe on a real (tiny) UNet: where it is installed, what it measures, its gradients."""

from __future__ import annotations

import pytest
import torch

from trainer.adapters.attention_probe import TokenAttentionProbe, probe_layer_names


@pytest.fixture
def unet_with_probe(model_cache):
    from trainer.models.loading import load_models, model_cache_dir, resolve_source

    models = load_models(resolve_source("tiny-sd15", None, None, model_cache_dir()))
    probe = TokenAttentionProbe()
    layers = probe_layer_names(models.unet)
    processors = dict(models.unet.attn_processors)
    plain = {k: v for k, v in processors.items()}
    for name in layers:
        processors[name] = probe.processor()
    models.unet.set_attn_processor(processors)
    return models.unet, probe, layers, plain


def test_probe_watches_only_mid_block_cross_attention(unet_with_probe):
    _, _, layers, _ = unet_with_probe
    assert layers and all(name.startswith("mid_block") and ".attn2." in name for name in layers)


def test_probe_measures_attention_on_new_tokens_and_passes_gradients(unet_with_probe):
    unet, probe, _, _ = unet_with_probe
    latents = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, 32, requires_grad=True)
    token_mask = torch.zeros(2, 77, dtype=torch.bool)
    token_mask[:, 5:7] = True
    steps = torch.tensor([10, 500])

    with torch.no_grad():
        reference = unet(latents, steps, text).sample
    probe.reset(token_mask)
    out = unet(latents, steps, text).sample
    # The probe's processor computes the same attention output as the default one.
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    share = probe.maps[0]
    assert share.shape == (2, 4 * 4) and (share > 0).all() and (share < 1).all()
    unmasked = probe.loss(None)
    assert 0 < unmasked.item() < 1
    unmasked.backward()
    assert text.grad is not None and text.grad[:, 5:7].abs().sum() > 0
    probe.disarm()

    # With a concept mask, only attention outside the mask counts: a full mask leaves nothing outside.
    probe.reset(token_mask)
    unet(latents, steps, text)
    assert probe.loss(torch.ones(2, 1, 8, 8)).item() == pytest.approx(0.0, abs=1e-7)
    probe.disarm()
    with torch.no_grad():
        unet(latents, steps, text)
    assert probe.maps == []  # disarmed: nothing recorded
