"""Mixture of Experts: sparse expert compute, router loss and statistics, upcycling.

- `experts.py`     `SparseExperts`, `replace_experts_`: dropless grouped expert compute
- `router.py`      router freezing, load-balancing aux loss, expert-use statistics, router save/load
- `upcycle.py`     dense Llama/Mistral checkpoint -> Mixtral checkpoint
- `prepare.py`     `prepare_moe_`: experts and router as a recipe's `moe` keys ask

The LoRA on experts is an adapter (`greentune.adapters.expert_lora`); the training loop's MoE hook
lives with the loop (`greentune.train.moe_hook`).
"""

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
    "RouterMonitor",
    "load_balancing_loss",
    "set_router_trainable_",
    "router_state_dict",
    "load_router_state_dict",
    "router_modules_to_save",
    "upcycle",
    "prepare_moe_",
]
