"""Where the model runs: the device and dtype a user asks for, and waiting for an accelerator's queued work.

The server (`DEEBERT_DEVICE`, `DEEBERT_DTYPE`) and `deebert evaluate` (`--device`, `--dtype`) resolve their
choices here, so `auto` means the same everywhere: CUDA when available, else CPU; float16 on CUDA, float32
on CPU.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """The requested device or dtype cannot be used here."""


def pick_device(requested: str) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise DeviceError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {requested!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {requested!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {requested!r} requested but only {torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto` (float16 on CUDA, float32 on CPU) or one of `DTYPES`."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise DeviceError(f"unknown dtype {requested!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def prepare(device: torch.device, cudnn_attention: bool = False) -> None:
    """Process-wide settings for running on `device` (call once, before the first forward).

    On CUDA, attention runs without PyTorch's cuDNN backend unless `cudnn_attention`: cuDNN builds an execution
    plan for every new (batch, length) shape, and a server meets new shapes all the time. On an H200 (torch 2.11,
    float16, the shipped 6-layer model) the first forward at a new length took 44 ms at batch 1 and 63 ms at
    batch 8 (medians) against 2.6-3.4 ms once seen; with the flash / memory-efficient kernels 4.3 and 4.7 ms
    (`python -m benchmarks.cold_shapes`, loadtest/results/h200/).
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on."""
    return next(model.parameters()).device


def dtype_name(dtype: torch.dtype) -> str:
    """`float32` for torch.float32: the spelling `DTYPES`, settings and reports use."""
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device) -> None:
    """Wait until the device has run everything queued on it (CUDA runs kernels asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> str:
    """`cpu`, or the accelerator's name, e.g. `cuda:0 (NVIDIA H200)`."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
