"""The MoE path through the pipeline: upcycle a dense base, train attention + expert LoRA and
the router, and check that PEFT and plain transformers reproduce the result."""

import json

import torch
import yaml


def test_upcycle_then_expert_lora_round_trips_through_peft(tmp_path, tiny_llama_dir, text_jsonl):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    from greentune.pipeline import train

    recipe = tmp_path / "moe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_llama_dir),
                "data": {"train": str(text_jsonl), "max_seq_len": 64},
                "method": {"lora": {"rank": 4, "alpha": 8, "targets": ["attn", "experts"]}},
                "moe": {"upcycle": {"experts": 4, "top_k": 2}, "aux_loss_coef": 0.01, "router": "full"},
                "train": {"steps": 6, "batch_size": 4, "lr": 5e-3, "warmup": 1, "checkpoint_every": 6},
                "energy": {"measure_savings": False},
            }
        )
    )
    run = tmp_path / "run"
    train(recipe, run_dir=run, progress=False)

    phases = [json.loads(line)["phase"] for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert phases[0] == "upcycle" and "train" in phases
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(last["expert_use"]["0"]) == 4 and abs(sum(last["expert_use"]["0"]) - 1) < 1e-4
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["modules_to_save"] == ["mlp.gate"]

    ids = torch.randint(0, 500, (2, 20))
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    assert isinstance(merged, MixtralForCausalLM)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(run / "upcycled"), run / "adapter"
    ).eval()
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, peft(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-4
    # and training changed something
    base = AutoModelForCausalLM.from_pretrained(run / "upcycled").eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - a).abs().max().item() > 1e-4
