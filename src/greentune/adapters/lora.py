"""LoRA: a frozen base linear plus a trainable low-rank update.

    y = base(x) + dropout(x) · Aᵀ · Bᵀ · (alpha / rank)

A (rank, in) starts Kaiming-uniform, B (out, rank) starts at zero, so the adapted model
equals the base at step 0. The factors are stored in fp32 whatever the base's dtype and cast
to the activations' dtype (bf16 on a GPU) in each forward: AdamW then updates fp32 masters,
as PEFT's default (`autocast_adapter_dtype`) does. bf16 factors would lose every update
smaller than 2^-8 of a weight's magnitude, which at fine-tuning learning rates is most of them.

The base may be an `nn.Linear` or any frozen module with
`in_features`, `out_features`, a forward, and either a `.weight` or an `add_(delta)`
method (the quantised linears in `greentune.quant`), so LoRA, ReLoRA's merge and
quantised bases share one code path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from greentune.cpu_gemm import frozen_linear
from greentune.errors import UserError
from greentune.recipe import LORA_DROPOUT

#: dtype of every LoRA factor (the optimiser's weights), whatever the base computes in.
MASTER_DTYPE = torch.float32

# Leaf module names per recipe target. Covers Llama/Mistral/Mixtral/Qwen2/Qwen3/OLMoE
# naming, and DeepSeek-V3's multi-head latent attention (q_a/q_b, kv_a_proj_with_mqa, kv_b_proj;
# q_proj where q_lora_rank is null); dense MLP names also match a Qwen2-MoE shared expert and
# DeepSeek-V3 / GLM-4.5's `shared_experts`.
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "attn": (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
    ),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
# The gated linear-attention (delta-net) projections of Qwen3-Next / Qwen3.5 hybrids: adapted
# under "attn" too, where they sit in a `linear_attn` block ("out_proj" is a common name elsewhere)
LINEAR_ATTN = ("in_proj_qkvz", "in_proj_ba", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


class LoRALinear(nn.Module):
    """A frozen `base` with a rank-`rank` update scaled by `alpha / rank`."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = LORA_DROPOUT):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        device = next(iter(base.buffers()), None)
        ref = getattr(base, "weight", None)
        device = (
            ref.device if isinstance(ref, torch.Tensor) else (device.device if device is not None else None)
        )
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=MASTER_DTYPE, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=MASTER_DTYPE, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_()

    @torch.no_grad()
    def reset_lora_(self) -> None:
        """A ← Kaiming-uniform (as PEFT: a=√5), B ← 0: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + scale · (dropout(x) Aᵀ) Bᵀ as one addmm: the scale and the sum ride in the GEMM
        instead of two extra passes over the [tokens, out] output (and one more in backward)."""
        base = self.base
        if type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks):
            y = frozen_linear(x, base.weight, base.bias)  # oneDNN on the CPU (see greentune.cpu_gemm)
        else:
            y = base(x)
        a, b = self.lora_A, self.lora_B
        if a.dtype != x.dtype:  # fp32 masters, bf16 compute: the casts' backward gives fp32 grads
            a, b = a.to(x.dtype), b.to(x.dtype)
        u = F.linear(self.dropout(x), a)
        if u.dtype != y.dtype:  # a base that computes in another dtype: let the sum promote
            return y + F.linear(u, b) * self.scale
        out = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, self.rank), b.t(), alpha=self.scale)
        return out.view(y.shape)

    def delta(self) -> torch.Tensor:
        """The dense update B·A·scale, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def fuse_(self) -> None:
        """Add the update into the base in place (dequantise → add → re-quantise for quantised bases)."""
        delta = self.delta()
        if hasattr(self.base, "add_"):
            self.base.add_(delta.float())
        else:
            self.base.weight.add_(delta.to(self.base.weight.dtype))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def target_names(targets: list[str]) -> set[str]:
    names: set[str] = set()
    for t in targets:
        names.update(TARGET_MODULES.get(t, ()))
    return names


def layer_widths(config, targets: list[str]) -> dict[str, int]:
    """The smallest input/output width of the layers each target adapts, from a model config."""
    c = getattr(config, "text_config", None) or config
    hidden = getattr(c, "hidden_size", None)
    heads = getattr(c, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1:
        return {}
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    widths = {"attn": min(hidden, heads * head_dim, kv)}
    ff = getattr(c, "intermediate_size", None)
    if isinstance(ff, int):
        widths["mlp"] = min(hidden, ff)
    expert_ff = getattr(c, "moe_intermediate_size", None) or ff
    if isinstance(expert_ff, int):
        widths["experts"] = min(hidden, expert_ff)
    return {t: w for t, w in widths.items() if t in targets}


def check_rank_fits(config, rank: int, targets: list[str], where: str = "the model") -> None:
    """A LoRA rank above a layer's smaller width adds parameters but no expressiveness (the
    update is at most that wide), and usually means a typo: refuse it before any work."""
    widths = layer_widths(config, targets)
    if widths and rank > min(widths.values()):
        target, width = min(widths.items(), key=lambda kv: kv[1])
        raise UserError(
            f"method.lora.rank {rank} exceeds the width of the {target} layers ({width}) of {where}; "
            f"use a rank of at most {width}"
        )


def apply_lora(
    model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = LORA_DROPOUT
) -> list[str]:
    """Freeze `model` and wrap every targeted linear in a `LoRALinear`; return the wrapped paths.

    Raises UserError when no module matches (e.g. an architecture with other names).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    leaves = target_names(targets)
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        linear_attn = "attn" in targets and _leaf(name) in LINEAR_ATTN and ".linear_attn." in name
        if (
            (_leaf(name) in leaves or linear_attn)
            and not isinstance(module, LoRALinear)
            and hasattr(module, "in_features")
            and ".experts." not in name
        ):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, _leaf(name), LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    if leaves and not wrapped:
        raise UserError(
            f"LoRA targets {targets} matched no module in {type(model).__name__} "
            f"(looked for {sorted(leaves)})"
        )
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def fuse_all_(model: nn.Module) -> int:
    """Merge every LoRA update into its base and put the plain base modules back."""
    count = 0
    for name, module in list(lora_modules(model).items()):
        module.fuse_()
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, _leaf(name), module.base)
        count += 1
    return count
