"""Input-axis DoRA on Linear, 1x1 and 3x3 Conv2d layers: trained, exported, and rebuilt by each client's formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.clients import CLIENT_WEIGHTS
from trainer.adapters import dora
from trainer.adapters.lora import load_lora_state_dict, lora_state_dict
from trainer.export.kohya import check_kohya_state, peft_to_kohya

TARGETS = ("proj", "pointwise", "conv")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 10)
        self.pointwise = nn.Conv2d(10, 8, 1)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):  # x: [batch, tokens=16, 12] -> a 4x4 map
        h = self.proj(x)
        h = h.transpose(1, 2).reshape(x.shape[0], 10, 4, 4)
        return self.conv(torch.relu(self.pointwise(h)))


def _toy_with_dora(seed=0, alpha=8.0):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = Toy()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, target_modules=list(TARGETS)), model)
    magnitudes = dora.add_dora(model)
    return model, magnitudes


def _train(model, steps=30):
    torch.manual_seed(1)
    x, target = torch.randn(4, 16, 12), torch.randn(4, 6, 4, 4)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()


def _base_weights(model):
    return {name: module.get_base_layer().weight.detach().clone() for name, module in dora.dora_layers(model).items()}


def test_dora_starts_as_the_base_model_and_its_magnitudes_train():
    model, magnitudes = _toy_with_dora()
    assert [tuple(m.shape) for m in magnitudes] == [(1, 12), (1, 10, 1, 1), (1, 8, 1, 1)]
    x = torch.randn(2, 16, 12)
    with torch.no_grad():
        start = model(x)
        for module in dora.dora_layers(model).values():
            module.enable_adapters(False)  # peft's switch, which our forward honours
        base = model(x)
        for module in dora.dora_layers(model).values():
            module.enable_adapters(True)
    torch.testing.assert_close(start, base)
    before = [m.detach().clone() for m in magnitudes]
    _train(model)
    assert all(not torch.allclose(b, m) for b, m in zip(before, magnitudes, strict=True))
    with torch.no_grad():
        assert not torch.allclose(model(x), base, atol=1e-3)


@pytest.mark.parametrize("client", sorted(CLIENT_WEIGHTS))
@pytest.mark.parametrize("save_dtype", [torch.float32, torch.float16])
def test_each_client_rebuilds_the_trained_layers(client, save_dtype):
    model, _ = _toy_with_dora()
    base = _base_weights(model)
    _train(model)
    state = peft_to_kohya(lora_state_dict(model), "lora_unet", 8.0, dtype=save_dtype)
    check_kohya_state(state)
    rebuild = CLIENT_WEIGHTS[client]
    worst = 0.0
    for name, module in dora.dora_layers(model).items():
        key = f"lora_unet_{name}"
        assert state[f"{key}.dora_scale"].dtype == torch.float32, "dora_scale must stay fp32"
        assert state[f"{key}.lora_down.weight"].dtype == save_dtype
        trained = dora.merged_weight(module).detach()
        rebuilt = rebuild(base[name], state, key)
        change = (trained - base[name]).norm()
        assert change > 1e-3 * base[name].norm(), "the layer did not train"
        worst = max(worst, ((rebuilt - trained).norm() / change).item())
    # fp32 files: float error only; fp16 files: the LoRA matrices' fp16 rounding, the magnitudes kept in fp32.
    assert worst < (1e-4 if save_dtype == torch.float32 else 5e-3), worst


@pytest.mark.parametrize("client", sorted(CLIENT_WEIGHTS))
def test_the_layers_compute_what_the_clients_rebuild_at_any_strength(client):
    """The module's own forward (training, samples at a LoRA scale) equals the clients' patched layers."""
    model, _ = _toy_with_dora()
    base = _base_weights(model)
    _train(model)
    state = peft_to_kohya(lora_state_dict(model), "lora_unet", 8.0, dtype=torch.float32)
    layers = dora.dora_layers(model)
    x = {"proj": torch.randn(3, 12), "pointwise": torch.randn(3, 10, 4, 4), "conv": torch.randn(3, 8, 5, 5)}
    for strength in (1.0, 0.6):
        for name, module in layers.items():
            module.set_scale(dora.ADAPTER_NAME, strength)
            layer = module.get_base_layer()
            weight = CLIENT_WEIGHTS[client](base[name], state, f"lora_unet_{name}", strength)
            with torch.no_grad():
                ours = module(x[name])
                if isinstance(layer, nn.Linear):
                    theirs = torch.nn.functional.linear(x[name], weight, layer.bias)
                else:
                    theirs = layer._conv_forward(x[name], weight, layer.bias)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_truncated_or_output_axis_dora_scale_is_refused():
    model, _ = _toy_with_dora()
    state = peft_to_kohya(lora_state_dict(model), "lora_unet", 8.0, dtype=torch.float32)
    state["lora_unet_proj.dora_scale"] = torch.ones(10, 1)  # peft's output axis
    with pytest.raises(ValueError, match="not on the input axis"):
        check_kohya_state(state)


def test_checkpoint_state_round_trips_the_magnitudes():
    model, _ = _toy_with_dora()
    _train(model)
    state = lora_state_dict(model)
    assert {k for k in state if k.endswith(".dora_scale")} == {f"{t}.dora_scale" for t in TARGETS}
    fresh, _ = _toy_with_dora()
    load_lora_state_dict(fresh, state)
    x = torch.randn(2, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    plain = Toy()
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=list(TARGETS)), plain)
    with pytest.raises(ValueError, match="use_dora"):
        load_lora_state_dict(plain, state)


def test_add_dora_needs_lora_layers():
    with pytest.raises(ValueError, match="no LoRA layers"):
        dora.add_dora(Toy())


@pytest.mark.slow  # compiles the UNet's blocks (the compile-equivalence test)
def test_compiled_dora_matches_eager():
    """The UNet's blocks are compiled regionally with the DoRA layers inside: graph capture must keep them."""
    model, _ = _toy_with_dora()
    _train(model, steps=5)
    x = torch.randn(2, 16, 12)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.zero_grad()
    eager_out = model(x)
    eager_out.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager_out)
    for grad, expected in zip((p.grad for p in model.parameters() if p.requires_grad), eager_grads, strict=True):
        torch.testing.assert_close(grad, expected)


def test_a_resumed_dora_run_equals_an_uninterrupted_one(tmp_path, model_cache):
    from tests.helpers import make_concept_images, prepared_dataset, tiny_config
    from trainer.training import loop
    from trainer.training.errors import TrainingCancelled
    from trainer.training.session import setup

    images = make_concept_images(tmp_path / "images", n=2)
    dataset = prepared_dataset(images, tmp_path / "prepared")
    # checkpoint_rule every: a checkpoint at 3 of 6 steps (Eden's rule saves none within 25 steps of the end).
    settings = {"model": "tiny-sd15", "use_dora": True, "max_train_steps": 6, "checkpointing_steps": 3,
                "checkpoint_rule": "every", "unet_lr": 1e-2}

    def session(folder, **extra):
        return setup(tiny_config(images, tmp_path / folder, **settings, **extra), dataset=dataset)

    straight, _ = session("a")
    loop.run(straight, make_zip=False)
    interrupted, _ = session("b")
    calls = []
    with pytest.raises(TrainingCancelled):
        loop.run(interrupted, should_stop=lambda: calls.append(1) or len(calls) > 4, make_zip=False)
    resumed, state = session("b", resume_from=str(interrupted.run_dir))
    assert state["step"] == 3
    loop.run(resumed, state, make_zip=False)
    expected, got = lora_state_dict(straight.models.unet), lora_state_dict(resumed.models.unet)
    assert expected.keys() == got.keys() and any(k.endswith(".dora_scale") for k in got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
