"""Memory is real: measured in a fresh process (psutil RSS / ru_maxrss) while streaming a model
whose fp32 checkpoint is ~6.5× its Q4_K size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from greentune.models.tiny import build_tiny_model

PROBE = Path(__file__).with_name("_memory_probe.py")
MB = 1 << 20


def test_streaming_load_peak_and_resident_memory(tmp_path, tiny_llama_dir):
    d = tmp_path / "llama"
    build_tiny_model("llama", d, vocab_size=256, hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=8)
    fp32_bytes = os.path.getsize(d / "model.safetensors")  # ~56 MB
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(PROBE), str(d), "q4_k", str(tiny_llama_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])

    # 4 layers × (4 attention 512² + 3 MLP 512×1536) in Q4_K (4.5 bits/weight), the token
    # embedding 256×512 in Q4_K and lm_head in Q6_K (6.5625 bits/weight), as llama.cpp's Q4_K_M.
    assert m["modules"] == 28 + 2 and m["formats"] == ["q4_k", "q6_k"]
    assert m["quantised_params"] == 4 * (4 * 512 * 512 + 3 * 512 * 1536) + 2 * 256 * 512
    assert (
        m["packed"] * 8
        == m["expected_bits"]
        == 4.5 * (m["quantised_params"] - 256 * 512) + 6.5625 * 256 * 512
    )
    weights = m["packed"] + m["dense_bytes"]  # + norms
    assert fp32_bytes > 6 * weights

    # The loaded model holds its packed bytes, nothing more (within 5 % / 1 MB).
    held = m["after"] - m["freed"]
    assert abs(held - weights) < 0.05 * weights + 1 * MB, (held / MB, weights / MB)
    # Peak while loading: quantised model + the largest tensor + a few MB of work space,
    # nowhere near the fp32 checkpoint.
    peak = m["peak"] - m["base"]
    assert peak < weights + m["largest_fp32"] + 12 * MB, (peak / MB, weights / MB)
    assert peak < 0.4 * fp32_bytes


_HEAP_PROBE = r"""
import json, sys
import psutil, torch
from greentune.heap import limit_heap_retention
if sys.argv[1] == "1":
    assert limit_heap_retention()
rss = lambda: psutil.Process().memory_info().rss
torch.empty(16 << 20, dtype=torch.uint8).fill_(1)     # freed: glibc's dynamic threshold rises to 16 MB
a = torch.ones(4 << 20)                               # 16 MB, touched
pin = torch.ones(1000)                                # a small live block above it in the heap
before = rss()
del a
print(json.dumps({"returned": before - rss()}))
"""


def _freed_bytes_returned(fixed: bool) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE, "1" if fixed else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["returned"]


def test_limit_heap_retention_returns_freed_tensors_to_the_os():
    """glibc's dynamic mmap threshold keeps a freed 16 MB tensor in the heap (resident); with the
    threshold fixed at 1 MB (as `load_quantized` does) it is unmapped when freed."""
    assert _freed_bytes_returned(fixed=True) > 15 * MB
    assert _freed_bytes_returned(fixed=False) < 4 * MB


def test_limit_heap_retention_respects_the_users_setting(monkeypatch):
    from greentune.heap import limit_heap_retention

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 22))
    assert limit_heap_retention() is False


def test_empty_quantized_module_touches_no_pages():
    """A streaming load's empty modules are uninitialised storage: memory becomes resident only
    as tensors are loaded into it."""
    import psutil
    import torch

    from greentune.quant import get_format
    from greentune.quant.replace import Target, empty_quantized_module

    fmt = get_format("q4_k")
    rss = psutil.Process().memory_info().rss
    t = Target("big", "weight", "linear", (16384, 8192), fmt, bias=True)  # 75 MB packed
    m = empty_quantized_module(t)
    e = empty_quantized_module(Target("emb", "weight", "embedding", (16384, 8192), fmt))
    grown = psutil.Process().memory_info().rss - rss
    assert m.qweight.shape == fmt.packed_shape((16384, 8192)) and m.qweight.device.type == "cpu"
    assert e.qweight.shape == m.qweight.shape and not m.qweight.is_meta
    assert torch.equal(m.bias, torch.zeros(16384)) and not m.bias.requires_grad
    assert grown < 20 * MB, grown / MB
