"""The ``cpu`` backend: the compiled C++ extension (csrc/cpu), OpenMP + vectorised, fp32/bf16 inputs."""
from __future__ import annotations

import torch

from . import _ext


def unavailable_reason(device: torch.device):
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got device {device}"
    if not _ext.has("cpu_forward"):
        return _ext.load_error() or "the compiled extension has no CPU kernels"
    return None


def unsupported_reason(dtype: torch.dtype):
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the cpu backend supports float32 and bfloat16, got {dtype}"
    return None


def forward(p):
    raise NotImplementedError


def backward(grad_out, p, needs):
    raise NotImplementedError
