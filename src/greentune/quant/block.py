"""The block-format interface every quantised format implements, and byte helpers they share.

A block format cuts each row of a weight matrix into blocks of `block_size` consecutive
weights and stores each block in `type_size` bytes, exactly as GGUF does: a tensor of shape
`[..., K]` becomes `uint8 [..., K // block_size * type_size]`, rows stay rows. That makes
the packed bytes of a `[out, in]` weight the bytes a GGUF file stores for it (GGUF's
`ne = [in, out]`), so the exporter can write them as they are.

Formats are stateless singletons: `quantize(w)` and `dequantize(q, shape)` are pure
functions of plain torch tensors and run on CPU, CUDA and MPS alike. Arithmetic is fp32
(the reference implementations are fp32 C), scales are IEEE half with round-to-nearest-even,
as `GGML_FP32_TO_FP16` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

try:  # gguf is a dependency; only the type enum is used here.
    from gguf import GGMLQuantizationType
except ImportError:  # pragma: no cover - gguf is in pyproject's dependencies
    GGMLQuantizationType = None  # type: ignore[assignment,misc]

#: Target number of fp32 elements processed per chunk by the search-based quantisers (K-quants)
#: on one CPU thread, so their working memory stays ~ a few MB whatever the tensor size
#: (streaming loads rely on it). See `chunk_elements` for other cases.
CHUNK_ELEMENTS = 1 << 16


def chunk_elements(device: torch.device) -> int:
    """Elements per quantiser chunk: `CHUNK_ELEMENTS` on CPU, 2^22 on accelerators (where
    kernel launches, not memory, bound the many small ops)."""
    return CHUNK_ELEMENTS if device.type == "cpu" else 1 << 22


def map_chunks(fn, blocks: torch.Tensor, out: torch.Tensor, per_chunk: int) -> torch.Tensor:
    """``out[sl] = fn(blocks[sl])`` over row chunks of `per_chunk` rows.

    On CPU the chunks are spread over `torch.get_num_threads()` Python worker threads, each
    running torch ops on one thread. The K-quant searches are hundreds of small ops per chunk;
    splitting each op over OpenMP threads costs a synchronisation per op, which on a busy
    machine dominates (measured on a shared 2-core box, Q4_K of 4096×14336: 16 s on one
    thread, 260 s with two intra-op threads). Workers on separate chunks need no such sync.
    """
    slices = list(chunks(blocks.shape[0], per_chunk))
    workers = min(torch.get_num_threads(), len(slices))
    if blocks.device.type != "cpu" or workers <= 1:
        for sl in slices:
            out[sl] = fn(blocks[sl])
        return out

    def run(part):
        torch.set_num_threads(1)  # this worker thread's intra-op pool
        for sl in part:
            out[sl] = fn(blocks[sl])

    parts = [slices[i::workers] for i in range(workers)]
    caller_threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, parts))
    finally:
        torch.set_num_threads(caller_threads)
    return out


class BlockFormat:
    """One quantised storage format.

    Attributes:
        name: registry name, e.g. ``"q4_k"``.
        block_size: weights per block (32 for Q8_0/Q4_0, 256 for the K-quants, 64 for NF4).
        type_size: bytes per block (34 for Q8_0, 18 for Q4_0, 144 for Q4_K, 210 for Q6_K).
        ggml_type: the GGUF tensor type, or ``None`` for formats GGUF lacks (NF4).
        row_local: True when each row's bytes depend only on that row, so rows (and
            experts) can be quantised separately and concatenated; NF4 with double
            quantisation shares second-level scales across rows, so it is False there.
    """

    name: str = ""
    block_size: int = 1
    type_size: int = 4
    ggml_type: GGMLQuantizationType | None = None
    row_local: bool = True

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def bits_per_weight(self) -> float:
        """Storage cost in bits per weight: 8 · type_size / block_size (e.g. 4.5 for Q4_K)."""
        return 8.0 * self.type_size / self.block_size

    def fits(self, row_length: int) -> bool:
        """Whether rows of this length can be stored (a whole number of blocks)."""
        return row_length > 0 and row_length % self.block_size == 0

    def packed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the uint8 tensor `quantize` returns for a float tensor of `shape`."""
        shape = tuple(int(s) for s in shape)
        self._check_rows(shape[-1])
        return (*shape[:-1], shape[-1] // self.block_size * self.type_size)

    def nbytes(self, shape: Sequence[int]) -> int:
        """Packed size in bytes of a tensor of `shape`."""
        return math.prod(self.packed_shape(shape))

    # ---- the two operations ----------------------------------------------------------------
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """float ``[..., K]`` → uint8 ``packed_shape(w.shape)``; K must be a multiple of block_size.

        On CPU by the format's native kernel when it has one and it can be built
        (`kernels.quantize_blocks`; the same bytes as `_quantize_blocks`, bit for bit)."""
        w = torch.as_tensor(w)
        packed = self.packed_shape(w.shape)
        blocks = w.detach().reshape(-1, self.block_size).to(torch.float32)
        from greentune.quant import kernels  # (lazy: kernels imports nothing of ours)

        if kernels.quantize_wanted(self, blocks.device):
            out = kernels.quantize_blocks(self, blocks)  # same bytes, native code
        else:
            out = self._quantize_blocks(blocks)
        assert out.shape == (blocks.shape[0], self.type_size), (self.name, out.shape)
        return out.reshape(packed)

    def dequantize(self, q: torch.Tensor, shape: Sequence[int], native: bool = False) -> torch.Tensor:
        """uint8 packed bytes → float32 tensor of `shape` (on q's device).

        `native`: use the format's native CPU kernel when it has one and it can be built
        (`kernels.dequantize_blocks`; same values, bit for bit); callers ask `kernels.wanted`.
        """
        shape = tuple(int(s) for s in shape)
        if tuple(q.shape) != self.packed_shape(shape):
            raise ValueError(
                f"{self.name}: packed shape {tuple(q.shape)} does not match "
                f"{self.packed_shape(shape)} for a tensor of shape {shape}"
            )
        blocks = q.reshape(-1, self.type_size)
        if native:
            from greentune.quant.kernels import dequantize_blocks

            return dequantize_blocks(self, blocks).reshape(shape)
        return self._dequantize_blocks(blocks).reshape(shape)

    # ---- what a format implements ------------------------------------------------------------
    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """float32 ``[n, block_size]`` → uint8 ``[n, type_size]``."""
        raise NotImplementedError

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, type_size]`` → float32 ``[n, block_size]``."""
        raise NotImplementedError

    def _check_rows(self, row_length: int) -> None:
        if not self.fits(row_length):
            raise ValueError(
                f"{self.name}: row length {row_length} is not a multiple of the block size {self.block_size}"
            )

    def __repr__(self) -> str:
        return f"<BlockFormat {self.name}: {self.block_size} weights in {self.type_size} bytes>"

    # Formats are registry singletons: copying a module that holds one keeps the same object.
    def __copy__(self) -> BlockFormat:
        return self

    def __deepcopy__(self, memo) -> BlockFormat:
        return self


# ---- byte helpers ------------------------------------------------------------------------------


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``[n]`` or ``[n, 1]`` → its IEEE half bytes, uint8 ``[n, 2]`` (little-endian, RNE)."""
    return x.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def f16_value(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 2]`` half bytes → fp32 ``[n, 1]``."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def f16_from_bytes(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """IEEE half from its two bytes given as int32 tensors (low, high) → fp32, same shape.

    Integer ops and a bitcast only: works on strided slices (a uint8 → float16 `view` needs
    the two bytes contiguous)."""
    return (lo | (hi << 8)).to(torch.int16).view(torch.float16).to(torch.float32)


def f16_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 → the fp32 value of its nearest half (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x)))."""
    return x.to(torch.float16).to(torch.float32)


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` elementwise, in d's dtype."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `nearest_int`: round half to even (the FPU's default mode), as float."""
    return torch.round(x)


def uint8_wrap(x: torch.Tensor) -> torch.Tensor:
    """The value C gets by assigning an int to a `uint8_t` (modulo 256), as float."""
    return torch.remainder(x, 256.0)


def chunks(n: int, per_chunk: int):
    """Yield slices covering range(n) in steps of `per_chunk` (at least 1)."""
    step = max(1, per_chunk)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))
