"""Families that do not train or export yet are refused in one line before any work."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
import yaml

from greentune.cli import main
from greentune.models.support import NOT_YET, TRAINED

import rows

NOT_YET_CONFIGS = {
    "deepseek_v3": tf.DeepseekV3Config, "glm4_moe": tf.Glm4MoeConfig, "gpt_oss": tf.GptOssConfig,
    "granitemoe": tf.GraniteMoeConfig, "phimoe": tf.PhimoeConfig, "ernie4_5_moe": tf.Ernie4_5_MoeConfig,
    "qwen3_next": tf.Qwen3NextConfig,
}


def _tiny(cls, out, tokenizer, kv_heads=4, **extra):
    cfg = cls(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=kv_heads, intermediate_size=64, pad_token_id=tokenizer.pad_token_id,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _recipe(tmp_path, base, data, export=()):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(base), "data": {"train": str(data)},
                                    "train": {"steps": 2}, "export": list(export)}))
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("greentune: error: ") and "\n" not in err, err
    return err


def test_the_matrix_and_the_trained_list_agree():
    assert {r.model_type for r in rows.ROWS} == set(TRAINED)
    assert not set(TRAINED) & set(NOT_YET)


@pytest.mark.parametrize("model_type", sorted(NOT_YET_CONFIGS))
def test_unsupported_family_is_one_line_at_train_time(tmp_path, capsys, tokenizer, small_data, model_type):
    base = _tiny(NOT_YET_CONFIGS[model_type], tmp_path / model_type, tokenizer)
    run = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, base, small_data[0])), "--run-dir", str(run)]) == 2
    err = _one_line(capsys)
    assert f"cannot train model type {model_type!r} yet" in err and "supported: llama, mistral" in err
    assert not run.exists()                      # refused before the run dir was touched


def test_export_refused_by_the_family_table_fails_before_training(tmp_path, capsys, tokenizer, small_data):
    """phi3 trains, but its GGUF does not load in llama.cpp yet: a recipe exporting it stops at once."""
    base = _tiny(tf.Phi3Config, tmp_path / "phi3", tokenizer)
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, base, small_data[0], export=[{"format": "gguf", "quant": "q8_0"}])
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 2
    err = _one_line(capsys)
    assert "GGUF export supports model types" in err and "'qwen3_moe'" in err and "'phi3'" in err
    assert not run.exists()
    # the same line from `greentune export` on the model folder
    assert main(["export", str(base), "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "x")]) == 2
    assert "GGUF export supports model types" in _one_line(capsys)
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())


def test_olmoe_with_grouped_kv_heads_is_refused_for_gguf_in_one_line(tmp_path, capsys, tokenizer):
    base = _tiny(tf.OlmoeConfig, tmp_path / "olmoe", tokenizer, kv_heads=2, num_experts=4, num_experts_per_tok=2)
    assert main(["export", str(base), "--format", "gguf", "--quant", "f32", "--out", str(tmp_path / "x")]) == 2
    assert "num_key_value_heads == num_attention_heads" in _one_line(capsys)
