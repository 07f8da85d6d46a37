import pytest
import torch

from greentune.energy.components import Component
from greentune.energy.meter import Meter
from greentune.energy.savings import measure_full_finetune, save_savings, savings_table


class TinyLM(torch.nn.Module):
    """A causal-LM-shaped module: model(input_ids=, labels=).loss."""

    def __init__(self, vocab=32, dim=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.out = torch.nn.Linear(dim, vocab)
        self.emb.weight.requires_grad_(False)  # frozen like a LoRA base: the probe unfreezes it

    def forward(self, input_ids, labels):
        from types import SimpleNamespace

        logits = self.out(self.emb(input_ids))
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


class Fixed(Component):
    """2 J per read after the first: a deterministic counter."""

    name, source = "cpu", "rapl"

    def __init__(self):
        self.j = 0.0

    def read(self):
        self.j += 2.0
        return self.j


def test_measure_full_finetune_counts_tokens_and_trains_everything():
    ids = torch.randint(0, 32, (2, 8))
    meter = Meter([Fixed()], poll_interval_s=0, sync=None)
    models = []

    def factory():
        models.append(TinyLM())
        return models[-1]

    full = measure_full_finetune(factory, {"input_ids": ids, "labels": ids}, steps=4, meter=meter)
    assert full["method"] == "full fine-tune estimated from 4 measured steps"
    assert full["tokens_per_step"] == 16 and full["steps"] == 4
    assert full["j_per_token"] == pytest.approx(2.0 / 64)  # one window: 2 J over 4 × 16 tokens
    assert full["s_per_token"] > 0 and full["peak_mem_bytes"] > 0
    assert full["trainable_params"] == 32 * 16 + 16 * 32 + 32
    assert full["source"] == {"cpu": "rapl"} and full["estimate"] is False
    assert models[0].emb.weight.requires_grad  # the frozen base was unfrozen


def test_savings_table_and_file(tmp_path):
    full = {
        "j_per_token": 2.0,
        "s_per_token": 0.01,
        "peak_mem_bytes": 4000,
        "peak_mem_kind": "x",
        "method": "full fine-tune estimated from 5 measured steps",
        "estimate": True,
    }
    rows = savings_table(
        run_tokens=1_800_000, run_joules=0.9e6, run_seconds=9000.0, full=full, run_peak_mem_bytes=1000
    )
    energy, time_, mem = rows
    assert energy["full_fine_tune"] == pytest.approx(1.0)  # 2 J × 1.8 M tokens = 3.6 MJ = 1 kWh
    assert energy["this_run"] == pytest.approx(0.25)
    assert energy["saved_pct"] == pytest.approx(75.0)
    assert energy["estimate"] is True and energy["method"] == full["method"]
    assert time_["full_fine_tune"] == pytest.approx(18000.0) and time_["saved_pct"] == pytest.approx(50.0)
    assert mem["saved"] == 3000.0 and mem["unit"] == "bytes"
    path = save_savings(tmp_path, full, rows)
    import json

    assert json.loads(path.read_text())["rows"][0]["quantity"] == "energy"


def test_probe_on_a_tiny_hf_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 500, (2, 16))
    full = measure_full_finetune(
        lambda: AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        {"input_ids": ids, "labels": ids.clone()},
        steps=2,
        meter=Meter([Fixed()], poll_interval_s=0, sync=None),
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert full["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert full["j_per_token"] == pytest.approx(2.0 / 64) and full["tokens_per_step"] == 32
