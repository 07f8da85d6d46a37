"""Attaching a recipe's adapters to a model, and fusing them back in: one call each.

    adapters = attach_adapters(model, recipe.method.lora, recipe.moe)

freezes the model, wraps every targeted dense linear in a `LoRALinear`, and on an MoE model
swaps in `SparseExperts` with an `ExpertLoRA` each (target `experts`), sets the router's
trainability and hooks its monitor, as the recipe's `moe` keys ask. The dense LoRA goes
first: `apply_lora` freezes the whole model, so what comes after stays trainable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from greentune.adapters.expert_lora import add_expert_lora_
from greentune.adapters.lora import apply_lora, fuse_all_
from greentune.moe.prepare import prepare_moe_
from greentune.moe.router import RouterMonitor
from greentune.recipe import LoraConfig, MoeConfig

log = logging.getLogger(__name__)


@dataclass
class Adapters:
    """What `attach_adapters` put on a model."""

    wrapped: list[str]  # the module paths given a `LoRALinear`
    monitor: RouterMonitor | None  # the MoE router's aux loss and expert use; None on a dense model
    trainable: int = 0  # trainable parameters of the model, once counted


def attach_adapters(model: nn.Module, lora: LoraConfig, moe: MoeConfig | None = None) -> Adapters:
    """Freeze `model` and attach the recipe's LoRA (dense and expert) and MoE router setting."""
    moe, on_experts = moe or MoeConfig(), "experts" in lora.targets
    wrapped = apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout)
    monitor = prepare_moe_(model, moe.router, moe.aux_loss_coef, lora_on_experts=on_experts)
    if on_experts:
        n = add_expert_lora_(model, r=lora.rank, alpha=lora.alpha, dropout=lora.dropout)
        log.info("expert LoRA r=%d alpha=%g: %d trainable parameters", lora.rank, lora.alpha, n)
    return Adapters(wrapped, monitor)


def fuse_adapters_(model: nn.Module, progress: bool = False) -> int:
    """Merge every LoRA update (dense and expert) into its base and drop the adapters; for a
    quantised base that is dequantise → add → re-quantise (minutes for a Mixtral-sized model's
    experts, so with a bar per layer). Returns the modules fused."""
    from tqdm import tqdm

    from greentune.moe.experts import sparse_experts

    fused = fuse_all_(model)
    mods = [m for _, m in sparse_experts(model) if m.lora is not None]
    for m in tqdm(mods, desc="merge expert LoRA", unit="layer", disable=not progress or not mods):
        m.fuse(restart=False)
    return fused + len(mods)
