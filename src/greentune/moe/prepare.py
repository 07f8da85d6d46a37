"""One call that readies an MoE model for training as a recipe's `moe` keys ask.

    monitor = prepare_moe_(model, router="frozen" | "full", aux_loss_coef=0.01,
                           lora_on_experts=True | False)

Order matters: call it *after* the dense LoRA is attached (`adapters.lora.apply_lora` freezes
the whole model), so a "full" router stays trainable. The expert LoRA itself is an adapter
(`adapters.attach.attach_adapters` adds it after this call).
"""

from __future__ import annotations

import logging

from torch import nn

from greentune.errors import UserError
from greentune.moe.experts import replace_experts_, sparse_experts
from greentune.moe.router import RouterMonitor, set_router_trainable_

log = logging.getLogger(__name__)


def prepare_moe_(
    model: nn.Module, router: str = "frozen", aux_loss_coef: float = 0.0, lora_on_experts: bool = False
) -> RouterMonitor | None:
    """Swap in `SparseExperts`, set the router's trainability, and hook a `RouterMonitor` (aux
    loss and expert-use statistics). Returns None for a dense model when nothing MoE was asked
    for; raises UserError when something MoE (`lora_on_experts` too) was asked of a dense model."""
    if router not in ("frozen", "full"):
        raise UserError(f"moe.router must be 'frozen' or 'full', got {router!r}")
    replace_experts_(model)
    if not sparse_experts(model):
        if lora_on_experts or router == "full" or aux_loss_coef > 0:
            raise UserError(
                "the recipe asks for MoE training (experts LoRA, router or aux loss) "
                "but the model has no MoE experts; add moe.upcycle or drop those keys"
            )
        return None
    n = set_router_trainable_(model, router == "full")
    if router == "full":
        log.info("router trained in full: %d parameters", n)
    return RouterMonitor(model, aux_loss_coef=aux_loss_coef)
