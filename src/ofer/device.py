"""The device a run asks for (`test.py --device`, `train.device`), checked before any work starts."""

from __future__ import annotations

import torch

from ofer.config import ConfigError


def resolve_device(requested: str, option: str) -> torch.device:
    """The torch device for ``requested``: ``auto`` is the GPU when PyTorch sees one, else the CPU.

    A value that names no device, a device type that cannot run the pipeline (``meta`` holds no
    data; only cpu, cuda and, where PyTorch has it, Apple's mps are supported) or a device this
    machine does not have is a ConfigError that names ``option`` (the flag or config key it came
    from) and says what would work, instead of PyTorch's error from deep inside the first tensor
    moved there.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"{option} {requested!r}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option} {requested}: PyTorch has no usable mps device here; use cpu, cuda or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{option} {requested}: OFER cannot run on {device.type} devices; use cpu, cuda, cuda:N "
                          "or auto")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"{option} {requested}: PyTorch sees no CUDA GPU here (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{option} {requested}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
