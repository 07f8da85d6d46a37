"""The training objective as one module: the causal LM plus its token-summed loss.

Why a module: DDP and FSDP hook into `forward`, so the whole loss computation (and
anything a future fused lm_head + cross-entropy does) must run inside the wrapped
module's forward, not after it.

The loss is the *sum* of token losses divided by `num_items`, the number of target tokens
in the whole optimiser step across every micro-batch and rank. That makes gradient
accumulation and data parallelism exact: 2 ranks × batch b computes the same gradient as
1 rank × batch 2b, which a mean of per-micro-batch means does not when rows hold
different numbers of target tokens.
"""
from __future__ import annotations

import torch
from torch import nn


class CausalLMLoss(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                num_items: torch.Tensor) -> torch.Tensor:
        """Σ token cross-entropy / `num_items` (labels unshifted, -100 = not a target)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         num_items_in_batch=num_items)
        return out.loss


def count_targets(labels: torch.Tensor) -> int:
    """Target tokens in `labels` after the causal shift (position 0 is never predicted)."""
    return int((labels[:, 1:] != -100).sum())
