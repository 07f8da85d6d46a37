"""LoRA on MoE experts: one low-rank pair per expert and per weight, applied to activations.

For expert e and weight W_e [out, in] (gate_up: [2I, H]; down: [H, I]):

    h = x W_e^T + s · (drop(x) A_e^T) B_e^T,     A [E, r, in], B [E, out, r], s = alpha / r

The delta ``s · B_e A_e`` ([out, in]) is never built during a step; `delta()` builds it only
for `SparseExperts.fuse()` (merge / ReLoRA restart). Init as in LoRA and PEFT: A
Kaiming-uniform (a=√5, fan_in = in), B zero, so the model is unchanged at init.

gate and up share one pair over the fused [2I, H] weight, because that is what PEFT's
`ParamWrapper` represents for transformers-v5 experts (one delta per expert over
`gate_up_proj`); a pair per half would not round-trip. Its rank-r update spans both halves.

PEFT layout (peft 0.21, `lora.ParamWrapper` with
``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``): for a 3-D
parameter [E, out, in] PEFT holds ``lora_A = Linear(in, r·E)`` and ``lora_B = Linear(r·E, out)``
and forms ``delta_e = s · B_e A_e`` from

    A_e = lora_A.weight.reshape(E, r, in)[e]                 rows e·r … e·r+r-1 (expert-major)
    B_e = lora_B.weight.reshape(out, r, E)[:, :, e]          columns j·E + e (rank-major)

Two wrapped parameters on one module nest in sorted order: ``down_proj`` is the outer
wrapper (keys ``…experts.lora_A.weight``) and ``gate_up_proj`` the inner one
(``…experts.base_layer.lora_A.weight``). PEFT's ParamWrapper rejects lora_dropout != 0,
so an adapter_config.json for these keys must say ``"lora_dropout": 0.0`` (dropout is a
training-time detail and does not change the saved weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from greentune.adapters.lora import MASTER_DTYPE
from greentune.errors import UserError
from greentune.moe.experts import WEIGHT_NAMES, sparse_experts

PEFT_PREFIX = "base_model.model."
_PEFT_PATH = {"down": "", "gate_up": "base_layer."}  # down outer wrapper, gate_up inner


class ExpertLoRA(nn.Module):
    """Per-expert LoRA factors for the fused gate_up and the down weights of one experts module.

    Parameters: A_gate_up [E, r, H], B_gate_up [E, 2I, r], A_down [E, r, I], B_down [E, H, r].
    """

    # An expert that got no tokens in a step leaves its pair out of the graph
    # (`train.distributed.wrap_objective` then has DDP look for unused parameters).
    leaves_graph_sometimes = True

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        shapes = {"gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}
        kw = dict(dtype=dtype, device=device)
        for name, (out, inp) in shapes.items():
            setattr(self, f"A_{name}", nn.Parameter(torch.empty(num_experts, r, inp, **kw)))
            setattr(self, f"B_{name}", nn.Parameter(torch.empty(num_experts, out, r, **kw)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=√5) with fan_in = in (bound 1/√in), B = 0."""
        with torch.no_grad():
            for name in WEIGHT_NAMES:
                a = getattr(self, f"A_{name}")
                bound = 1.0 / math.sqrt(a.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
                a.uniform_(-bound, bound)
                getattr(self, f"B_{name}").zero_()

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"A_{name}"), getattr(self, f"B_{name}")

    def per_expert(
        self, dtype: torch.dtype | None = None
    ) -> dict[str, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
        """{name: (A_e views, B_e views)} for one forward: one `unbind` per parameter, so the
        backward stacks E gradients once instead of building E full-size zero gradients. With
        `dtype` (the activations' dtype, bf16 on a GPU) the fp32 factors are cast once here."""

        def cast(t):
            return t if dtype is None or t.dtype == dtype else t.to(dtype)

        return {
            n: (cast(a).unbind(0), cast(b).unbind(0))
            for n, (a, b) in ((n, self.factors(n)) for n in WEIGHT_NAMES)
        }

    def add_low_rank(self, ab, e: int, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """base [n, out] + s · (drop(x) A_e^T) B_e^T, for x [n, in]; `ab` from `per_expert()[name]`."""
        a, b = ab
        xa = self.dropout(x) @ a[e].t()  # [n, r]
        return torch.addmm(base, xa, b[e].t(), alpha=self.scale)  # [n, out]

    @torch.no_grad()
    def delta(self, name: str, e: int) -> torch.Tensor:
        """s · B_e A_e, [out, in] (for merging only)."""
        a, b = self.factors(name)
        return (b[e] @ a[e]) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def add_expert_lora_(model: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> int:
    """Attach a fresh `ExpertLoRA` to every `SparseExperts` of `model`; returns the number of
    trainable LoRA parameters added. Call `replace_experts_` first."""
    mods = sparse_experts(model)
    if not mods:
        raise UserError("LoRA target 'experts' found no MoE experts in this model (is it a dense model?)")
    n = 0
    for _, m in mods:
        ref = m.weight("down", 0)
        m.lora = ExpertLoRA(
            m.num_experts,
            m.hidden_dim,
            m.intermediate_dim,
            r,
            alpha,
            dropout,
            dtype=MASTER_DTYPE,
            device=ref.device,
        )  # fp32 masters (see adapters/lora.py)
        n += sum(p.numel() for p in m.lora.parameters())
    return n


def fuse_expert_lora_(model: nn.Module, restart: bool = False) -> int:
    """`fuse(restart)` on every SparseExperts with a LoRA; returns how many were fused."""
    mods = [m for _, m in sparse_experts(model) if m.lora is not None]
    for m in mods:
        m.fuse(restart=restart)
    return len(mods)


def target_parameters(model: nn.Module) -> list[str]:
    """PEFT `target_parameters` entries for the experts of `model`, e.g.
    ``["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]`` (suffixes PEFT matches)."""
    suffixes = sorted({".".join(n.split(".")[-2:]) for n, _ in sparse_experts(model)})
    return [f"{s}.{p}" for s in suffixes for p in ("down_proj", "gate_up_proj")]


def _peft_to_ours(a_w: torch.Tensor, b_w: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A.weight [r·E, in], lora_B.weight [out, r·E] -> A [E, r, in], B [E, out, r]."""
    a = a_w.reshape(E, -1, a_w.shape[-1])
    b = b_w.reshape(b_w.shape[0], -1, E).permute(2, 0, 1)
    return a, b


def _ours_to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [E, r, in], B [E, out, r] -> lora_A.weight [r·E, in], lora_B.weight [out, r·E]."""
    E, r, inp = a.shape
    return a.reshape(E * r, inp), b.permute(1, 2, 0).reshape(b.shape[1], r * E)


def expert_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The experts' LoRA tensors under PEFT's key names (contiguous, detached, on CPU).

    Keys: ``base_model.model.<experts path>.lora_{A,B}.weight`` (down_proj) and
    ``base_model.model.<experts path>.base_layer.lora_{A,B}.weight`` (gate_up_proj).
    """
    sd = {}
    for path, m in sparse_experts(model):
        if m.lora is None:
            continue
        for name in WEIGHT_NAMES:
            a, b = _ours_to_peft(*m.lora.factors(name))
            key = f"{PEFT_PREFIX}{path}.{_PEFT_PATH[name]}"
            sd[key + "lora_A.weight"] = a.detach().contiguous().cpu()
            sd[key + "lora_B.weight"] = b.detach().contiguous().cpu()
    return sd


@torch.no_grad()
def load_expert_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> int:
    """Copy PEFT-layout expert LoRA tensors into the `ExpertLoRA`s of `model` (attach them
    first with `add_expert_lora_` at the adapter's rank). Returns the number of tensors loaded.
    Raises UserError when a key is missing or a shape disagrees."""
    loaded = 0
    for path, m in sparse_experts(model):
        if m.lora is None:
            continue
        for name in WEIGHT_NAMES:
            key = f"{PEFT_PREFIX}{path}.{_PEFT_PATH[name]}"
            try:
                a_w, b_w = sd[key + "lora_A.weight"], sd[key + "lora_B.weight"]
            except KeyError as err:
                raise UserError(f"adapter has no expert LoRA tensor {err.args[0]}") from None
            a, b = m.lora.factors(name)
            if a_w.shape != (a.shape[0] * a.shape[1], a.shape[2]) or b_w.shape != (
                b.shape[1],
                a.shape[0] * a.shape[1],
            ):
                raise UserError(
                    f"adapter tensor {key}lora_A/B has shape {tuple(a_w.shape)}/{tuple(b_w.shape)}, "
                    f"expected rank {a.shape[1]} for {a.shape[0]} experts"
                )
            a_new, b_new = _peft_to_ours(a_w, b_w, a.shape[0])
            a.copy_(a_new)
            b.copy_(b_new)
            loaded += 2
    return loaded


__all__ = [
    "ExpertLoRA",
    "add_expert_lora_",
    "fuse_expert_lora_",
    "target_parameters",
    "expert_lora_state_dict",
    "load_expert_lora_state_dict",
]
