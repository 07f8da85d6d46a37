"""Block formats against the reference: gguf-py's quantiser/dequantiser and ggml's K-quant algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from tests.quant import kquant_reference as ref

from greentune.errors import UserError
from greentune.quant import format_names, get_format
from greentune.quant.nf4 import NF4_CODE


def _weights(rows: int, cols: int) -> torch.Tensor:
    """Gaussian weights plus the awkward cases: zero blocks, constant blocks, ties of |max|,
    heavy tails, all-positive blocks, subnormal-small values."""
    w = torch.randn(rows, cols) * 0.02
    w[0, :256] = 0
    w[1, :32] = 0.5
    w[1, 32:64] = torch.tensor([0.25, -0.25] * 16)
    w[1, 64:256] = -0.125
    w[2] = torch.distributions.StudentT(2.5).sample((cols,)) * 0.01
    w[3, :256] = torch.rand(256)
    w[4, :256] = 1e-30
    return w


@pytest.mark.parametrize("name,qtype", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0)])
def test_simple_formats_bytes_equal_gguf(name, qtype):
    w = _weights(24, 512)
    q = get_format(name).quantize(w)
    expected = quants.quantize(w.numpy(), qtype)
    assert q.dtype == torch.uint8 and tuple(q.shape) == expected.shape
    assert np.array_equal(q.numpy(), expected)
    assert np.array_equal(get_format(name).dequantize(q, w.shape).numpy(), quants.dequantize(expected, qtype))


@pytest.mark.parametrize(
    "name,qtype,fn", [("q4_k", T.Q4_K, ref.quantize_q4_k), ("q6_k", T.Q6_K, ref.quantize_q6_k)]
)
def test_kquants_match_ggml_reference(name, qtype, fn):
    """Blocks read identically by gguf's dequantiser; error no worse than ggml's reference
    algorithm (a literal port) on the same weights; nearly all blocks byte-identical to it."""
    w = torch.randn(16, 1024) * 0.02
    w[::4] = torch.distributions.StudentT(2.5).sample((4, 1024)) * 0.01  # heavy-tailed rows
    fmt = get_format(name)
    q = fmt.quantize(w)
    assert tuple(q.shape) == (16, 1024 // 256 * fmt.type_size)
    ours = fmt.dequantize(q, w.shape).numpy()
    assert np.array_equal(ours, quants.dequantize(q.numpy(), qtype))

    expected = fn(w.numpy()).reshape(16, -1)
    theirs = quants.dequantize(expected, qtype)
    rmse = lambda a: float(np.sqrt(np.mean((a.astype(np.float64) - w.numpy()) ** 2)))  # noqa: E731
    assert rmse(ours) <= rmse(theirs) * (1 + 1e-4)
    same = (q.numpy().reshape(-1, fmt.type_size) == expected.reshape(-1, fmt.type_size)).all(axis=1)
    assert same.mean() >= 0.9, f"only {same.mean():.0%} of blocks equal the reference"


@pytest.mark.parametrize("name,qtype", [("q4_k", T.Q4_K), ("q6_k", T.Q6_K)])
def test_kquants_special_blocks(name, qtype):
    """Zero, constant, tiny and all-positive blocks: exact or near-exact, and gguf reads them alike."""
    w = _weights(5, 512)
    fmt = get_format(name)
    q = fmt.quantize(w)
    ours = fmt.dequantize(q, w.shape)
    assert np.array_equal(ours.numpy(), quants.dequantize(q.numpy(), qtype))
    assert torch.all(ours[0, :256] == 0) and torch.all(ours[4, :256].abs() < 1e-20)
    assert (ours[1, 64:256] + 0.125).abs().max() < 2.5e-3  # 6-bit min relative to the 0.25 one
    assert (ours[1, :32] - 0.5).abs().max() < 2e-3
    assert (ours[3, :256] - w[3, :256]).abs().max() < 0.04


def test_kquant_error_bounds():
    w = torch.randn(32, 1024)
    for name, bound in [("q4_k", 0.12), ("q6_k", 0.03), ("q8_0", 0.006), ("q4_0", 0.13)]:
        fmt = get_format(name)
        rel = (fmt.dequantize(fmt.quantize(w), w.shape) - w).pow(2).mean().sqrt() / w.std()
        assert rel < bound, (name, float(rel))


@pytest.mark.parametrize(
    "name,bpw",
    [("q8_0", 8.5), ("q4_0", 4.5), ("q4_k", 4.5), ("q6_k", 6.5625), ("nf4", 4.5), ("f16", 16), ("f32", 32)],
)
def test_packed_size_is_bits_per_weight(name, bpw):
    fmt = get_format(name)
    w = torch.randn(8, 512)
    q = fmt.quantize(w)
    assert fmt.bits_per_weight == bpw
    assert q.numel() * 8 == bpw * w.numel() == fmt.nbytes(w.shape) * 8


def test_nf4_exact_codes_and_roundtrip():
    fmt = get_format("nf4")
    code = torch.tensor(NF4_CODE)
    # Each code value times a block scale comes back exactly; the block's absmax is the scale.
    w = (code.repeat(4) * 0.37).reshape(1, 64)
    assert torch.equal(
        fmt.dequantize(fmt.quantize(w), w.shape), (code.repeat(4) * torch.tensor(0.37)).reshape(1, 64)
    )
    # Random weights: every dequantised value is absmax·code, and codes are the nearest.
    w = torch.randn(32, 256)
    q = fmt.quantize(w)
    dq = fmt.dequantize(q, w.shape).reshape(-1, 64)
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    nearest = code[(w.reshape(-1, 64) / absmax).unsqueeze(-1).sub(code).abs().argmin(-1)]
    assert torch.equal(dq, nearest * absmax)
    rel = (dq.reshape(w.shape) - w).pow(2).mean().sqrt() / w.std()
    assert 0.05 < rel < 0.11


def test_nf4_double_quant():
    fmt = get_format("nf4_dq")
    w = torch.randn(128, 512)  # 1024 blocks → 4 second-level blocks
    q = fmt.quantize(w)
    assert tuple(q.shape) == (1024 * 33 + 4 * 4 + 4,)
    assert abs(fmt.bits_per_weight - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-12
    dq = fmt.dequantize(q, w.shape)
    plain = get_format("nf4")
    e_dq = (dq - w).pow(2).mean().sqrt()
    e_plain = (plain.dequantize(plain.quantize(w), w.shape) - w).pow(2).mean().sqrt()
    assert e_dq < e_plain * 1.01  # the 8-bit scales cost < 1 % extra error
    assert fmt.row_local is False


def test_zero_tensor_and_device_agnostic_dtype():
    for name in ("q8_0", "q4_0", "q4_k", "q6_k", "nf4", "nf4_dq"):
        fmt = get_format(name)
        z = torch.zeros(2, 256)
        assert torch.equal(fmt.dequantize(fmt.quantize(z), z.shape), z)
        # bf16 input quantises like its fp32 value
        w = torch.randn(2, 256).to(torch.bfloat16)
        assert torch.equal(fmt.quantize(w), fmt.quantize(w.float()))


def test_get_format_errors():
    assert get_format("Q4_K") is get_format("q4_k")
    with pytest.raises(UserError, match="q8_0, q4_0, q4_k, q6_k, nf4"):
        get_format("q3_k")
    assert set(format_names()) == {"q8_0", "q4_0", "q4_k", "q6_k", "nf4", "nf4_dq", "f16", "f32", "mxfp4"}
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        get_format("q4_k").quantize(torch.randn(4, 320))


def test_parallel_chunks_give_identical_bytes():
    """Several CPU threads quantise chunks in worker threads: same bytes, caller's threads kept."""
    w = torch.randn(64, 2048) * 0.02  # 512 super-blocks → 2 chunks of 256
    single = {n: get_format(n).quantize(w) for n in ("q4_k", "q6_k")}
    torch.set_num_threads(2)
    try:
        for n, q in single.items():
            assert torch.equal(get_format(n).quantize(w), q)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
