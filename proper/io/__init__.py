"""Files: PROPER checkpoints (safetensors, no pickle) and peft adapter import; atomic writes (proper/atomic.py)."""
from ..atomic import atomic_write, atomic_write_json, atomic_write_text
from .checkpoint import (CONFIG_NAME, WEIGHTS_NAME, from_pretrained, load_proper_weights, proper_state_dict,
                         read_saved, save_pretrained)
from .peft import import_peft_adapter

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "save_pretrained", "from_pretrained",
           "read_saved", "load_proper_weights", "proper_state_dict", "import_peft_adapter", "WEIGHTS_NAME",
           "CONFIG_NAME"]
