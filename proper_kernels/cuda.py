"""The ``cuda`` backend: the compiled CUDA kernels (csrc/cuda), SGMV-style, sm_80+."""
from __future__ import annotations

import torch

from . import _ext


def unavailable_reason(device: torch.device):
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got device {device}"
    if not _ext.has("cuda_forward"):
        return _ext.load_error() or "the extension was built without CUDA (torch.version.cuda was not set)"
    return None


def forward(p):
    raise NotImplementedError


def backward(grad_out, p, needs):
    raise NotImplementedError
