"""Device selection and precision. Other backends are faked only at their availability checks."""

from __future__ import annotations

import pytest
import torch

from trainer import device as dev


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(dev, "cuda_available", lambda: False)
    monkeypatch.setattr(dev, "xpu_available", lambda: False)
    monkeypatch.setattr(dev, "mps_available", lambda: False)


def test_cpu_and_auto_on_a_cpu_machine(no_accelerators):
    assert dev.select_device("cpu") == torch.device("cpu")
    assert dev.select_device("auto") == torch.device("cpu")
    info = dev.setup_device("cpu", "fp32")
    assert info.device.type == "cpu" and info.dtype == torch.float32 and not info.uses_autocast


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        ({"cuda": True, "xpu": True, "mps": True}, "cuda"),
        ({"cuda": False, "xpu": True, "mps": True}, "xpu"),
        ({"cuda": False, "xpu": False, "mps": True}, "mps"),
        ({"cuda": False, "xpu": False, "mps": False}, "cpu"),
    ],
)
def test_auto_prefers_cuda_then_xpu_then_mps_then_cpu(monkeypatch, available, expected):
    monkeypatch.setattr(dev, "cuda_available", lambda: available["cuda"])
    monkeypatch.setattr(dev, "cuda_device_count", lambda: 2 if available["cuda"] else 0)
    monkeypatch.setattr(dev, "xpu_available", lambda: available["xpu"])
    monkeypatch.setattr(dev, "xpu_device_count", lambda: 2 if available["xpu"] else 0)
    monkeypatch.setattr(dev, "mps_available", lambda: available["mps"])
    assert dev.select_device("auto").type == expected
    if expected in ("cuda", "xpu"):
        # Each process of a multi-GPU run takes the GPU of its local rank.
        assert dev.select_device("auto", local_rank=1) == torch.device(expected, 1)


def test_explicit_index_is_kept_when_present(monkeypatch):
    monkeypatch.setattr(dev, "xpu_available", lambda: True)
    monkeypatch.setattr(dev, "xpu_device_count", lambda: 2)
    assert dev.select_device("xpu:1") == torch.device("xpu", 1)
    with pytest.raises(dev.DeviceError, match=r"'xpu:2' was requested but only 2 XPU device\(s\) exist"):
        dev.select_device("xpu:2")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cuda", r"'cuda' was requested but CUDA is not available.*use device 'auto' or 'cpu'"),
        ("cuda:1", r"'cuda:1' was requested but CUDA is not available"),
        ("xpu:0", r"'xpu:0' was requested but no Intel XPU is available.*--device /dev/dri"),
        ("mps", r"'mps' was requested but Apple MPS is not available"),
        ("tpu", r"device must be one of .auto., .cpu., .cuda\[:N\]., .xpu\[:N\]. or .mps., got .tpu."),
        ("cpu:1", r"'cpu' takes no index"),
        ("cuda:a", r"device must be"),
    ],
)
def test_missing_or_malformed_devices_fail_early_with_the_reason(no_accelerators, spec, message):
    with pytest.raises(dev.DeviceError, match=message):
        dev.select_device(spec)


def test_device_errors_are_value_errors():
    assert issubclass(dev.DeviceError, ValueError)


def test_precision_per_backend(monkeypatch):
    assert dev.resolve_dtype("cpu", "bf16") == torch.bfloat16
    assert dev.resolve_dtype("cpu", "fp32") == torch.float32
    # fp16 training kernels are incomplete on CPU: fall back to bf16 with a warning.
    assert dev.resolve_dtype("cpu", "fp16") == torch.bfloat16
    assert dev.resolve_dtype("xpu", "bf16") == torch.bfloat16
    assert dev.resolve_dtype("xpu", "fp16") == torch.float16
    monkeypatch.setattr(dev, "_bf16_supported", lambda backend: False)
    assert dev.resolve_dtype("cuda", "bf16") == torch.float16
    with pytest.raises(dev.DeviceError, match="weight_type must be one of"):
        dev.resolve_dtype("cpu", "int8")


def test_tf32_follows_allow_tf32(no_accelerators):
    dev.setup_device("cpu", "fp32", allow_tf32=False)
    assert torch.get_float32_matmul_precision() == "highest"
    dev.setup_device("cpu", "fp32", allow_tf32=True)
    assert torch.get_float32_matmul_precision() == "high"
    torch.set_float32_matmul_precision("highest")


def test_generators_are_reproducible_on_the_device():
    info = dev.DeviceInfo(torch.device("cpu"), torch.float32)
    a = torch.randn(4, generator=info.generator(7))
    b = torch.randn(4, generator=info.generator(7))
    assert torch.equal(a, b)
    assert info.peak_memory_bytes() is None


def test_ipex_is_optional():
    # Without the extension installed, it is simply absent: nothing requires it.
    assert dev.intel_extension() is None


#: How code names a backend: a string literal, or torch's module of it.
BACKEND_SPELLINGS = [f"{quote}{name}" for name in ("cuda", "xpu", "mps") for quote in ("\"", "'")] + [
    "torch.cuda", "torch.xpu", "torch.mps", "backends.mps"]


def test_no_other_module_names_a_backend():
    """Only trainer/device.py may spell out the backend names (cuda, xpu, mps)."""
    from pathlib import Path

    root = Path(dev.__file__).resolve().parent
    offenders = []
    for path in [*root.rglob("*.py"), root.parent / "train.py", root.parent / "predict.py"]:
        if path == root / "device.py" or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        found = [spelling for spelling in BACKEND_SPELLINGS if spelling in text]
        if found:
            offenders.append(f"{path.relative_to(root.parent)}: {found}")
    assert not offenders, f"backend names outside trainer/device.py: {offenders}"


def test_the_backend_table_covers_every_backend():
    assert set(dev.BACKEND_TABLE) == set(dev.BACKENDS)
    cpu = dev.DeviceInfo(torch.device("cpu"), torch.float32)
    assert cpu.rng_state() == {} and not cpu.supports_compile and not cpu.prefers_channels_last
    cpu.synchronize()
    cpu.empty_cache()
    cpu.reset_peak_memory()
    assert cpu.describe() == "cpu, fp32"
