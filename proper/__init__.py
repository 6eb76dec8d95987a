"""proper: the PROPER model layer (population -> group -> user LoRAs) on top of proper_kernels.routed_lora.

    cfg = proper.ProperConfig(num_users=1000, num_experts=8, top_k=2)
    model = proper.apply_proper(hf_model, cfg)          # instance-level swap of the target linears
    proper.set_stage(model, "population" | "group" | "user")
    with proper.users(model, user_ids):                 # [B] ids, -1 = no user
        logits = model(input_ids).logits                # also generate() and training steps
"""
from .config import FFN_TARGETS, LLAMA_ALL_TARGETS, ProperConfig
from .generate import generate_for_users
from .io import from_pretrained, import_peft_adapter, load_proper_weights, proper_state_dict, save_pretrained
from .layer import STAGES, ProperLinear
from .models import load_smollm2, load_smollm2_tokenizer
from .patch import (apply_proper, get_stage, init_experts_from_population, linear_modules, proper_layers, set_stage,
                    trainable_parameters)
from .routers import LoRAAwareRouter, UserAwareRouter, top_k_gates
from .routing import lora_router_disabled, user_gates, user_routing
from .users import MissingUsersError, gradient_checkpointing_kwargs, users

__all__ = [
    "ProperConfig", "FFN_TARGETS", "LLAMA_ALL_TARGETS", "STAGES",
    "apply_proper", "set_stage", "get_stage", "users", "MissingUsersError", "gradient_checkpointing_kwargs",
    "lora_router_disabled", "user_routing", "user_gates",
    "import_peft_adapter", "save_pretrained", "from_pretrained", "load_proper_weights", "proper_state_dict",
    "generate_for_users", "load_smollm2", "load_smollm2_tokenizer",
    "ProperLinear", "UserAwareRouter", "LoRAAwareRouter", "top_k_gates",
    "proper_layers", "linear_modules", "trainable_parameters", "init_experts_from_population",
]
