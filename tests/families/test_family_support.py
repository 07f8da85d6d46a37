"""Families that do not train or export yet are refused in one line before any work.

The not-yet families are given as their transformers config (their own config class,
saved as config.json) beside a placeholder safetensors file: the refusal comes from the
config alone, before any weight is read, which is the point.
"""

from __future__ import annotations

import pytest
import rows
import torch
import transformers as tf
import yaml
from safetensors.torch import save_file

from greentune.cli import main
from greentune.models.support import NOT_YET, TRAINED

NOT_YET_CONFIGS = {
    "qwen3_5_moe": tf.Qwen3_5MoeConfig,
}


def _config_only(cls, out, tokenizer):
    cls().save_pretrained(out)
    save_file({"placeholder": torch.zeros(1)}, str(out / "model.safetensors"))
    tokenizer.save_pretrained(out)
    return out


def _tiny(cls, out, tokenizer, kv_heads=4, **extra):
    cfg = cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _recipe(tmp_path, base, data, export=()):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "data": {"train": str(data)},
                "train": {"steps": 2},
                "export": list(export),
            }
        )
    )
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
    base = _config_only(NOT_YET_CONFIGS[model_type], tmp_path / model_type, tokenizer)
    run = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, base, small_data[0])), "--run-dir", str(run)]) == 2
    err = _one_line(capsys)
    assert f"cannot train model type {model_type!r} yet" in err and "supported: llama, mistral" in err
    assert not run.exists()  # refused before the run dir was touched


def test_export_without_a_gguf_mapping_is_one_line(tmp_path, capsys, tokenizer):
    base = _config_only(tf.GPT2Config, tmp_path / "gpt2", tokenizer)
    out = tmp_path / "x"
    assert main(["export", str(base), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert (
        "GGUF export supports model types" in err and "'qwen3_moe'" in err and "this model is 'gpt2'" in err
    )
    assert not out.exists() or not list(out.iterdir())


def test_an_export_the_family_cannot_do_fails_before_training(tmp_path, capsys, tokenizer, small_data):
    """OLMoE with grouped KV heads trains, but llama.cpp's olmoe graph cannot run it: a recipe
    exporting it to GGUF stops at once, with the line `greentune export` gives."""
    base = _tiny(
        tf.OlmoeConfig, tmp_path / "olmoe", tokenizer, kv_heads=2, num_experts=4, num_experts_per_tok=2
    )
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, base, small_data[0], export=[{"format": "gguf", "quant": "q8_0"}])
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 2
    assert "num_key_value_heads == num_attention_heads" in _one_line(capsys)
    assert not run.exists()
    assert (
        main(["export", str(base), "--format", "gguf", "--quant", "f32", "--out", str(tmp_path / "x")]) == 2
    )
    assert "num_key_value_heads == num_attention_heads" in _one_line(capsys)
