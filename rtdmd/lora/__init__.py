"""LoRA per role: inject, save/load (safetensors, diffusers key layout), merge/stack, import."""
from rtdmd.lora.core import (
    LoraError,
    inject_lora,
    lora_parameters,
    lora_state_dict,
    load_lora_state,
    merge_lora_into_base,
    reinit_lora,
    stack_and_refresh,
)
from rtdmd.lora.io import load_lora_dir, save_lora_dir

__all__ = [
    "LoraError", "inject_lora", "lora_parameters", "lora_state_dict", "load_lora_state",
    "merge_lora_into_base", "reinit_lora", "stack_and_refresh", "load_lora_dir", "save_lora_dir",
]
