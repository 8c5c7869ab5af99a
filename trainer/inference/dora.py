"""DoRA LoRAs in the predictor, applied exactly.

diffusers' kohya loader drops ``dora_scale`` and would apply only the LoRA direction. The predictor instead merges
each DoRA module into its UNet weight the way A1111, InvokeAI and ComfyUI do (per input column, see
``trainer.adapters.dora``) and keeps the original weights to restore on switch or rescale.
"""

from __future__ import annotations

import torch

from trainer.adapters.dora import column_norms
from trainer.export.kohya import DORA_SCALE, UNET_PREFIX, check_kohya_state, diffusers_to_sgm


def has_dora(state: dict[str, torch.Tensor]) -> bool:
    return any(key.endswith(f".{DORA_SCALE}") for key in state)


def _kohya_names(unet, version: str) -> dict[str, torch.nn.Module]:
    """kohya module name -> the UNet's linear or conv layer, for every layer the exporter can name."""
    names = {}
    layers = unet.config.layers_per_block if version == "sdxl" else None
    for path, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        try:
            name = diffusers_to_sgm(path, layers) if layers is not None else path
        except ValueError:
            continue  # a layer kohya's SGM names do not cover carries no LoRA
        names[f"{UNET_PREFIX}_{name.replace('.', '_')}"] = module
    return names


def dora_target(base: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float,
                dora_scale: torch.Tensor) -> torch.Tensor:
    """The trained weight: (W + ΔW) · dora_scale / ‖W + ΔW‖ per input column, in fp32."""
    delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(base.shape) * (alpha / down.shape[0])
    combined = base.float() + delta
    return combined * (dora_scale.float() / column_norms(combined))


class MergedDora:
    """UNet DoRA modules merged into the weights at a LoRA scale; ``restore`` puts the base weights back."""

    def __init__(self, unet, version: str, state: dict[str, torch.Tensor]):
        self.unet = unet
        self.modules = _kohya_names(unet, version)
        self.state = state
        self.scale: float | None = None
        self.originals: dict[str, torch.Tensor] = {}
        missing = [k for k in self._dora_modules() if k not in self.modules]
        if missing:
            raise ValueError(f"the DoRA LoRA names modules this UNet lacks, e.g. {missing[0]}")
        # The file comes from a request: shapes that merely broadcast would give wrong weights without an error.
        check_kohya_state(state)
        for name in self._dora_modules():
            shape = tuple(self.modules[name].weight.shape)
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
            if tuple(down.shape[1:]) != shape[1:] or up.shape[0] != shape[0] or up[0].numel() != down.shape[0]:
                raise ValueError(f"the DoRA module {name} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                                 f"which do not fit the UNet layer's weight {shape}")

    def _dora_modules(self) -> list[str]:
        return [key[: -len(DORA_SCALE) - 1] for key in self.state if key.endswith(f".{DORA_SCALE}")]

    @torch.no_grad()
    def apply(self, scale: float) -> None:
        if self.scale == scale:
            return
        self.restore()
        for name in self._dora_modules():
            weight = self.modules[name].weight
            self.originals[name] = weight.detach().clone()
            device = weight.device
            base = weight.float()
            target = dora_target(base, self.state[f"{name}.lora_up.weight"].to(device),
                                 self.state[f"{name}.lora_down.weight"].to(device), float(self.state[f"{name}.alpha"]),
                                 self.state[f"{name}.{DORA_SCALE}"].to(device))
            # The LoRA scale blends between base and trained weight, as the clients' LoRA strength does.
            weight.copy_((base + scale * (target - base)).to(weight.dtype))
        self.scale = scale

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self.originals.items():
            self.modules[name].weight.copy_(original)
        self.originals = {}
        self.scale = None
