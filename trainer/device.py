"""The one place that knows about cuda, xpu, mps and cpu.

Everything else asks this module for a resolved :class:`DeviceInfo` and uses its helpers (synchronise, memory
statistics, autocast, generators), so backends differ in one file only. Requests for a device that is not there fail
here, at start-up, with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("cuda", "xpu", "mps", "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
#: The device name used in user-facing code examples (usage READMEs).
EXAMPLE_ACCELERATOR = "cuda"


class DeviceError(ValueError):
    """A device request that cannot be satisfied on this machine."""


# --------------------------------------------------------------------------------------- availability checks
# Tests fake other backends by patching exactly these functions.
def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    return torch.cuda.device_count() if cuda_available() else 0


def xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def xpu_device_count() -> int:
    return torch.xpu.device_count() if xpu_available() else 0


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def _bf16_supported(backend: str) -> bool:
    if backend == "cuda":
        return torch.cuda.is_bf16_supported()
    if backend == "xpu":
        return True
    if backend == "mps":
        # bf16 on MPS needs macOS 14; torch reports it through a failing allocation on older systems.
        try:
            torch.zeros(1, dtype=torch.bfloat16, device="mps")
            return True
        except (RuntimeError, TypeError):
            return False
    return True


def _fp16_supported(backend: str) -> bool:
    # CPU kernels for fp16 training are incomplete and slow; the other backends have them.
    return backend != "cpu"


# ------------------------------------------------------------------------------------------------- the device
@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    dtype: torch.dtype
    """Working dtype of frozen weights and of autocast."""

    @property
    def backend(self) -> str:
        return self.device.type

    @property
    def uses_autocast(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if not self.uses_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.backend, dtype=self.dtype)

    def synchronize(self) -> None:
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.backend == "xpu":
            torch.xpu.synchronize(self.device)
        elif self.backend == "mps":
            torch.mps.synchronize()

    def empty_cache(self) -> None:
        if self.backend == "cuda":
            torch.cuda.empty_cache()
        elif self.backend == "xpu":
            torch.xpu.empty_cache()
        elif self.backend == "mps":
            torch.mps.empty_cache()

    def reset_peak_memory(self) -> None:
        if self.backend == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.backend == "xpu":
            torch.xpu.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int | None:
        """Peak allocated device memory since the last reset, or None where the backend does not track it."""
        if self.backend == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.backend == "xpu":
            return torch.xpu.max_memory_allocated(self.device)
        if self.backend == "mps":
            return torch.mps.driver_allocated_memory()
        return None

    def generator(self, seed: int) -> torch.Generator:
        """A generator on this device: random draws happen where the tensors live, with no host copy."""
        gen = torch.Generator(device=self.device if self.backend != "mps" else "cpu")
        gen.manual_seed(seed)
        return gen

    def rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.backend == "cuda":
            state["cuda"] = torch.cuda.get_rng_state_all()
        elif self.backend == "xpu":
            state["xpu"] = torch.xpu.get_rng_state_all()
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        if self.backend == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])
        elif self.backend == "xpu" and "xpu" in state:
            torch.xpu.set_rng_state_all(state["xpu"])

    @property
    def supports_fused_adamw(self) -> bool:
        return self.backend in ("cuda", "xpu", "mps", "cpu")

    @property
    def supports_bitsandbytes(self) -> bool:
        return self.backend == "cuda"

    @property
    def supports_compile(self) -> bool:
        """torch.compile pays off (Triton kernels) on CUDA and XPU."""
        return self.backend in ("cuda", "xpu")

    @property
    def prefers_channels_last(self) -> bool:
        """NHWC convolutions are faster with cuDNN and oneDNN on GPUs; on CPU and MPS they are not."""
        return self.backend in ("cuda", "xpu")

    @property
    def pin_memory(self) -> bool:
        return self.backend == "cuda"

    def describe(self) -> str:
        name = self.backend
        if self.backend == "cuda":
            name = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        elif self.backend == "xpu":
            name = f"{self.device} ({torch.xpu.get_device_name(self.device)})"
        return f"{name}, {DTYPE_NAMES[self.dtype]}"


def parse_device(spec: str) -> tuple[str, int | None]:
    spec = spec.strip().lower()
    backend, _, index = spec.partition(":")
    if backend not in (*BACKENDS, "auto") or (index and not index.isdigit()) or (spec.endswith(":") and not index):
        raise DeviceError(f"device must be one of 'auto', 'cpu', 'cuda[:N]', 'xpu[:N]' or 'mps', got {spec!r}")
    if backend == "mps" and index not in ("", "0"):
        raise DeviceError(f"device {spec!r}: 'mps' has a single device, mps:0")
    if backend in ("cpu", "auto") and index:
        raise DeviceError(f"device {spec!r}: '{backend}' takes no index")
    return backend, int(index) if index else None


def is_missing_numbered_gpu(spec: object) -> bool:
    """True for a numbered CUDA or XPU device this machine lacks, the form Eden's saved configs carry (its config
    replaces the device by its best GPU, so the saved value never mattered to it)."""
    if not isinstance(spec, str):
        return False
    try:
        backend, index = parse_device(spec)
    except DeviceError:
        return False
    counts = {"cuda": cuda_device_count, "xpu": xpu_device_count}
    return index is not None and backend in counts and index >= counts[backend]()


def select_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """Resolve a device string, failing early with the reason when it is not available.

    ``local_rank`` (multi-process runs) picks each process's own GPU when the spec names no index.
    """
    backend, index = parse_device(spec)
    if local_rank is not None and index is None:
        index = local_rank
    if backend == "auto":
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            return torch.device("cpu")
        if cuda_available():
            return select_device(f"cuda:{index or 0}")
        if xpu_available():
            return select_device(f"xpu:{index or 0}")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "cuda":
        if not cuda_available():
            raise DeviceError(
                f"device {spec!r} was requested but CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}); use device 'auto' or 'cpu', or install the CUDA build "
                "(requirements-cuda.txt)"
            )
        count = cuda_device_count()
        if (index or 0) >= count:
            raise DeviceError(f"device {spec!r} was requested but only {count} CUDA device(s) exist")
        return torch.device("cuda", index or 0)
    if backend == "xpu":
        if not xpu_available():
            raise DeviceError(
                f"device {spec!r} was requested but no Intel XPU is available (torch {torch.__version__}); "
                "install the XPU build (requirements-xpu.txt), check the GPU driver (Level Zero) and, in a container, "
                "pass --device /dev/dri; or use device 'auto' or 'cpu'"
            )
        count = xpu_device_count()
        if (index or 0) >= count:
            raise DeviceError(f"device {spec!r} was requested but only {count} XPU device(s) exist")
        return torch.device("xpu", index or 0)
    if not mps_available():
        raise DeviceError(f"device {spec!r} was requested but Apple MPS is not available on this machine")
    return torch.device("mps")


def resolve_dtype(backend: str, weight_type: str) -> torch.dtype:
    """The working dtype for ``weight_type`` on ``backend``, with a logged fallback where it is unsupported."""
    if weight_type not in DTYPES:
        raise DeviceError(f"weight_type must be one of {sorted(DTYPES)}, got {weight_type!r}")
    dtype = DTYPES[weight_type]
    if dtype == torch.bfloat16 and not _bf16_supported(backend):
        fallback = torch.float16 if _fp16_supported(backend) else torch.float32
        logger.warning("bf16 is not supported on %s; using %s instead", backend, DTYPE_NAMES[fallback])
        return fallback
    if dtype == torch.float16 and not _fp16_supported(backend):
        logger.warning("fp16 training is not supported on %s; using bf16 instead", backend)
        return torch.bfloat16
    return dtype


def setup_device(spec: str = "auto", weight_type: str = "bf16", allow_tf32: bool = True,
                 local_rank: int | None = None) -> DeviceInfo:
    """Select the device, its working dtype and its maths settings; import Intel's extension where present."""
    device = select_device(spec, local_rank)
    dtype = resolve_dtype(device.type, weight_type)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    if device.type == "xpu":
        _import_ipex()
    info = DeviceInfo(device=device, dtype=dtype)
    logger.info("device: %s", info.describe())
    return info


_IPEX = None


def _import_ipex():
    """Intel Extension for PyTorch is optional (end of life after 2.8): use it only where it imports."""
    global _IPEX
    if _IPEX is None:
        try:
            import intel_extension_for_pytorch as ipex  # type: ignore[import-not-found]

            _IPEX = ipex
        except Exception:
            _IPEX = False
    return _IPEX or None


def ipex_optimize(model: torch.nn.Module, optimizer=None, dtype: torch.dtype | None = None):
    """Apply ``ipex.optimize`` on XPU when the extension imports; otherwise return the inputs unchanged."""
    ipex = _import_ipex()
    if ipex is None:
        return (model, optimizer) if optimizer is not None else model
    return ipex.optimize(model, optimizer=optimizer, dtype=dtype)


def cpu_rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_cpu_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
