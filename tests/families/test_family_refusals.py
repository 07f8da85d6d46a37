"""Exports a trained family cannot have are refused in one line at `greentune train`, before any work.

PhiMoE's GGUF (llama.cpp's phimoe graph is another model) and the hybrids' GGUF (their
delta-net layers) are refused from the config alone, with the line `greentune export` gives.
"""

from __future__ import annotations

import pytest
import transformers as tf
from test_family_support import _config_only, _one_line, _recipe

from greentune.cli import main

CASES = [
    (tf.PhimoeConfig, "gguf", "llama.cpp runs phimoe on its phi3 graph"),
    (tf.Qwen3NextConfig, "gguf", "GGUF export of qwen3_next: its gated delta-net"),
    (tf.Qwen3_5MoeTextConfig, "gguf", "GGUF export of qwen3_5_moe_text: its gated delta-net"),
]


@pytest.mark.parametrize("cls, fmt, line", CASES, ids=[f"{c[0].model_type}-{c[1]}" for c in CASES])
def test_an_export_the_family_cannot_do_is_one_line_before_training(
    tmp_path, capsys, tokenizer, small_data, cls, fmt, line
):
    base = _config_only(cls, tmp_path / cls.model_type, tokenizer)
    run = tmp_path / "run"
    quant = {"gguf": "q8_0", "mlx": "4bit"}[fmt]
    recipe = _recipe(tmp_path, base, small_data[0], export=[{"format": fmt, "quant": quant}])
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 2
    assert line in _one_line(capsys)
    assert not run.exists()
    out = tmp_path / "x"
    assert main(["export", str(base), "--format", fmt, "--quant", quant, "--out", str(out)]) == 2
    assert line in _one_line(capsys)
    assert not out.exists() or not list(out.iterdir())
