"""Exports a trained family cannot have are refused in one line at `greentune train`, before any work.

PhiMoE's GGUF (llama.cpp's phimoe graph is another model) is refused from the config alone,
with the line `greentune export` gives. A hybrid whose layer pattern llama.cpp cannot read is
refused for GGUF the same way.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from test_family_support import _config_only, _one_line, _recipe

from greentune.cli import main

CASES = [
    (tf.PhimoeConfig, "gguf", "llama.cpp runs phimoe on its phi3 graph"),
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


def test_a_hybrid_layer_pattern_llama_cpp_does_not_read_is_one_line(tmp_path, capsys, tokenizer, small_data):
    from safetensors.torch import save_file

    base = tmp_path / "qwen3_next"
    layers = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    tf.Qwen3NextConfig(num_hidden_layers=4, layer_types=layers).save_pretrained(base)
    save_file({"placeholder": torch.zeros(1)}, str(base / "model.safetensors"))
    tokenizer.save_pretrained(base)
    recipe = _recipe(tmp_path, base, small_data[0], export=[{"format": "gguf", "quant": "q8_0"}])
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    assert "not one full-attention layer every 2 (full_attention_interval)" in _one_line(capsys)
    assert not (tmp_path / "run").exists()
