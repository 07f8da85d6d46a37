"""Native quantise kernels (`kernels.c` via `kernels.quantize_blocks`): the bytes of the
plain-torch `_quantize_blocks`, for every format, on random and adversarial blocks, on any
number of threads; the fallback without a compiler; the loader and the GGUF exporter use them."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from greentune.quant import kernels, load_quantized
from greentune.quant.formats import get_format

FORMATS = ["q8_0", "q4_0", "q4_k", "q6_k", "nf4"]

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler")


def _both(fmt, w: torch.Tensor):
    blocks = w.reshape(-1, fmt.block_size).to(torch.float32)
    return fmt._quantize_blocks(blocks), kernels.quantize_blocks(fmt, blocks)


def _assert_same_bytes(name: str, w: torch.Tensor):
    fmt = get_format(name)
    want, got = _both(fmt, w)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    bad = (want != got).any(dim=1).nonzero()[:, 0]
    assert bad.numel() == 0, (
        f"{name}: {bad.numel()} of {want.shape[0]} blocks differ, first {bad[:5].tolist()}"
    )


def _adversarial(block: int) -> torch.Tensor:
    """Rows of `block`·2 weights: zeros of both signs, constant blocks, huge and tiny and
    subnormal magnitudes, exact rounding ties, repeated maxima of both signs, one spike."""
    n = 2 * block
    g = torch.Generator().manual_seed(7)
    r = torch.randn(n, generator=g)
    rows = [
        torch.zeros(n),
        torch.full((n,), -0.0),
        torch.where(torch.arange(n) % 3 == 0, -0.0, 0.0),
        torch.full((n,), 0.37),
        torch.full((n,), -2.5),
        torch.full((n,), 1e-3),
        r * 1e30,
        r * 3e37,
        r * 1e-30,
        r * 1e-40,
        r * 6e4,
        torch.where(r > 0, r.abs() + 1, -0.0),  # non-negative with -0: min is a zero
        torch.where(r > 0, -0.0, -(r.abs() + 1)),  # non-positive with -0: max is a zero
        torch.round(r * 16) / 2,  # halves: ties in every rounding
        torch.arange(n, dtype=torch.float32) % 16 - 8,  # Q4_0's grid exactly
        torch.arange(n, dtype=torch.float32) % 7 * 0.25,
        torch.where(torch.arange(n) % 2 == 0, 3.0, -3.0),  # max |x| tied between signs
        torch.where(torch.arange(n) % 17 == 5, 9.0, r * 0.01),
        torch.where(torch.arange(n) < n // 2, r, 0.0),  # one live half, one zero half
        torch.where(r.abs() < 1, r * 1e-8, r),  # two scales in one block
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("shape", [(1, 256), (5, 512), (37, 768)])
def test_random_bytes_equal_plain_torch(name, shape):
    torch.manual_seed(hash((name, shape)) % 1000)
    w = torch.randn(shape) * torch.exp(2 * torch.randn(shape[0], 1))
    _assert_same_bytes(name, w)


@pytest.mark.parametrize("name", FORMATS)
def test_adversarial_bytes_equal_plain_torch(name):
    _assert_same_bytes(name, _adversarial(256))


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_rows_into_the_same_bytes(name, threads, monkeypatch):
    """Block counts that do not divide the thread count; tiny parts so every thread works."""
    monkeypatch.setattr(kernels, "MIN_WEIGHTS_PER_THREAD", 256)
    monkeypatch.setattr(kernels, "Q4_K_CHUNK_BLOCKS", 5)  # several rounds of Q4_K's steps
    torch.manual_seed(threads)
    w = torch.randn(11, 1280)
    fmt = get_format(name)
    one = kernels.quantize_blocks(fmt, w.reshape(-1, fmt.block_size))
    torch.set_num_threads(threads)
    many = kernels.quantize_blocks(fmt, w.reshape(-1, fmt.block_size))
    assert torch.equal(one, many)
    assert torch.equal(many, fmt._quantize_blocks(w.reshape(-1, fmt.block_size)))


def test_quantize_goes_native_and_obeys_the_switch(monkeypatch):
    """`fmt.quantize` uses the kernel on CPU (bf16 input included); GREENTUNE_QUANT_COMPILE=0
    sends it to plain torch."""
    calls = []
    real = kernels.quantize_blocks
    monkeypatch.setattr(kernels, "quantize_blocks", lambda fmt, b: calls.append(fmt.name) or real(fmt, b))
    w = torch.randn(4, 512).to(torch.bfloat16)
    fmt = get_format("q4_k")
    q = fmt.quantize(w)
    assert calls == ["q4_k"] and q.shape == (4, 2 * 144)
    monkeypatch.setenv(kernels.ENV, "0")
    assert torch.equal(fmt.quantize(w), q) and calls == ["q4_k"]
    assert kernels.quantize_blocks(fmt, torch.zeros(0, 256)).shape == (0, 144)


def test_no_compiler_falls_back_to_plain_torch_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_lib", False)
    monkeypatch.setattr(kernels, "_lanes", kernels._lanes)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: must build
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    w = torch.randn(3, 256)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        for name in FORMATS:
            fmt = get_format(name)
            assert torch.equal(
                fmt.quantize(w),
                fmt._quantize_blocks(w.reshape(-1, fmt.block_size)).reshape(fmt.packed_shape(w.shape)),
            )
    assert kernels.library() is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_unknown_summation_order_keeps_kquants_in_plain_torch(monkeypatch):
    """If the probe finds no vector width reproducing torch's sums, Q4_K/Q6_K use torch."""
    monkeypatch.setattr(kernels, "_lanes", None)
    for name in ("q4_k", "q6_k"):
        fmt = get_format(name)
        monkeypatch.setattr(
            type(fmt),
            "_quantize_blocks",
            lambda self, b: torch.full((b.shape[0], self.type_size), 7, dtype=torch.uint8),
        )
        assert (kernels.quantize_blocks(fmt, torch.randn(2, 256)) == 7).all()


def test_probe_finds_this_torchs_lane_width():
    assert kernels._lanes in (4, 8, 16)


def _refuse_plain(monkeypatch):
    """Make every plain-torch quantiser raise: whatever still works went through the kernels."""

    def refuse(self, blocks):
        raise AssertionError(f"plain-torch {self.name} quantiser called")

    for name in FORMATS:
        monkeypatch.setattr(type(get_format(name)), "_quantize_blocks", refuse)


def test_streaming_loader_quantises_with_the_kernels(tmp_path, tokenizer, monkeypatch):
    from greentune.models.tiny import build_tiny_model

    build_tiny_model("llama", tmp_path, tokenizer=tokenizer, hidden=256, intermediate=512, layers=1)
    _refuse_plain(monkeypatch)
    for name in ("q4_k", "nf4"):
        model = load_quantized(tmp_path, name)
        assert model.model.layers[0].mlp.down_proj.fmt.name == name
    monkeypatch.setenv(kernels.ENV, "0")
    with pytest.raises(AssertionError, match="plain-torch"):
        load_quantized(tmp_path, "q4_k")


def test_gguf_exporter_quantises_with_the_kernels(tmp_path, tokenizer, monkeypatch):
    """q4_k_m (Q4_K + Q6_K), q4_0 (Q4_0 + Q6_K head) and q8_0 exports never reach plain torch or
    gguf.quants, and the tensor bytes gguf's reader returns are the plain-torch quantiser's."""
    import gguf.quants
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from greentune.export.gguf import export_gguf
    from greentune.models.tiny import build_tiny_model

    src = tmp_path / "model"
    build_tiny_model("llama", src, tokenizer=tokenizer, hidden=256, intermediate=512, layers=1)
    down = load_file(src / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    # layer 0 of 1 is in use_more_bits' last eighth: ffn_down is Q6_K under q4_k_m
    fmts = {"q4_k_m": ("Q6_K", "q6_k"), "q4_0": ("Q4_0", "q4_0"), "q8_0": ("Q8_0", "q8_0")}
    expected = {
        q: get_format(f)._quantize_blocks(down.reshape(-1, get_format(f).block_size)).numpy()
        for q, (_, f) in fmts.items()
    }
    _refuse_plain(monkeypatch)
    monkeypatch.setattr(
        gguf.quants, "quantize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("gguf.quants used"))
    )
    for quant, (gtype, _) in fmts.items():
        reader = GGUFReader(export_gguf(src, tmp_path / f"m-{quant}.gguf", quant).path)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert set(types.values()) >= ({"Q4_K", "Q6_K"} if quant == "q4_k_m" else {gtype})
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
        assert t.tensor_type.name == gtype
        assert np.array_equal(np.asarray(t.data).reshape(-1), expected[quant].reshape(-1))
