"""The per-expert SwiGLU experts (and their LoRA) as one autograd function, for the CPU.

`SparseExperts` groups a layer's token-slots by expert; this runs every expert on its own rows,

    h = x W1_eᵀ + s·(x A1_eᵀ) B1_eᵀ        [n, 2I]  (gate | up)
    a = silu(gate) ⊙ up                   [n, I]
    y = a W2_eᵀ + s·(a A2_eᵀ) B2_eᵀ        [n, H]

and its backward is written out by hand, expert by expert, straight into the [E, ·, ·] LoRA
gradients. The frozen-weight GEMMs go through `greentune.cpu_gemm` (oneDNN: 1.2–1.7× MKL's
sgemm on this project's EPYC machines), which has no autograd of its own, hence this function.
It also avoids what autograd over a Python loop costs: ~10 graph nodes per expert, a stack of
E per-expert factor gradients, a temporary for every sum. Measured paired on the moe_throughput
layer (2-core EPYC, fp32, 1,024 tokens, top-2 of 8, LoRA r16), before the GEMM change: the
block's forward + backward from 161 to 149 ms. With torch's GEMMs (`cpu_gemm.BACKEND = "torch"`)
the arithmetic is the autograd loop's, bit for bit (tests/moe/test_expert_loop.py).

Weights are read per expert through `weight(name, e)` (a view for plain tensors; a dequantised
copy for a quantised store, taken again in the backward, so only one expert's dequantised
weight lives at a time). The base weights must be frozen and the LoRA without dropout; other
cases take `SparseExperts`' autograd loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from greentune.cpu_gemm import linear, matmul

#: weight(name, e) -> [out, in] for name "gate_up" ([2I, H]) or "down" ([H, I])
WeightOf = Callable[[str, int], torch.Tensor]


def _groups(counts: list[int]):
    """(expert, row slice) of every expert that has rows, in order."""
    lo = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(lo, lo + n)
        lo += n


class ExpertLoop(torch.autograd.Function):
    """y [S, H] from rows x [S, H] grouped by expert (`counts` rows each); LoRA factors
    a1 [E, r, H], b1 [E, 2I, r], a2 [E, r, I], b2 [E, H, r] scaled by `scale`, or all None."""

    @staticmethod
    def forward(ctx, x, a1, b1, a2, b2, weight: WeightOf, counts: list[int], scale: float):
        lora = a1 is not None
        saved = []  # per expert: (expert, rows, h [n, 2I], a [n, I], u1 [n, r], u2 [n, r])
        ys = []
        for e, s in _groups(counts):
            xe = x[s]
            h = linear(xe, weight("gate_up", e))
            u1 = u2 = None
            if lora:
                u1 = torch.mm(xe, a1[e].t())
                h.addmm_(u1, b1[e].t(), alpha=scale)
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate).mul_(up)
            y = linear(a, weight("down", e))
            if lora:
                u2 = torch.mm(a, a2[e].t())
                y.addmm_(u2, b2[e].t(), alpha=scale)
            ys.append(y)
            saved.append((e, s, h, a, u1, u2))
        ctx.save_for_backward(x, a1, b1, a2, b2)
        ctx.saved, ctx.weight, ctx.scale = saved, weight, scale
        return torch.cat(ys) if len(ys) > 1 else ys[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, a1, b1, a2, b2 = ctx.saved_tensors
        weight, scale = ctx.weight, ctx.scale
        lora = a1 is not None
        want_dx = ctx.needs_input_grad[0]
        grads = [torch.zeros_like(t) for t in (a1, b1, a2, b2)] if lora else [None] * 4
        da1, db1, da2, db2 = grads
        dxs = []
        for e, s, h, a, u1, u2 in ctx.saved:
            dye = dy[s]
            da = matmul(dye, weight("down", e))  # [n, I]
            if lora:  # y += s·(a A2ᵀ) B2ᵀ
                torch.mm(dye.t(), u2, out=db2[e]).mul_(scale)
                dv = torch.mm(dye, b2[e]).mul_(scale)  # [n, r]
                torch.mm(dv.t(), a, out=da2[e])
                da.addmm_(dv, a2[e])
            gate, up = h.chunk(2, dim=-1)
            dh = torch.empty_like(h)
            d_gate, d_up = dh.chunk(2, dim=-1)
            torch.mul(da, F.silu(gate), out=d_up)
            torch.ops.aten.silu_backward.grad_input(da.mul_(up), gate, grad_input=d_gate)
            if lora:  # h += s·(x A1ᵀ) B1ᵀ
                torch.mm(dh.t(), u1, out=db1[e]).mul_(scale)
                dz = torch.mm(dh, b1[e]).mul_(scale)  # [n, r]
                torch.mm(dz.t(), x[s], out=da1[e])
            if want_dx:
                dx = matmul(dh, weight("gate_up", e))
                if lora:
                    dx.addmm_(dz, a1[e])
                dxs.append(dx)
        ctx.saved = None
        dx = (torch.cat(dxs) if len(dxs) > 1 else dxs[0]) if want_dx else None
        return dx, da1, db1, da2, db2, None, None, None
