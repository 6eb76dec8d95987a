"""proper: the PROPER model layer (population -> group -> user LoRAs) on top of proper_kernels.routed_lora.

    cfg = proper.ProperConfig(num_users=1000, num_experts=8, top_k=2)
    model = proper.apply_proper(hf_model, cfg)          # instance-level swap of the target linears
    proper.set_stage(model, "population" | "group" | "user")
    with proper.users(model, user_ids):                 # [B] ids, -1 = no user
        logits = model(input_ids).logits                # also generate() and training steps

Layers (imports go one way): proper_kernels -> this package's model layer (config, state, context, modules,
patch, routing, generation, optim, io, models) -> training/ and data/ -> cli/ and bench/. Importing ``proper`` imports
neither the trainer, the CLI nor the benchmarks.
"""
from .config import FFN_TARGETS, LLAMA_ALL_TARGETS, ProperConfig
from .context import MissingUsersError, gradient_checkpointing_kwargs, users
from .generation import generate_for_users
from .hf_users import UserIdCollator, install_user_ids_keyword
from .io import from_pretrained, import_peft_adapter, load_proper_weights, proper_state_dict, save_pretrained
from .io.export import export_peft_adapter, export_users
from .models import load_smollm2, load_smollm2_tokenizer
from .modules import LoRAAwareRouter, ProperLinear, UserAwareRouter, top_k_gates
from .optim import ProperAdamW, make_optimizer
from .patch import apply_proper, init_experts_from_population, linear_modules, set_stage, trainable_parameters
from .routing import (lora_router_disabled, refresh_cold_start, reset_user_adapters, set_router_logits, user_gates,
                      user_routing)
from .state import STAGES, get_stage, get_state, proper_layers

__all__ = [
    "ProperConfig", "FFN_TARGETS", "LLAMA_ALL_TARGETS", "STAGES",
    "apply_proper", "set_stage", "get_stage", "get_state", "users", "MissingUsersError",
    "gradient_checkpointing_kwargs", "install_user_ids_keyword", "UserIdCollator",
    "lora_router_disabled", "user_routing", "user_gates", "refresh_cold_start", "reset_user_adapters",
    "set_router_logits",
    "import_peft_adapter", "save_pretrained", "from_pretrained", "load_proper_weights", "proper_state_dict",
    "generate_for_users", "load_smollm2", "load_smollm2_tokenizer", "export_peft_adapter", "export_users",
    "ProperLinear", "UserAwareRouter", "LoRAAwareRouter", "top_k_gates",
    "proper_layers", "linear_modules", "trainable_parameters", "init_experts_from_population",
    "make_optimizer", "ProperAdamW",
]
