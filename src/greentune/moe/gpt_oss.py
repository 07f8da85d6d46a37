"""gpt-oss experts as a `SparseExperts`: transposed weights, expert biases, interleaved clamped SwiGLU.

transformers' `GptOssExperts` differs from the other v5 fused experts in four ways, all kept:

    gate_up_proj [E, H, 2I]  (x @ W, i.e. transposed), columns interleaved: 2j = gate j, 2j+1 = up j
    down_proj    [E, I, H]   (transposed)
    gate_up_proj_bias [E, 2I], down_proj_bias [E, H]
    act(h) = (clamp(up, -limit, limit) + 1) · g · sigmoid(alpha · g),  g = clamp(gate, max=limit)

`GptOssSparseExperts` holds the HF parameters themselves (no copy, state-dict keys and
layout unchanged, so `save_pretrained` writes what transformers loads) and exposes them
through the `SparseExperts` weight API in the usual ``[out, in]`` orientation
(``weight("gate_up", e)`` is ``gate_up_proj[e].T``, rows interleaved gate/up). A quantised
store (`QuantExperts3D`) stands in as ``[E, out, in]`` (``is_transposed`` tells
`quant.replace` to quantise the transpose, so blocks run along the input dimension as GGUF
stores them). Expert LoRA acts on the ``[out, in]`` view, i.e. PEFT's `ParamWrapper` factors for
a transposed parameter (lora_A [r·E, in], lora_B [out, r·E]; see `expert_lora`).

The experts always take the per-expert loop (no grouped-GEMM path yet for this layout).
"""

from __future__ import annotations

import torch
from torch import nn

from greentune.moe.experts import _ATTR, SparseExperts


def is_gpt_oss_experts(module: nn.Module) -> bool:
    return type(module).__name__ == "GptOssExperts"


def clamped_swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation of interleaved [g0, u0, g1, u1, …] rows h [n, 2I] → [n, I]."""
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _logical(w) -> tuple[int, int, int]:
    """[E, out, in] of a transposed HF tensor [E, in, out], or of a store (already [E, out, in])."""
    if isinstance(w, torch.Tensor):
        return (w.shape[0], w.shape[2], w.shape[1])
    return tuple(w.shape)


class GptOssSparseExperts(SparseExperts):
    """`SparseExperts` for gpt-oss (see the module docstring); same parameter names as HF's."""

    is_transposed = True  # HF tensors are [E, in, out]; stores are [E, out, in]

    def __init__(self, gate_up_proj, down_proj, gate_up_bias, down_bias, alpha: float, limit: float):
        nn.Module.__init__(self)
        E, two_i, H = _logical(gate_up_proj)
        if _logical(down_proj) != (E, H, two_i // 2) or two_i % 2:
            raise ValueError(
                f"gpt-oss expert shapes disagree: gate_up {_logical(gate_up_proj)}, "
                f"down {_logical(down_proj)}"
            )
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, two_i // 2
        self._set("gate_up_proj", gate_up_proj)
        self._set("down_proj", down_proj)
        self.gate_up_proj_bias = nn.Parameter(gate_up_bias.detach(), requires_grad=False)
        self.down_proj_bias = nn.Parameter(down_bias.detach(), requires_grad=False)
        self.alpha, self.limit = float(alpha), float(limit)
        self.act_fn = None
        self._silu = False
        self.lora = None

    @classmethod
    def from_hf(cls, module: nn.Module) -> GptOssSparseExperts:
        return cls(
            module.gate_up_proj,
            module.down_proj,
            module.gate_up_proj_bias,
            module.down_proj_bias,
            module.alpha,
            module.limit,
        )

    # ---- weight access in [out, in] ------------------------------------------------------
    def weight_shape(self, name: str) -> tuple[int, int, int]:
        return _logical(getattr(self, _ATTR[name]))

    def weight(self, name: str, e: int) -> torch.Tensor:
        w = getattr(self, _ATTR[name])
        return w[e].t() if isinstance(w, torch.Tensor) else w.dequantize_expert(e)

    @torch.no_grad()
    def add_to_weight_(self, name: str, e: int, delta: torch.Tensor) -> None:
        w = getattr(self, _ATTR[name])
        if isinstance(w, torch.Tensor):
            w[e] += delta.t().to(w.dtype)
        else:
            w.add_(e, delta)

    def _per_expert(self, attr: str):
        w = getattr(self, attr)
        return w.transpose(1, 2).unbind(0) if isinstance(w, torch.Tensor) else w

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        return False

    def _loop_ok(self, x: torch.Tensor) -> bool:  # biases and the clamped SwiGLU: the autograd loop
        return False

    # ---- compute -------------------------------------------------------------------------
    def _expert(self, e: int, x: torch.Tensor, w1, w2, lora) -> torch.Tensor:
        h = self._linear(w1, e, x) + self.gate_up_proj_bias[e].to(x.dtype)  # [n, 2I]
        if lora is not None:
            h = self.lora.add_low_rank(lora["gate_up"], e, x, h)
        a = clamped_swiglu(h, self.alpha, self.limit)  # [n, I]
        y = self._linear(w2, e, a) + self.down_proj_bias[e].to(x.dtype)  # [n, H]
        if lora is not None:
            y = self.lora.add_low_rank(lora["down"], e, a, y)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, limit={self.limit}"
