"""GGUF quantisation presets: which GGML type each tensor gets, and the quantisers.

Presets (`QUANTS`), and the GGML type of each tensor under them:

========  ==============================================================================
f32       every tensor F32
f16       2-D/3-D weights F16; norms, biases, router (`ffn_gate_inp`), rope factors F32
q8_0      2-D/3-D weights Q8_0 (row length not a multiple of 32 → F16); rest as f16
q4_0      weights Q4_0; `output.weight` Q6_K (Q8_0 if its rows are not a multiple of 256),
          as llama.cpp's own Q4_0 does; rest as f16
q4_k_m    llama.cpp's Q4_K_M mix (src/llama-quant.cpp, `llama_tensor_get_type_impl`):
          - default Q4_K;
          - `output.weight` Q6_K (Q8_0 if rows % 256); with tied embeddings `token_embd`
            takes the output's type;
          - `attn_v` Q6_K in the layers where `use_more_bits(i, n)` holds, i.e.
            i < n/8 or i ≥ 7n/8 or (i − n/8) % 3 == 2 (about half the layers, the first
            and last eighth always);
          - `ffn_down` / `ffn_down_exps` Q6_K where `use_more_bits` holds;
          - with exactly 8 experts: `attn_v` and `attn_k` Q8_0 and `attn_output` Q6_K
            (llama.cpp uses Q5_K there; greentune has no Q5_K quantiser, so one step up);
          - a tensor whose row length is not a multiple of 256 falls back as llama.cpp's
            `tensor_type_fallback` does: Q4_K → Q5_0, Q6_K → Q8_0, and to F16 when the row
            is not even a multiple of 32.
mxfp4     llama.cpp's MXFP4_MOE (gpt-oss's published GGUFs): expert tensors (`*_exps`)
          MXFP4, every other weight Q8_0; rest as f16
========  ==============================================================================

Never quantised (as in llama.cpp): 1-D tensors (norms, biases), the router
`ffn_gate_inp` (routing decisions are sensitive and the tensor is tiny), rope factors, the
delta net's `ssm_conv1d` kernel (F32 in every preset: ggml's ssm_conv reads no other type).

Quantisers: Q8_0/Q4_0/Q4_K/Q6_K come from `greentune.quant.formats` (imported lazily), whose
`quantize` runs the native multi-threaded kernels (`greentune.quant.kernels`; Q8_0/Q4_0 bytes
equal `gguf.quants`'). Q5_0/Q5_1, only ever a fallback for rows that are not whole K-quant
blocks, use `gguf.quants` (the numpy port of ggml's reference quantisers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType
from gguf.constants import GGML_QUANT_SIZES

from greentune.errors import UserError
from greentune.formats import GGUF_QUANTS

log = logging.getLogger(__name__)

QUANTS = GGUF_QUANTS  # the presets (greentune.formats)

FILE_TYPE = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "mxfp4": LlamaFileType.MOSTLY_MXFP4_MOE,
}

_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q not in QUANTS:
        raise UserError(f"unknown GGUF quant {quant!r}; choose one of {', '.join(QUANTS)}")
    return q


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's rule for the layers that get more bits in the *_M mixes."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def is_quantisable(name: str, shape: tuple[int, ...]) -> bool:
    """2-D/3-D `.weight` tensors except norms, the router and the delta net's convolution kernel
    (ggml's ssm_conv reads F32 only), as llama.cpp decides."""
    return (
        len(shape) >= 2
        and name.endswith(".weight")
        and "_norm" not in name
        and "ffn_gate_inp" not in name
        and ".ssm_conv1d." not in name
    )


def _fallback(t: T, row: int) -> T:
    block = GGML_QUANT_SIZES[t][0]
    if row % block == 0:
        return t
    new = _FALLBACK.get(t, T.F16)
    if row % GGML_QUANT_SIZES[new][0] != 0:
        new = T.F16
    log.info("row length %d is not a multiple of %d for %s: falling back to %s", row, block, t.name, new.name)
    return new


def tensor_type(
    quant: str, name: str, shape: tuple[int, ...], layer: int | None, n_layer: int, n_expert: int, tied: bool
) -> T:
    """GGML type of GGUF tensor `name` (numpy `shape`, rows innermost-last) under preset `quant`."""
    if quant == "f32":
        return T.F32
    if not is_quantisable(name, shape):
        return T.F32
    if quant == "f16":
        return T.F16
    row = shape[-1]
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if quant == "q8_0":
        return _fallback(T.Q8_0, row)
    if quant == "mxfp4":  # llama.cpp's MXFP4_MOE: experts MXFP4, every other weight Q8_0
        return _fallback(T.MXFP4 if "_exps." in name else T.Q8_0, row)
    if quant == "q4_0":
        if is_output:
            return T.Q6_K if row % 256 == 0 and have_k_quants() else T.Q8_0
        return _fallback(T.Q4_0, row)
    # q4_k_m
    if is_output:
        return T.Q6_K if row % 256 == 0 else T.Q8_0
    t = T.Q4_K
    if ".attn_v." in name:
        t = T.Q8_0 if n_expert == 8 else (T.Q6_K if use_more_bits(layer, n_layer) else T.Q4_K)
    elif ".attn_k." in name and n_expert == 8:
        t = T.Q8_0
    elif ".attn_output." in name and n_expert == 8:
        t = T.Q6_K
    elif ".ffn_down" in name and use_more_bits(layer, n_layer):
        t = T.Q6_K
    return _fallback(t, row)


# -- quantisers ----------------------------------------------------------------------------


def _formats():
    try:
        from greentune.quant import formats  # type: ignore[attr-defined]
    except ImportError:
        return None
    return formats


def have_k_quants() -> bool:
    f = _formats()
    if f is None:
        return False
    try:
        f.get_format("q4_k")
        f.get_format("q6_k")
    except Exception:  # noqa: BLE001 — any failure means "not usable"
        return False
    return True


def _ours(fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    def q(x: np.ndarray) -> np.ndarray:
        import torch

        f = _formats()
        if f is None:
            raise UserError(
                f"{fmt.upper()} quantisation needs greentune.quant.formats, which is not installed"
            )
        out = f.get_format(fmt).quantize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        out = out.cpu().numpy() if hasattr(out, "cpu") else np.asarray(out)
        out = np.ascontiguousarray(out).view(np.uint8)
        return out.reshape(*x.shape[:-1], -1)

    return q


def _gguf(t: T) -> Callable[[np.ndarray], np.ndarray]:
    def q(x: np.ndarray) -> np.ndarray:
        from gguf import quants

        return quants.quantize(np.ascontiguousarray(x, dtype=np.float32), t)

    return q


QUANTISERS: dict[T, Callable[[np.ndarray], np.ndarray]] = {
    T.F32: lambda x: np.ascontiguousarray(x, dtype=np.float32),
    T.F16: lambda x: np.ascontiguousarray(x, dtype=np.float16),
    T.Q8_0: _ours("q8_0"),
    T.Q4_0: _ours("q4_0"),
    T.Q5_0: _gguf(T.Q5_0),
    T.Q5_1: _gguf(T.Q5_1),
    T.Q4_K: _ours("q4_k"),
    T.Q6_K: _ours("q6_k"),
    T.MXFP4: _ours("mxfp4"),
}


def quantise(x: np.ndarray, t: T) -> np.ndarray:
    """float32 [..., K] → array ready for GGUF: f32/f16 values, or uint8 blocks [..., K/bs·bytes]."""
    fn = QUANTISERS.get(t)
    if fn is None:
        raise UserError(f"greentune cannot quantise to {t.name}")
    out = fn(x)
    if t not in (T.F32, T.F16):
        block, nbytes = GGML_QUANT_SIZES[t]
        expected = (*x.shape[:-1], x.shape[-1] // block * nbytes)
        assert out.shape == expected, (t.name, out.shape, expected)
    return out


def nbytes_of(shape: tuple[int, ...], t: T) -> int:
    block, size = GGML_QUANT_SIZES[t]
    n = int(np.prod(shape))
    return n // block * size
