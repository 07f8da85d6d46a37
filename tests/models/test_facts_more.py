"""Architecture facts of the issue-17 families against the models transformers builds from their configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import transformers as tf

from greentune.models.facts import arch_facts

sys.path.insert(0, str(Path(__file__).parent.parent / "families"))
import rows  # noqa: E402

NEW = ["granitemoe", "phimoe", "ernie4_5_moe", "qwen3_next", "qwen3_5_moe_text"]
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("model_type", NEW)
def test_total_active_and_expert_params_match_the_real_model(model_type):
    cfg = rows.BY_TYPE[model_type].make(600, IDS, 64, 32)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())
    experts = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
    )
    for given in (cfg, cfg.to_dict()):  # a PretrainedConfig and its config.json dict
        f = arch_facts(given)
        assert f.total_params == real
        assert f.expert_params == experts
        assert f.active_params == real - experts // 2  # 2 of 4 experts run
    moe_layers = sum(1 for n, _ in model.named_parameters() if n.endswith("experts.down_proj"))
    assert arch_facts(cfg).moe_layers == moe_layers


def test_hybrid_linear_layers_attend_to_no_past_keys():
    f = arch_facts(rows.BY_TYPE["qwen3_next"].make(600, IDS, 64, 32))
    assert (f.layers, f.linear_layers) == (4, 3)
    per_key = 2 * f.heads * (f.head_dim + f.v_head_dim)
    assert f.attention_flops_per_token(9) == per_key * 1 * 5.0  # one full layer, (9 + 1) / 2 keys
