"""Mixture of Experts: sparse expert compute, expert LoRA, router loss and statistics, upcycling.

- `experts.py`     `SparseExperts`, `replace_experts_`: dropless grouped expert compute
- `expert_lora.py` per-expert LoRA on activations, PEFT-layout save/load, fuse
- `router.py`      router freezing, load-balancing aux loss, expert-use statistics, router save/load
- `upcycle.py`     dense Llama/Mistral checkpoint -> Mixtral checkpoint
- `prepare.py`     `prepare_moe_`: all of the above as a recipe asks
"""

from greentune.moe.expert_lora import (
    ExpertLoRA,
    add_expert_lora_,
    expert_lora_state_dict,
    fuse_expert_lora_,
    load_expert_lora_state_dict,
    target_parameters,
)
from greentune.moe.experts import SparseExperts, replace_experts_, sparse_experts
from greentune.moe.prepare import prepare_moe_
from greentune.moe.router import (
    RouterMonitor,
    load_balancing_loss,
    load_router_state_dict,
    router_modules_to_save,
    router_state_dict,
    set_router_trainable_,
)
from greentune.moe.upcycle import upcycle

__all__ = [
    "SparseExperts",
    "replace_experts_",
    "sparse_experts",
    "ExpertLoRA",
    "add_expert_lora_",
    "fuse_expert_lora_",
    "target_parameters",
    "expert_lora_state_dict",
    "load_expert_lora_state_dict",
    "RouterMonitor",
    "load_balancing_loss",
    "set_router_trainable_",
    "router_state_dict",
    "load_router_state_dict",
    "router_modules_to_save",
    "upcycle",
    "prepare_moe_",
]
