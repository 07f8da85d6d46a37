"""`QuantExperts3D`: a fused MoE expert tensor ``[E, out, in]`` stored packed, expert by expert.

transformers v5 keeps all experts of a layer in 3D parameters, ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` (bitsandbytes leaves these in full precision). This module stores such a
tensor in a block format, each expert's ``[out, in]`` matrix packed on its own, so one expert can
be dequantised, merged into (ReLoRA) or re-quantised without touching the others. The packed
bytes of a row-local format are exactly GGUF's stacked expert tensors (`blk.N.ffn_*_exps`,
numpy shape ``(E, out, in/block·type_size)``).

API, small on purpose:

    experts = QuantExperts3D.from_tensor(w, "q4_k")   # w [E, out, in]
    experts.dequantize_expert(e)                      # → float32 [out, in]
    experts[e]                                        # same (HF's eager expert loop indexes so)
    experts.linear(x, e)                              # x [..., in] → [..., out], = x·Ŵ_eᵀ
    experts.add_(e, delta)                            # Ŵ_e ← Q(Ŵ_e + delta), delta [out, in]
    experts.raw_bytes()                               # uint8 [E, *fmt.packed_shape((out, in))]
    experts.grouped_linear(x, offs)                   # rows grouped by expert (CUDA, Triton)

`linear` keeps only the packed bytes for backward (see `linear._DequantMatmul`); indexing
returns a plain tensor, which autograd keeps alive until backward if it is used in a graph.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from greentune.quant import kernels, triton_dispatch
from greentune.quant.block import BlockFormat
from greentune.quant.formats import fallback_format, get_format
from greentune.quant.linear import compute_dtype, dequant_linear

logger = logging.getLogger(__name__)


class QuantExperts3D(nn.Module):
    """Frozen expert weights ``[num_experts, out_features, in_features]`` in a block format.

    Attributes:
        num_experts, out_features, in_features: the logical shape.
        fmt: the `BlockFormat` used (a fallback if the requested one does not fit `in_features`).
        qweight: uint8 buffer ``[num_experts, *fmt.packed_shape((out_features, in_features))]``.
    """

    def __init__(
        self, num_experts: int, out_features: int, in_features: int, fmt: str | BlockFormat, device=None
    ):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = (
            int(num_experts),
            int(out_features),
            int(in_features),
        )
        self.fmt = get_format(fmt)
        per_expert = self.fmt.packed_shape((self.out_features, self.in_features))
        self.register_buffer(
            "qweight", torch.zeros((self.num_experts, *per_expert), dtype=torch.uint8, device=device)
        )

    @classmethod
    def from_tensor(cls, weight: torch.Tensor, fmt: str | BlockFormat) -> QuantExperts3D:
        """Quantise a ``[E, out, in]`` tensor (falling back per `fallback_format`, logged)."""
        if weight.dim() != 3:
            raise ValueError(f"expected a [experts, out, in] tensor, got shape {tuple(weight.shape)}")
        wanted = get_format(fmt)
        used = fallback_format(wanted, weight.shape[-1])
        if used is not wanted:
            logger.info(
                "expert rows of %d are not a multiple of %s's block %d: storing %s instead",
                weight.shape[-1],
                wanted.name,
                wanted.block_size,
                used.name,
            )
        module = cls(*weight.shape, fmt=used, device=weight.device)
        module.load_(weight)
        return module

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_experts, self.out_features, self.in_features))

    def __len__(self) -> int:
        return self.num_experts

    # ---- storing ---------------------------------------------------------------------------
    @torch.no_grad()
    def load_(self, weight: torch.Tensor) -> None:
        """Quantise all experts from ``[E, out, in]`` in place."""
        if tuple(weight.shape) != tuple(self.shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} != {tuple(self.shape)}")
        if self.fmt.row_local:
            self.qweight.copy_(self.fmt.quantize(weight.to(self.qweight.device, torch.float32)))
        else:
            for e in range(self.num_experts):
                self.load_expert_(e, weight[e])

    @torch.no_grad()
    def load_expert_(self, e: int, weight: torch.Tensor) -> None:
        """Quantise expert `e` from ``[out, in]`` in place."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"expert weight shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}"
            )
        self.qweight[e].copy_(self.fmt.quantize(weight.to(self.qweight.device, torch.float32)))

    @torch.no_grad()
    def add_(self, e: int, delta: torch.Tensor) -> QuantExperts3D:
        """``Ŵ_e ← Q(Ŵ_e + delta)`` in place; delta ``[out, in]``. Returns self."""
        self.load_expert_(e, self.dequantize_expert(e) + delta.to(self.qweight.device, torch.float32))
        return self

    # ---- reading ---------------------------------------------------------------------------
    def dequantize_expert(self, e: int | torch.Tensor) -> torch.Tensor:
        """Expert `e`'s weight as float32 ``[out, in]``."""
        shape = (self.out_features, self.in_features)
        w = triton_dispatch.dequantize(self.fmt, self.qweight[int(e)], shape)  # CUDA: same bits
        if w is not None:
            return w
        return self.fmt.dequantize(
            self.qweight[int(e)],
            shape,
            native=kernels.wanted(self.fmt, self.qweight.device, shape[0] * shape[1]),
        )

    def dequantize(self) -> torch.Tensor:
        """All experts as float32 ``[E, out, in]``."""
        return torch.stack([self.dequantize_expert(e) for e in range(self.num_experts)])

    def __getitem__(self, e: int | torch.Tensor) -> torch.Tensor:
        return self.dequantize_expert(e)

    def _weight(self, e, dtype: torch.dtype) -> torch.Tensor:
        w = self.dequantize_expert(e)
        return w if dtype == torch.float32 else w.to(dtype)

    def _packed(self, e):
        return self.qweight[int(e)], self.fmt, (self.out_features, self.in_features)

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """``x · Ŵ_eᵀ``: x ``[..., in]`` → ``[..., out]`` in x's dtype (fp32 compute on CPU)."""
        dtype = compute_dtype(x)
        return dequant_linear(x.to(dtype), self, int(e)).to(x.dtype)

    def grouped_ok(self, x: torch.Tensor) -> bool:
        """Whether `grouped_linear` serves rows like x (the Triton kernels, on CUDA)."""
        return triton_dispatch.grouped_ok(x, self)

    def grouped_linear(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x ``[S, in]`` grouped by expert (offs: int32 ``[E]`` group ends) → ``[S, out]``, group e
        times ``Ŵ_eᵀ``, by the Triton kernels (`triton_dispatch.grouped_linear`)."""
        return triton_dispatch.grouped_linear(x, self, offs)

    def raw_bytes(self) -> torch.Tensor:
        """Packed bytes, uint8 ``[E, *fmt.packed_shape((out, in))]`` (GGUF's stacked layout)."""
        return self.qweight

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, out_features={self.out_features}, "
            f"in_features={self.in_features}, fmt={self.fmt.name}"
        )
