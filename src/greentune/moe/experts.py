"""Sparse, dropless expert compute that replaces transformers-v5 fused experts modules.

transformers v5 stores the experts of an MoE layer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)
as two 3-D tensors,

    gate_up_proj [E, 2I, H]    rows 0..I-1 are the gate projection, rows I..2I-1 the up projection
    down_proj    [E, H, I]

and calls ``experts(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H]``.
For token n routed to expert e with weight w:

    y_n += w · W_down[e] · (act(W_gate[e] x_n) ⊙ W_up[e] x_n)

`SparseExperts` computes exactly that, but groups the N·k token-slots by expert with one
`argsort`, splits them by the per-expert counts (one host sync per layer), runs each expert's
two matmuls only on its own rows, puts the rows back in slot order and sums the k slots of
each token. Nothing is padded or dropped (no capacity factor), there is no [E, k, N] one-hot
mask, and no per-expert `torch.where`.

Weights are read through a small API, ``weight(name, e) -> [out, in]`` and
``add_to_weight_(name, e, delta)``, so a quantised store (any object with
``dequantize_expert(e) -> [out, in]`` and ``add_(e, delta)``) can stand in for the fp32
tensors (`set_weight_store_`). A store is dequantised one expert at a time, in the forward
and again in the backward, so a layer's dequantised experts never all live at once.
`greentune.quant`'s `QuantExperts3D` is such a store; `quantize_model_` may run before or
after `replace_experts_` (it installs stores under the same attribute names either way).

An optional `ExpertLoRA` (see `greentune.adapters.expert_lora`) adds a low-rank term per expert, applied to
the activations: ``h = x W^T + s · (x A_e^T) B_e^T`` with ``s = alpha / r``.

On a CUDA GPU in bf16, with plain weight tensors, the experts run as `F.grouped_mm` calls
instead (one kernel per projection for all experts, LoRA factors too, and no host sync: the
group offsets stay on the device). Measured on an H200 (torch 2.11, the moe_throughput
model): the per-expert loop left the GPU idle between small launches and ran at 0.36x
transformers' grouped_mm experts, the grouped path 1.19–1.20×. On the CPU the loop stays: measured there
(1 thread, fp32, torch 2.13, E=8, H=512, I=1024, 2048 slots, rank-16 LoRA) both take the
same 292 ms forward+backward (grouped_mm runs the same per-group GEMMs); the loop also serves
quantised stores and per-expert LoRA without stacking anything, and its Python cost is
~10 µs per op. ``GREENTUNE_GROUPED_MM=always|never`` overrides the choice (`auto`). Quantised
stores take the grouped path too where they have grouped kernels (`QuantExperts3D` on CUDA:
Triton, see `greentune.quant.triton_dispatch`); the LoRA factors still go to `F.grouped_mm`.

Custom autograd functions keep the backward lean: `_GatherTokens` and `_Permute` turn the
index_select backwards (slow scatter-adds) into gathers, and on the CPU the per-expert loop
itself is one function with a hand-written backward (`greentune.moe.expert_loop.ExpertLoop`:
every expert's rows written into shared buffers, no concatenation, no per-expert graph). Where
it does not apply (another activation, LoRA dropout, trainable base weights, gpt-oss) the loop
runs through autograd: `_SwiGLU` writes d[gate | up] into one buffer (no chunk/cat), and
per-expert weights are taken with one `unbind` per forward (whose backward is one stack, not
E full-size zero gradients).
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from greentune.moe.expert_loop import ExpertLoop

log = logging.getLogger(__name__)

WEIGHT_NAMES = ("gate_up", "down")
#: auto: grouped GEMMs on CUDA in bf16, the per-expert loop elsewhere; always | never force it.
GROUPED_MM = os.environ.get("GREENTUNE_GROUPED_MM", "auto")
_ATTR = {"gate_up": "gate_up_proj", "down": "down_proj"}


class ExpertStore(Protocol):
    """What a quantised expert tensor must offer to stand in for a [E, out, in] fp32 tensor."""

    shape: tuple[int, int, int]

    def dequantize_expert(self, e: int) -> torch.Tensor:  # -> [out, in] in the compute dtype
        ...

    def add_(self, e: int, delta: torch.Tensor) -> None:  # W[e] += delta (re-quantises)
        ...


class _StoreLinear(torch.autograd.Function):
    """y = x W^T for a frozen weight W held in a store; the backward dequantises W again.

    Saving nothing but the store keeps memory at one dequantised expert at a time.
    """

    @staticmethod
    def forward(ctx, x, store, e):
        ctx.store, ctx.e = store, e
        return F.linear(x, store.dequantize_expert(e).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.store.dequantize_expert(ctx.e).to(grad_y.dtype)
        return grad_y @ w, None, None


class _GatherTokens(torch.autograd.Function):
    """x [N, H] -> rows x[order // k] [S, H]; backward gathers the grads back to slot order and
    sums each token's k slots (no scatter-add: `order` is a permutation of the S slots)."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)  # [S, H] in slot order
        return g.view(-1, ctx.k, g.shape[-1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """rows t[perm] for a permutation `perm` with inverse `inverse`; backward is grad[inverse]."""

    @staticmethod
    def forward(ctx, t, perm, inverse):
        ctx.save_for_backward(inverse)
        return t.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _SwiGLU(torch.autograd.Function):
    """h = [gate | up] [n, 2I] -> silu(gate) ⊙ up [n, I]; the backward writes d[gate | up] into one
    buffer (autograd's chunk would allocate the two halves and concatenate them)."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        out = torch.empty_like(h)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)  # ·silu'(gate)
        return out


def _grouped_weight_ok(w, x: torch.Tensor) -> bool:
    """A plain weight tensor in x's dtype, or a store with grouped kernels for x (quant's
    `QuantExperts3D` on CUDA: `grouped_linear`)."""
    if isinstance(w, torch.Tensor):
        return w.dtype == x.dtype
    return hasattr(w, "grouped_linear") and w.grouped_ok(x)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


class SparseExperts(nn.Module):
    """Dropless grouped experts: same forward signature and parameter names as transformers'.

    Args:
        gate_up_proj: [E, 2I, H] tensor (kept as is: the HF parameter itself, no copy) or a store.
        down_proj: [E, H, I] tensor or a store.
        act_fn: the activation of the gate half (SiLU for Mixtral/Qwen/OLMoE).

    Attributes:
        lora: an `ExpertLoRA` or None.
    """

    def __init__(self, gate_up_proj, down_proj, act_fn):
        super().__init__()
        E, two_i, H = gate_up_proj.shape
        if down_proj.shape != (E, H, two_i // 2) or two_i % 2:
            raise ValueError(
                f"expert shapes disagree: gate_up_proj {tuple(gate_up_proj.shape)}, "
                f"down_proj {tuple(down_proj.shape)}; expected [E,2I,H] and [E,H,I]"
            )
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, two_i // 2
        self._set("gate_up_proj", gate_up_proj)
        self._set("down_proj", down_proj)
        self.act_fn = act_fn
        self._silu = _is_silu(act_fn)
        self.lora = None

    @classmethod
    def from_hf(cls, module: nn.Module) -> SparseExperts:
        """Wrap an HF experts module's own parameters (shared, not copied)."""
        return cls(module.gate_up_proj, module.down_proj, module.act_fn)

    # ---- weight access -------------------------------------------------------------------
    def _set(self, attr: str, value) -> None:
        if attr in self._parameters:
            del self._parameters[attr]
        if attr in self._modules:
            del self._modules[attr]
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        setattr(self, attr, value)

    def set_weight_store_(self, name: str, store) -> None:
        """Replace the `name` ("gate_up" | "down") tensor by a store of the same [E, out, in] shape."""
        old = self.weight_shape(name)
        if tuple(store.shape) != old:
            raise ValueError(f"store for {name} has shape {tuple(store.shape)}, expected {old}")
        self._set(_ATTR[name], store)

    def weight_shape(self, name: str) -> tuple[int, int, int]:
        return tuple(getattr(self, _ATTR[name]).shape)

    def weight(self, name: str, e: int) -> torch.Tensor:
        """Expert e's `name` weight, [2I, H] for "gate_up" or [H, I] for "down" (a view for tensors)."""
        w = getattr(self, _ATTR[name])
        return w[e] if isinstance(w, torch.Tensor) else w.dequantize_expert(e)

    @torch.no_grad()
    def add_to_weight_(self, name: str, e: int, delta: torch.Tensor) -> None:
        """W[e] += delta, in place (re-quantising for a store)."""
        w = getattr(self, _ATTR[name])
        if isinstance(w, torch.Tensor):
            w[e] += delta.to(w.dtype)
        else:
            w.add_(e, delta)

    def _linear(self, w, e: int, x: torch.Tensor) -> torch.Tensor:
        """x W_e^T, where w is this forward's per-expert view list or a store."""
        if isinstance(w, (list, tuple)):
            return F.linear(x, w[e])
        return _StoreLinear.apply(x, w, e)

    def _per_expert(self, attr: str):
        """The weight as a list of per-expert views (one `unbind`, whose backward is one stack,
        instead of E index ops whose backwards each build a full-size zero gradient) or the store."""
        w = getattr(self, attr)
        return w.unbind(0) if isinstance(w, torch.Tensor) else w

    # ---- LoRA ----------------------------------------------------------------------------
    def fuse(self, restart: bool = False) -> SparseExperts:
        """Merge the LoRA into the weights, W_e += s · B_e A_e for every expert.

        restart=False removes the LoRA (for merging/export); restart=True keeps the same
        parameter objects and re-draws A (Kaiming-uniform) and zeroes B (ReLoRA).
        """
        if self.lora is None:
            return self
        for name in WEIGHT_NAMES:
            for e in range(self.num_experts):
                self.add_to_weight_(name, e, self.lora.delta(name, e))
        if restart:
            self.lora.reset_parameters()
        else:
            self.lora = None
        return self

    # ---- compute -------------------------------------------------------------------------
    def _grouped_ok(self, x: torch.Tensor) -> bool:
        """Whether this forward takes the grouped-GEMM path (see the module docstring): plain
        weight tensors or quantised stores with grouped kernels, and every row a multiple of
        16 bytes, which the kernel needs."""
        if GROUPED_MM == "never" or not hasattr(F, "grouped_mm"):
            return False
        if GROUPED_MM != "always" and not (x.is_cuda and x.dtype == torch.bfloat16):
            return False
        if not all(_grouped_weight_ok(getattr(self, a), x) for a in _ATTR.values()):
            return False
        dims = [self.hidden_dim, self.intermediate_dim] + ([self.lora.r] if self.lora is not None else [])
        return all(d * x.element_size() % 16 == 0 for d in dims)

    def _loop_ok(self, x: torch.Tensor) -> bool:
        """Whether this forward takes `ExpertLoop` (the hand-written per-expert backward): SiLU
        gating, frozen base weights, and any LoRA in x's dtype without dropout."""
        if not self._silu:
            return False
        for attr in _ATTR.values():
            w = getattr(self, attr)
            if isinstance(w, torch.Tensor) and (w.requires_grad or w.dtype != x.dtype):
                return False
        lora = self.lora
        return lora is None or (
            isinstance(lora.dropout, nn.Identity) and all(p.dtype == x.dtype for p in lora.parameters())
        )

    def _grouped(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """All experts on their rows x [S, H] (grouped by expert) with grouped GEMMs -> [S, H]."""
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=flat.device)
        counts.index_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0).to(torch.int32)  # group ends, on the device

        def linear(t, w):  # rows of group e times w[e]^T
            if not isinstance(w, torch.Tensor):  # a quantised store's kernels
                return w.grouped_linear(t, offs)
            return F.grouped_mm(t, w.transpose(-2, -1), offs=offs)

        def plus_low_rank(name, t, base):  # base + s · (drop(t) A_e^T) B_e^T
            a, b = (f.to(t.dtype) for f in self.lora.factors(name))
            return torch.add(base, linear(linear(self.lora.dropout(t), a), b), alpha=self.lora.scale)

        return self._mlp(
            x,
            lambda t: linear(t, self.gate_up_proj),
            lambda t: linear(t, self.down_proj),
            plus_low_rank if self.lora is not None else None,
        )

    def _expert(self, e: int, x: torch.Tensor, w1, w2, lora) -> torch.Tensor:
        """One expert on its rows x [n, H] -> [n, H]."""

        def plus_low_rank(name, t, base):
            return self.lora.add_low_rank(lora[name], e, t, base)

        return self._mlp(
            x,
            lambda t: self._linear(w1, e, t),
            lambda t: self._linear(w2, e, t),
            plus_low_rank if lora is not None else None,
        )

    def _expert_loop(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every expert on its rows of x [S, H] (grouped by expert) through `ExpertLoop`."""
        lora, dtype = self.lora, x.dtype
        factors = (None,) * 4 if lora is None else (*lora.factors("gate_up"), *lora.factors("down"))

        def weight(name, e):  # a view of a plain tensor; a store dequantises (again in backward)
            return self.weight(name, e).to(dtype)

        scale = 0.0 if lora is None else lora.scale
        return ExpertLoop.apply(x, *factors, weight, counts, scale)

    def _autograd_loop(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The same through autograd, one `_expert` per expert (any activation, LoRA dropout,
        trainable base weights, gpt-oss' biases)."""
        w1, w2 = self._per_expert("gate_up_proj"), self._per_expert("down_proj")
        lora = None if self.lora is None else self.lora.per_expert(x.dtype)
        outs = [self._expert(e, xe, w1, w2, lora) for e, xe in enumerate(x.split(counts)) if counts[e]]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _mlp(self, x: torch.Tensor, gate_up, down, plus_low_rank) -> torch.Tensor:
        """down(act(gate) ⊙ up) for rows x, given the two projections and, with a LoRA, the
        function that adds its low-rank term to a projection's output (name, input, output)."""
        h = gate_up(x)  # [n, 2I]
        if plus_low_rank is not None:
            h = plus_low_rank("gate_up", x, h)
        if self._silu:
            a = _SwiGLU.apply(h)  # [n, I]
        else:
            gate, up = h.chunk(2, dim=-1)
            a = self.act_fn(gate) * up
        y = down(a)  # [n, H]
        if plus_low_rank is not None:
            y = plus_low_rank("down", a, y)
        return y

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [N, H], top_k_index [N, k] (int), top_k_weights [N, k] -> [N, H]."""
        n, k = top_k_index.shape
        if n == 0:
            return torch.zeros_like(hidden_states)
        flat = top_k_index.reshape(-1)  # [S], S = N·k, slot s = token s//k
        order = torch.argsort(flat, stable=True)  # slots grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        x = _GatherTokens.apply(hidden_states, order, inverse, k)  # [S, H], grouped by expert
        if self._grouped_ok(hidden_states):
            y = self._grouped(x, flat)
        else:
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync
            loop = self._expert_loop if self._loop_ok(hidden_states) else self._autograd_loop
            y = loop(x, counts)  # [S, H], grouped order
        y = _Permute.apply(y, inverse, order).view(n, k, -1)  # [N, k, H], slot order
        out = torch.bmm(top_k_weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # Σ_k w·y  [N, H]
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"


def _is_3d_weight(w) -> bool:
    """A [E, out, in] tensor, or a store standing in for one (e.g. quant's QuantExperts3D)."""
    if isinstance(w, torch.Tensor):
        return w.dim() == 3
    return hasattr(w, "dequantize_expert") and len(getattr(w, "shape", ())) == 3


def _is_fused_experts(module: nn.Module) -> bool:
    """An HF v5 experts module (its weights may already be quantised stores)."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        _is_3d_weight(gu)
        and _is_3d_weight(dn)
        and hasattr(module, "act_fn")
        and not isinstance(module, SparseExperts)
    )


def _layout_supported(module: nn.Module) -> bool:
    return (
        getattr(module, "has_gate", True)
        and not getattr(module, "has_bias", False)
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_post_expert_norm", False)
    )


def replace_experts_(model: nn.Module) -> int:
    """Swap every transformers-v5 fused experts module of `model` for a `SparseExperts`.

    The new modules hold the original parameters (no copies; state-dict keys unchanged), so
    outputs are preserved up to float rounding. Layouts other than concatenated gate/up
    without bias are left on transformers' implementation, with a warning. Returns the
    number of modules replaced.
    """
    from greentune.moe.gpt_oss import GptOssSparseExperts, is_gpt_oss_experts

    replaced = 0
    for name, module in list(model.named_modules()):
        if is_gpt_oss_experts(module):  # its own layout: transposed, biases, clamped SwiGLU
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, GptOssSparseExperts.from_hf(module))
            replaced += 1
            continue
        if not _is_fused_experts(module):
            continue
        if not _layout_supported(module):
            log.warning(
                "experts module %s (%s) has a layout SparseExperts does not implement; left as is",
                name,
                type(module).__name__,
            )
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseExperts.from_hf(module))
        replaced += 1
    log.info("replaced %d experts modules with SparseExperts", replaced)
    return replaced


def sparse_experts(model: nn.Module) -> list[tuple[str, SparseExperts]]:
    """(name, module) of every SparseExperts in `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseExperts)]
