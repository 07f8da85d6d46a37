"""lm_head + cross-entropy in chunks of target rows, with the input gradient computed in the forward.

Why: the plain path materialises logits [tokens, vocab] in fp32, then log-softmax of the same
size, then a zero-filled gradient of the same size in backward; for large vocabularies that is
the biggest activation of the step and several memory-bound passes over it. Here only rows with
a target (label != -100) are scored, a chunk at a time, and each chunk's gradient
w.r.t. its hidden rows is computed at once, while its logits are in cache:

    p = softmax(h Wᵀ + b),   loss = Σ (lse − logit[y]),   ∂loss/∂h = p W − W[y]

(the division by Σexp is applied to the small [n, H] product, not to the [n, V] probabilities).
Only ∂loss/∂h [rows, H] is kept for backward, which scales it by the upstream gradient.
Computing it in forward instead of re-running the chunk under checkpointing saves one
[rows, H] × [H, V] matmul per step.

The weight (and bias) must be frozen: a trainable head takes the plain path (`fused_head`).
"""

from __future__ import annotations

import torch
from torch import nn

from greentune.cpu_gemm import linear, matmul

IGNORE = -100
# Causal-LM classes whose head is exactly `logits = lm_head(backbone(...).last_hidden_state)`
# scored by transformers' ForCausalLMLoss (checked against transformers 5.x: no logit scale or
# softcap; the MoE ones add router aux loss only with `output_router_logits`).
STANDARD_HEADS = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "OlmoeForCausalLM",
    }
)
#: CPU rows per chunk. Each chunk streams the whole [V, H] weight through two GEMMs, so the rows
#: set their arithmetic intensity. Measured paired (2-core EPYC VM, 2026-12-02, 1,024 rows,
#: H 512, forward + backward of this loss): vocab 8,192: 512 rows 0.90× the time of 256,
#: 1,024 rows 1.06× of 512; vocab 32,000: 64 rows 1,239 ms, 131: 940, 262: 666, 524: 604,
#: 1,024: 601; vocab 151,936: 105 rows 4,158 ms, 421 rows 3,181 ms. (A fixed 8 MiB of logits
#: per chunk, the earlier rule, gave 256, 64 and 13→64 rows.)
CHUNK_ROWS = 512
#: ... as long as a chunk's fp32 logits stay within 256 MiB (large vocabularies get fewer rows).
CHUNK_MAX_ELEMENTS = 1 << 26
MIN_CHUNK_ROWS = 64
#: on a GPU a chunk only has to bound memory (256 MiB of fp32 logits): fewer, larger kernels.
DEVICE_CHUNK_ELEMENTS = 1 << 26
#: select the rows that have a target (CPU: no work for prompt tokens) or mask them
#: (accelerators: selecting needs the count on the host, a sync that stalls the launch queue).
SELECT_ROWS = "auto"  # auto | always | never


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, lm_head) when `model`'s loss can be computed by `linear_cross_entropy` with the
    same result as its own forward; None when it must take the plain path."""
    cls = type(model)
    if cls.__name__ not in STANDARD_HEADS or not cls.__module__.startswith("transformers."):
        return None
    from transformers.loss.loss_utils import ForCausalLMLoss

    config = model.config
    if (
        getattr(config, "output_router_logits", False)
        or getattr(model, "loss_function", None) is not ForCausalLMLoss
    ):
        return None
    if getattr(config, "final_logit_softcapping", None) is not None or getattr(config, "logit_scale", None):
        return None
    head = model.get_output_embeddings()
    if (
        type(head) is not nn.Linear
        or head.weight.requires_grad
        or (head.bias is not None and head.bias.requires_grad)
    ):
        return None
    if _hooked(model) or _hooked(head):
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        return None
    return backbone, head


CPU = torch.device("cpu")  # the default device of `chunk_rows` (one module-level object, B008)


def _hooked(m: nn.Module) -> bool:
    """Forward hooks (or accelerate's dispatch hook) that calling the backbone alone would skip."""
    return bool(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"))


def chunk_rows(vocab: int, device: torch.device = CPU) -> int:
    """Rows per chunk: `CHUNK_ROWS` on CPU within `CHUNK_MAX_ELEMENTS` logits, about
    `DEVICE_CHUNK_ELEMENTS` logits elsewhere; never under `MIN_CHUNK_ROWS` rows."""
    if device.type == "cpu":
        return max(MIN_CHUNK_ROWS, min(CHUNK_ROWS, CHUNK_MAX_ELEMENTS // max(vocab, 1)))
    return max(MIN_CHUNK_ROWS, DEVICE_CHUNK_ELEMENTS // max(vocab, 1))


def _select_rows(device: torch.device) -> bool:
    return SELECT_ROWS == "always" or (SELECT_ROWS == "auto" and device.type == "cpu")


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_{rows with a target} CE(h Wᵀ + b, y) / num_items; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, num_items):
        if _select_rows(hidden.device):
            rows = (targets != IGNORE).nonzero().squeeze(1)
            all_rows = rows.numel() == hidden.shape[0]
            h = hidden if all_rows else hidden.index_select(0, rows)
            y = targets if all_rows else targets.index_select(0, rows)
            valid = None
        else:  # every row, untargeted ones masked: no host sync
            all_rows, h, valid = True, hidden, (targets != IGNORE)
            y = targets.clamp_min(0)
        want_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = chunk_rows(weight.shape[0], hidden.device)
        for s in range(0, h.shape[0], step):
            hc, yc = h[s : s + step], y[s : s + step]
            logits = linear(hc, weight, bias).float()  # [n, V]
            target_logit = logits.gather(1, yc[:, None])
            m = logits.amax(1, keepdim=True)
            logits.sub_(m).exp_()  # unnormalised softmax
            z = logits.sum(1, keepdim=True)
            row_loss = m + z.log() - target_logit  # [n, 1]
            if valid is not None:
                row_loss = row_loss * valid[s : s + step, None]
            total += row_loss.sum()
            if want_grad:  # p W − W[y], with p = exp / z
                pw = matmul(logits.to(weight.dtype), weight)
                g = pw / z.to(pw.dtype) - weight.index_select(0, yc)
                if valid is not None:
                    g = g * valid[s : s + step, None].to(g.dtype)
                grad_h[s : s + step] = g.to(h.dtype)
        if num_items is None:
            num_items = (
                valid.sum().float()
                if valid is not None
                else torch.tensor(float(h.shape[0]), device=hidden.device)
            )
        loss = total / num_items
        if want_grad:
            grad_h = grad_h / num_items.to(grad_h.dtype)
            if not all_rows:
                grad_h = hidden.new_zeros(hidden.shape).index_copy_(0, rows, grad_h)
            ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    num_items=None,
) -> torch.Tensor:
    """Σ CE(hidden Wᵀ + b, targets) over targets != -100, divided by `num_items` (the number of
    targets when None). hidden [N, H], targets [N] already shifted; weight and bias frozen."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy computes no gradient for the head; it must be frozen")
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(float(num_items))
    if num_items is not None:
        num_items = num_items.to(hidden.device, torch.float32)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets.to(hidden.device), num_items)
