"""The ``triton`` backend: Triton forward and backward kernels (GPU; CPU only under TRITON_INTERPRET=1)."""


def unavailable_reason(device):
    return "not implemented yet"
