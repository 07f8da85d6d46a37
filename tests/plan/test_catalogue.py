"""The model catalogue: derived parameter counts agree with the publishers' figures."""

from __future__ import annotations

import pytest

from greentune.errors import UserError
from greentune.models import tiny
from greentune.plan.catalogue import find_model, list_models_table, model_facts, models

REQUIRED = [
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "mistral-7b",
    "mixtral-8x7b",
    "mixtral-8x22b",
    "qwen2.5-7b",
    "qwen3-8b",
    "qwen3-30b-a3b",
    "qwen1.5-moe-a2.7b",
    "olmoe-1b-7b",
    "deepseek-moe-16b",
    "deepseek-v3",
    "glm-4.5-air",
    "granite-3.1-3b-a800m",  # issue 17
    "phi-3.5-moe",
    "qwen3.5-35b-a3b",
    "ernie-4.5-21b-a3b",
]


def test_required_models_present_with_licence_and_source():
    names = {m.name for m in models()}
    assert set(REQUIRED) <= names
    for m in models():
        assert m.licence and m.source.startswith("https://huggingface.co/") and m.hf in m.source


def _close(value: float, published: float, rel: float = 0.02) -> bool:
    return abs(value - published) <= rel * published


@pytest.mark.parametrize("row", models(), ids=lambda m: m.name)
def test_counts_match_published_figures(row):
    f = row.facts()
    assert _close(f.total_params / 1e9, row.params_b)
    if row.active_b is not None:
        assert f.is_moe
        no_input_embedding = (f.active_params - f.vocab * f.hidden) / 1e9  # DeepSeek's convention
        no_embeddings = (f.active_params - f.embedding_params) / 1e9  # Z.ai's (GLM-4.5): nor the output
        counts = (f.active_params / 1e9, no_input_embedding, no_embeddings)
        if row.active_rounding_b:  # a rounded figure: some convention must round to it
            assert any(abs(c - row.active_b) <= row.active_rounding_b / 2 for c in counts), counts
        else:
            assert (
                _close(counts[0], row.active_b)
                or _close(no_input_embedding, row.active_b, 0.025)
                or _close(no_embeddings, row.active_b, 0.025)
            ), counts


def test_find_model_by_name_alias_hub_id_and_prefix():
    assert find_model("Mixtral 8x7B").name == "mixtral-8x7b"
    assert find_model("mistralai/Mixtral-8x7B-v0.1").name == "mixtral-8x7b"
    assert find_model("OLMoE").name == "olmoe-1b-7b"
    assert find_model("no-such-model") is None
    with pytest.raises(UserError, match="ambiguous: qwen2.5-7b, qwen2.5-72b"):
        find_model("qwen2.5-7")


def test_model_facts_from_a_folder_and_errors(tmp_path):
    tiny.build_tiny_model("llama", tmp_path, vocab_size=300)
    f, label = model_facts(tmp_path)
    assert f.model_type == "llama" and label == str(tmp_path)
    with pytest.raises(UserError, match="not in the catalogue"):
        model_facts("gpt-17")


def test_list_models_table_has_every_row():
    table = list_models_table()
    for m in models():
        assert m.name in table and m.hf in table
    assert "46.7B" in table and "12.9B" in table
