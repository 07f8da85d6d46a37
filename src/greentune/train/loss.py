"""The training objective as one module: the causal LM plus its token-summed loss.

Why a module: DDP and FSDP hook into `forward`, so the whole loss computation (including the
fused lm_head + cross-entropy) must run inside the wrapped module's forward, not after it.

The loss is the *sum* of token losses divided by `num_items`, the number of target tokens
in the whole optimiser step across every micro-batch and rank. That makes gradient
accumulation and data parallelism exact: 2 ranks × batch b computes the same gradient as
1 rank × batch 2b, which a mean of per-micro-batch means does not when rows hold
different numbers of target tokens.

Fast path: for the standard decoder heads (`fused_head_ce.py`) the backbone runs alone and the
lm_head + cross-entropy is computed chunk by chunk over the target positions only, never
materialising the [tokens, vocab] logits. Anything else (a trainable, LoRA-wrapped or quantised
lm_head, logit scaling or softcapping, router aux loss in the HF loss, a wrapped model) takes
the plain HF path, which defines the semantics the fast path reproduces.
"""

from __future__ import annotations

import torch
from torch import nn

from greentune.train.fused_head_ce import fused_head, linear_cross_entropy


class CausalLMLoss(nn.Module):
    """`model`'s causal-LM loss; `fused=False` forces the plain HF path (the reference, for A/B)."""

    def __init__(self, model: nn.Module, fused: bool = True):
        super().__init__()
        self.model = model
        self.fused = fused

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        num_items: torch.Tensor,
    ) -> torch.Tensor:
        """Σ token cross-entropy / `num_items` (labels unshifted, -100 = not a target)."""
        parts = fused_head(self.model) if self.fused else None
        if parts is None:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                num_items_in_batch=num_items,
                use_cache=False,
            )  # training keeps no KV cache
            return out.loss
        backbone, head = parts
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # position t predicts t+1
        return linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets.reshape(-1), num_items
        )


def count_targets(labels: torch.Tensor) -> int:
    """Target tokens in `labels` after the causal shift (position 0 is never predicted)."""
    return int((labels[:, 1:] != -100).sum())
