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
    fp32_bytes = os.path.getsize(d / "model.safetensors")             # ~56 MB
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(PROBE), str(d), "q4_k", str(tiny_llama_dir)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])

    # 4 layers × (4 attention 512² + 3 MLP 512×1536) in Q4_K (4.5 bits/weight), the token
    # embedding 256×512 in Q4_K and lm_head in Q6_K (6.5625 bits/weight), as llama.cpp's Q4_K_M.
    assert m["modules"] == 28 + 2 and m["formats"] == ["q4_k", "q6_k"]
    assert m["quantised_params"] == 4 * (4 * 512 * 512 + 3 * 512 * 1536) + 2 * 256 * 512
    assert m["packed"] * 8 == m["expected_bits"] == 4.5 * (m["quantised_params"] - 256 * 512) + 6.5625 * 256 * 512
    weights = m["packed"] + m["dense_bytes"]                              # + norms
    assert fp32_bytes > 6 * weights

    # The loaded model holds its packed bytes, nothing more (within 5 % / 1 MB).
    held = m["after"] - m["freed"]
    assert abs(held - weights) < 0.05 * weights + 1 * MB, (held / MB, weights / MB)
    # Peak while loading: quantised model + the largest tensor + a few MB of work space,
    # nowhere near the fp32 checkpoint.
    peak = m["peak"] - m["base"]
    assert peak < weights + m["largest_fp32"] + 12 * MB, (peak / MB, weights / MB)
    assert peak < 0.4 * fp32_bytes
