"""proper_kernels: the routed multi-LoRA op (forward and backward) with torch, cpu, triton and cuda backends.

Importing this package imports neither Triton nor the compiled extension; backends load on first use.
"""
from .checks import GRAD_NAMES, Problem, validate
from .layout import TokenLayout, block_table, token_layout
from .op import BACKENDS, available_backends, resolve_backend, routed_lora, routed_lora_reference
from .prepared import PreparedRoutedLoRA, prepare_routed_lora

__version__ = "0.1.0"

__all__ = ["routed_lora", "routed_lora_reference", "prepare_routed_lora", "PreparedRoutedLoRA", "available_backends",
           "resolve_backend", "BACKENDS", "GRAD_NAMES", "Problem", "validate", "TokenLayout", "token_layout",
           "block_table", "__version__"]
