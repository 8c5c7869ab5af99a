"""A LAION-style aesthetic predictor: an MLP on unit-length CLIP image embeddings, giving a score of about 1 to 10.

The layout is that of LAION's improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE.pth``, trained on CLIP
ViT-L/14 embeddings): ``layers.0`` 768→1024, ``layers.2`` 1024→128, ``layers.4`` 128→64, ``layers.6`` 64→16,
``layers.7`` 16→1, with dropout between them and no activations (their ReLUs are commented out upstream). Any chain
of ``layers.N`` linear layers ending in one output loads, so other heads trained the same way work too. The
embedding width must match the CLIP model the scores are computed with.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

from trainer.utils.download import download, redact_url

logger = logging.getLogger(__name__)

LAION_WEIGHTS = "sac+logos+ava1-l14-linearMSE.pth"
LAION_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor"
#: The predictor is a few MB; refuse a download far beyond that (a wrong link to a whole model).
MAX_WEIGHTS_BYTES = 512 << 20
_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


class AestheticPredictor(nn.Module):
    """The linear chain of the LAION head; dropout is a no-op at inference, so it is left out."""

    def __init__(self, layers: list[nn.Linear], source: str = ""):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.source = source

    @property
    def input_dim(self) -> int:
        return self.layers[0].in_features

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores (N,) for unit-length embeddings (N, D)."""
        x = embeddings.to(self.layers[0].weight.dtype)
        for layer in self.layers:
            x = layer(x)
        return x.squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = "weights") -> AestheticPredictor:
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"{source} does not hold a state dict")
        indices = sorted({int(m[1]) for key in state if (m := _KEY.match(key))})
        if not indices:
            sample = ", ".join(list(state)[:4]) or "none"
            raise ValueError(
                f"{source} is not a LAION-style aesthetic predictor: expected layers.N.weight / layers.N.bias tensors "
                f"as in {LAION_WEIGHTS} ({LAION_URL}), found keys {sample}"
            )
        layers = []
        for index in indices:
            weight, bias = state.get(f"layers.{index}.weight"), state.get(f"layers.{index}.bias")
            if weight is None or bias is None or weight.dim() != 2 or bias.shape != weight.shape[:1]:
                raise ValueError(f"{source}: layers.{index} is not a linear layer (needs a 2-d weight and its bias)")
            if layers and layers[-1].out_features != weight.shape[1]:
                raise ValueError(f"{source}: layers.{index} takes {weight.shape[1]} inputs but the layer before it "
                                 f"gives {layers[-1].out_features}")
            layer = nn.Linear(weight.shape[1], weight.shape[0])
            layer.weight.data.copy_(weight.float())
            layer.bias.data.copy_(bias.float())
            layers.append(layer)
        if layers[-1].out_features != 1:
            raise ValueError(f"{source}: the last layer gives {layers[-1].out_features} outputs; a score needs 1")
        model = cls(layers, source)
        model.requires_grad_(False)
        return model.eval()


def load_aesthetic_predictor(location: str, cache_dir: Path) -> AestheticPredictor:
    """Load weights from a local ``.pth`` / ``.pt`` / ``.safetensors`` file or an http(s) URL (downloaded once)."""
    path = _local_weights(location, cache_dir)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # any parse failure means "not a weights file"
            raise ValueError(f"aesthetic weights {path} are not a readable .safetensors file ({error})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # likewise: pickles with code, truncated files, other formats
            raise ValueError(
                f"aesthetic weights {path} are not a readable PyTorch state dict ({type(error).__name__}); expected "
                f"{LAION_WEIGHTS} from {LAION_URL}"
            ) from None
    model = AestheticPredictor.from_state_dict(state, source=path.name)
    logger.info("aesthetic predictor: %s (%d-d input)", path.name, model.input_dim)
    return model


def _local_weights(location: str, cache_dir: Path) -> Path:
    location = (location or "").strip()
    if location.startswith(("http://", "https://")):
        name = Path(urlsplit(location).path).name or LAION_WEIGHTS
        digest = hashlib.sha256(location.split("?")[0].encode()).hexdigest()[:16]
        target = Path(cache_dir) / "downloads" / digest / name
        if target.is_file():
            return target
        logger.info("downloading the aesthetic predictor from %s", redact_url(location))
        try:
            return download(location, target, max_bytes=MAX_WEIGHTS_BYTES)
        except ValueError as error:
            raise ValueError(f"could not download the aesthetic weights: {error}. Download {LAION_WEIGHTS} "
                             f"({LAION_URL}) yourself and pass its local path") from None
    path = Path(location).expanduser()
    if not path.is_file():
        raise ValueError(
            f"aesthetic weights {location!r} do not exist: download {LAION_WEIGHTS} from {LAION_URL} and pass its "
            "path (or an http(s) URL to it), or leave the aesthetic weights out to skip the aesthetic score"
        )
    return path
