"""`QuantEmbedding`: a frozen token embedding stored in a block format; `QuantTiedHead`: an
output layer that shares it.

A 32000×2048 vocabulary is 262 MB in fp32 (twice that with an untied lm_head): on a 0.5–1 B
model that is as much as all the quantised layers together. llama.cpp's Q4_K_M keeps the
token embedding in Q4_K and the output layer in Q6_K; `replace.plan` does the same
(`replace.embedding_formats`).

`QuantEmbedding(ids)` gathers the packed rows of the ids and dequantises only those, so a
lookup costs (tokens × dim) work and memory, never the table. The table is frozen (no
gradient to it; LoRA recipes never train it). Rows must be row-local blocks (every GGUF format
and NF4; not NF4 with double quantisation, whose scales span rows).

With tied word embeddings the lm_head is the same tensor: `QuantTiedHead` holds a reference
to the `QuantEmbedding` (not a submodule, so the bytes are in the state dict once, under the
embedding) and multiplies by its dequantised rows, in row chunks like `QuantLinear`. Merging
into it (`add_`) changes the embedding too, as adding to a tied fp32 weight would.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from greentune.quant import kernels
from greentune.quant.block import BlockFormat
from greentune.quant.formats import fallback_format, get_format
from greentune.quant.linear import PackedMatrix, compute_dtype, dequant_linear

logger = logging.getLogger(__name__)


class QuantEmbedding(PackedMatrix):
    """A frozen `nn.Embedding` stored in a row-local block format.

    Attributes:
        num_embeddings, embedding_dim, padding_idx: as nn.Embedding (padding_idx only kept for
            the way back to nn.Embedding; lookups of it return its stored row).
        fmt: the `BlockFormat` used (a fallback when `embedding_dim` is not whole blocks).
        dtype: the dtype lookups return (the original embedding's).
        qweight: uint8 buffer ``fmt.packed_shape((num_embeddings, embedding_dim))``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        fmt: str | BlockFormat,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        self.fmt = get_format(fmt)
        if not self.fmt.row_local:
            raise ValueError(f"{self.fmt.name} is not row-local: an embedding needs per-row blocks")
        self.dtype = dtype
        shape = self.fmt.packed_shape((self.num_embeddings, self.embedding_dim))
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str | BlockFormat) -> QuantEmbedding:
        """Quantise `emb.weight` (falling back per `fallback_format`) into a new module."""
        wanted = get_format(fmt)
        used = fallback_format(wanted, emb.embedding_dim)
        module = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            used,
            padding_idx=emb.padding_idx,
            dtype=emb.weight.dtype,
            device=emb.weight.device,
        )
        module.load_weight_(emb.weight)
        return module

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    # the `in_features`/`out_features` view of the table, for a tied head and LoRA
    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        return self.num_embeddings

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) as float32 ``[*ids.shape, embedding_dim]``."""
        flat = ids.reshape(-1).to(self.qweight.device)
        rows = self.qweight.index_select(0, flat)
        n = flat.numel()
        w = self.fmt.dequantize(
            rows,
            (n, self.embedding_dim),
            native=kernels.wanted(self.fmt, rows.device, n * self.embedding_dim),
        )
        return w.view(*ids.shape, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.lookup(ids)
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt.name}" + (
            f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        )


class QuantTiedHead(nn.Module):
    """An output layer ``x · Ŵᵀ`` whose weight is a `QuantEmbedding`'s table (tied embeddings).

    Looks like a bias-free `QuantLinear` (in_features = embedding_dim, out_features = vocab,
    `fmt`, `qweight`, `dequantize`, `add_`, `raw_bytes`), but owns no bytes: it reads the
    embedding's, so moving or re-quantising the embedding moves the head with it.
    """

    bias = None

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # a reference, not a submodule

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    @property
    def fmt(self) -> BlockFormat:
        return self.embedding.fmt

    @property
    def qweight(self) -> torch.Tensor:
        return self.embedding.qweight

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.embedding.dequantize()

    def add_(self, delta: torch.Tensor) -> QuantTiedHead:
        """Merge into the shared table (the embedding changes too, as with tied fp32 weights)."""
        self.embedding.add_(delta)
        return self

    def raw_bytes(self) -> torch.Tensor:
        return self.embedding.raw_bytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        return dequant_linear(x.to(dtype), self.embedding).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fmt={self.fmt.name}, tied to the input embedding"
        )
