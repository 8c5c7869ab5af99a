"""The one place that knows about cuda, xpu, mps and cpu.

Everything else asks this module for a resolved :class:`DeviceInfo` and uses its helpers (synchronise, memory
statistics, autocast, generators), so backends differ in one file only. Requests for a device that is not there fail
here, at start-up, with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
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


def _availability(backend: str) -> tuple[Callable[[], bool], Callable[[], int]]:
    # Looked up at call time: tests fake a backend by patching the functions above.
    checks = {"cuda": ("cuda_available", "cuda_device_count"), "xpu": ("xpu_available", "xpu_device_count")}[backend]
    return (lambda: globals()[checks[0]]()), (lambda: globals()[checks[1]]())


#: The numbered GPU backends in the order ``auto`` tries them, with their availability checks.
_NUMBERED = {name: _availability(name) for name in ("cuda", "xpu")}


def _mps_bf16() -> bool:
    # bf16 on MPS needs macOS 14; torch reports it through a failing allocation on older systems.
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
        return True
    except (RuntimeError, TypeError):
        return False


def _bf16_supported(backend: str) -> bool:
    return BACKEND_TABLE[backend].bf16()


def _fp16_supported(backend: str) -> bool:
    return BACKEND_TABLE[backend].fp16


# ------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Backend:
    """What differs between backends, in one row each: the rest of this module reads the table."""

    module: str | None
    """The ``torch`` submodule of its runtime functions (``torch.cuda``, ``torch.xpu``, ``torch.mps``)."""
    numbered: bool = False
    """Devices are numbered (``cuda:1``) and the runtime functions take the device."""
    tracks_peak: bool = False
    """``max_memory_allocated`` and ``reset_peak_memory_stats`` exist."""
    fp16: bool = True
    """fp16 kernels for training exist (the CPU's are incomplete and slow)."""
    bf16: Callable[[], bool] = lambda: True
    """Whether this machine's device of the backend computes in bf16."""
    fused_adamw: bool = True
    bitsandbytes: bool = False
    compiles: bool = False
    """torch.compile pays off (Triton kernels)."""
    channels_last: bool = False
    """NHWC convolutions are faster (cuDNN and oneDNN on GPUs)."""
    cpu_generator: bool = False
    """Random draws for this device are made on the CPU (MPS generators are not reproducible across versions)."""
    label: str = ""
    """How messages name its devices (``2 XPU device(s)``)."""
    missing: str = ""
    """How messages say it is missing."""
    install_hint: str = ""
    """What to do when the backend is requested but missing."""


BACKEND_TABLE: dict[str, Backend] = {
    "cuda": Backend("cuda", numbered=True, bf16=lambda: torch.cuda.is_bf16_supported(), tracks_peak=True,
                    bitsandbytes=True, compiles=True, channels_last=True,
                    label="CUDA", missing="CUDA is not available",
                    install_hint="use device 'auto' or 'cpu', or install the CUDA build (requirements/cuda.txt)"),
    "xpu": Backend("xpu", numbered=True, tracks_peak=True, compiles=True, channels_last=True,
                   label="XPU", missing="no Intel XPU is available",
                   install_hint="install the XPU build (requirements/xpu.txt), check the GPU driver (Level Zero) and, "
                                "in a container, pass --device /dev/dri; or use device 'auto' or 'cpu'"),
    "mps": Backend("mps", bf16=_mps_bf16, cpu_generator=True, label="MPS",
                   missing="Apple MPS is not available on this machine"),
    "cpu": Backend(None, fp16=False),
}


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
    def traits(self) -> Backend:
        return BACKEND_TABLE[self.backend]

    @property
    def _runtime(self) -> Any:
        return getattr(torch, self.traits.module) if self.traits.module else None

    def _device_args(self) -> tuple:
        return (self.device,) if self.traits.numbered else ()

    @property
    def uses_autocast(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if not self.uses_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.backend, dtype=self.dtype)

    def synchronize(self) -> None:
        if self._runtime is not None:
            self._runtime.synchronize(*self._device_args())

    def empty_cache(self) -> None:
        if self._runtime is not None:
            self._runtime.empty_cache()

    def reset_peak_memory(self) -> None:
        if self.traits.tracks_peak:
            self._runtime.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int | None:
        """Peak allocated device memory since the last reset, or None where the backend does not track it (MPS
        reports what its driver holds now instead)."""
        if self.traits.tracks_peak:
            return self._runtime.max_memory_allocated(self.device)
        if self._runtime is not None and hasattr(self._runtime, "driver_allocated_memory"):
            return self._runtime.driver_allocated_memory()
        return None

    def generator(self, seed: int) -> torch.Generator:
        """A generator on this device: random draws happen where the tensors live, with no host copy."""
        gen = torch.Generator(device="cpu" if self.traits.cpu_generator else self.device)
        gen.manual_seed(seed)
        return gen

    def rng_state(self) -> dict[str, Any]:
        if not self.traits.numbered:
            return {}
        return {self.backend: self._runtime.get_rng_state_all()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        if self.traits.numbered and self.backend in state:
            self._runtime.set_rng_state_all(state[self.backend])

    @property
    def supports_fused_adamw(self) -> bool:
        return self.traits.fused_adamw

    @property
    def supports_bitsandbytes(self) -> bool:
        return self.traits.bitsandbytes

    @property
    def supports_compile(self) -> bool:
        """torch.compile pays off (Triton kernels) on CUDA and XPU."""
        return self.traits.compiles

    @property
    def prefers_channels_last(self) -> bool:
        """NHWC convolutions are faster with cuDNN and oneDNN on GPUs; on CPU and MPS they are not."""
        return self.traits.channels_last

    def describe(self) -> str:
        name = self.backend
        if self.traits.numbered:
            name = f"{self.device} ({self._runtime.get_device_name(self.device)})"
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
    return index is not None and backend in _NUMBERED and index >= _NUMBERED[backend][1]()


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
        for name, (available, _count) in _NUMBERED.items():
            if available():
                return select_device(f"{name}:{index or 0}")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if backend == "cpu":
        return torch.device("cpu")
    traits = BACKEND_TABLE[backend]
    if backend == "mps":
        if not mps_available():
            raise DeviceError(f"device {spec!r} was requested but {traits.missing}")
        return torch.device("mps")
    available, count = _NUMBERED[backend]
    if not available():
        raise DeviceError(f"device {spec!r} was requested but {traits.missing} (torch {torch.__version__}"
                          f"{_build_of(backend)}); {traits.install_hint}")
    if (index or 0) >= count():
        raise DeviceError(f"device {spec!r} was requested but only {count()} {traits.label} device(s) exist")
    return torch.device(backend, index or 0)


def _build_of(backend: str) -> str:
    return f", built with CUDA {torch.version.cuda}" if backend == "cuda" else ""


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
        intel_extension()
    info = DeviceInfo(device=device, dtype=dtype)
    logger.info("device: %s", info.describe())
    return info


_IPEX: Any = None


def intel_extension() -> Any:
    """Intel Extension for PyTorch, imported once where present, else None. It is optional (end of life after 2.8):
    importing it registers its XPU kernels; nothing else here needs it."""
    global _IPEX
    if _IPEX is None:
        try:
            import intel_extension_for_pytorch as ipex  # type: ignore[import-not-found]

            _IPEX = ipex
        except Exception:
            _IPEX = False
    return _IPEX or None


def cpu_rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_cpu_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
