"""Sigmoid, bias-corrected, group-limited routers (DeepSeek-V3, GLM-4.5): their balance loss.

Such a router (transformers' `DeepseekV3TopkRouter`, `Glm4MoeTopkRouter`) scores each expert
with s = sigmoid(logit), chooses the top-k of s + `e_score_correction_bias` among the experts
of the best `topk_group` of `n_group` groups, and weights the chosen ones by s (renormalised
when `norm_topk_prob`, times `routed_scaling_factor`). It returns the same
``(router_logits, top_k_weights, top_k_index)`` as the softmax routers, so `RouterMonitor`
hooks it unchanged and the expert-use statistics count the experts it actually chose.

The softmax load-balancing loss would be wrong for it twice over: softmax(logits) is not
what it routes by, and top-k of those probabilities is not its choice (the bias and the
groups change it). DeepSeek-V3's complementary balance loss (arXiv 2412.19437, eqs. 17–20)
uses the normalised scores s' = s / Σ_j s_j and the experts really chosen; over the rows of
all layers together,

    f_e = (# top-k slots routed to e) / rows            (Σ_e f_e = k)
    P_e = (Σ_rows s'_e) / rows
    loss = E · Σ_e f_e · P_e                            (= k when routing is uniform)

which is DeepSeek's α-free sum times k, so that `aux_loss_coef` means the same for both
kinds of router (k at perfect balance). Gradient flows through P only (f is a count); the
correction bias is a buffer that the loss does not train (DeepSeek updates it by a rule
outside the gradient, which a LoRA fine-tune leaves as shipped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def is_sigmoid_router(router: nn.Module) -> bool:
    """A router that scores by sigmoid with a selection bias (DeepSeek-V3 / GLM-4.5 style)."""
    return isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor)


def sigmoid_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    top_k_index: Sequence[torch.Tensor],
    num_experts: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """E · Σ_e f_e · P_e (module docstring) from each layer's logits [N, E] and chosen experts [N, k].

    attention_mask: [B, T] (1 = real token) or None; padding rows are left out."""
    if not router_logits:
        return torch.zeros(())
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    score_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    for logits, idx in zip(router_logits, top_k_index):
        s = torch.sigmoid(logits.to(device).float())
        s = s / s.sum(-1, keepdim=True)  # [N, E]
        idx = idx.to(device)
        k = idx.shape[-1]
        w = torch.ones(idx.numel(), device=device) if mask is None else mask.repeat_interleave(k)
        counts = counts.scatter_add(0, idx.reshape(-1), w)
        score_sum = score_sum + (s if mask is None else s * mask[:, None]).sum(0)
        rows = rows + (s.shape[0] if mask is None else mask.sum())
    return num_experts * torch.sum((counts / rows) * (score_sum / rows))
