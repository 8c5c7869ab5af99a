"""DoRA LoRAs in the predictor, applied exactly.

diffusers' kohya loader drops ``dora_scale`` and would apply only the LoRA direction. The predictor instead merges
each DoRA module into its UNet weight the way ComfyUI and A1111 do (output-axis decomposition, see
``trainer.adapters.lora.dora_scales_for_export``) and keeps the original rows to restore on switch or rescale.
"""

from __future__ import annotations

import torch

from trainer.export.kohya import UNET_PREFIX, diffusers_to_sgm


def has_dora(state: dict[str, torch.Tensor]) -> bool:
    return any(key.endswith(".dora_scale") for key in state)


def _kohya_names(unet, version: str) -> dict[str, torch.nn.Module]:
    """kohya module name -> the UNet's linear layer, for the attention projections that carry LoRA."""
    names = {}
    layers = unet.config.layers_per_block if version == "sdxl" else None
    for path, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".attn" not in path:
            continue
        name = diffusers_to_sgm(path, layers) if layers is not None else path
        names[f"{UNET_PREFIX}_{name.replace('.', '_')}"] = module
    return names


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

    def _dora_modules(self) -> list[str]:
        return [key[: -len(".dora_scale")] for key in self.state if key.endswith(".dora_scale")]

    @torch.no_grad()
    def apply(self, scale: float) -> None:
        if self.scale == scale:
            return
        self.restore()
        for name in self._dora_modules():
            layer = self.modules[name]
            weight = layer.weight
            self.originals[name] = weight.detach().clone()
            base = weight.float()
            down = self.state[f"{name}.lora_down.weight"].float().to(weight.device)
            up = self.state[f"{name}.lora_up.weight"].float().to(weight.device)
            alpha = float(self.state[f"{name}.alpha"])
            dora_scale = self.state[f"{name}.dora_scale"].float().to(weight.device)
            merged = (base + (up @ down) * (alpha / down.shape[0])) * (dora_scale / base.norm(dim=1, keepdim=True))
            # The LoRA scale blends between base and merged weight, as ComfyUI's strength does.
            weight.copy_((base + scale * (merged - base)).to(weight.dtype))
        self.scale = scale

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self.originals.items():
            self.modules[name].weight.copy_(original)
        self.originals = {}
        self.scale = None
