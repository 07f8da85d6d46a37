"""ReLoRA: merges keep the function, pruning touches only LoRA moments, resume across a merge is exact."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from greentune.adapters.lora import LoRALinear, apply_lora
from greentune.adapters.relora import ReLoRA, lora_parameters, merge_and_restart_, prune_adam_moments_
from greentune.models.loader import load_model
from greentune.recipe import ReloraConfig


def _randomise(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)


def test_merge_and_restart_keeps_the_output_in_fp32(tiny_llama_dir):
    model = load_model(tiny_llama_dir).eval()
    apply_lora(model, ["attn", "mlp"], rank=4, alpha=8)
    _randomise(model)
    ids = torch.randint(0, 500, (2, 16))
    before = model(input_ids=ids).logits
    assert merge_and_restart_(model) == 14
    after = model(input_ids=ids).logits
    assert (before - after).abs().max().item() < 1e-5
    for m in model.modules():
        if isinstance(m, LoRALinear):
            assert torch.count_nonzero(m.lora_B) == 0 and m.lora_A.abs().sum() > 0


def test_merge_into_a_quantised_base_changes_the_output_within_the_formats_error(tiny_llama_dir):
    from greentune.quant import quantize_model_

    ids = torch.randint(0, 500, (2, 16))
    fp32 = load_model(tiny_llama_dir).eval()
    model = load_model(tiny_llama_dir).eval()
    quantize_model_(model, "q8_0")
    quant_error = (fp32(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    apply_lora(model, ["attn", "mlp"], rank=4, alpha=8)
    _randomise(model)
    before = model(input_ids=ids).logits
    merge_and_restart_(model)
    change = (model(input_ids=ids).logits - before).abs().max().item()
    assert 0 < change <= 2 * quant_error, (change, quant_error)


def test_prune_zeroes_the_stated_fraction_of_lora_moments_only(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    apply_lora(model, ["attn"], rank=4, alpha=8)
    model.model.norm.weight.requires_grad_(True)  # a trainable non-LoRA parameter
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, 500, (2, 16))
    _randomise(model)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    norm_state = {k: v.clone() for k, v in opt.state[model.model.norm.weight].items()}
    lora = lora_parameters(model)
    total = sum(p.numel() for p in lora)
    original = {p: opt.state[p]["exp_avg"].clone() for p in lora}
    zeroed = prune_adam_moments_(opt, lora, 0.9)
    assert abs(zeroed - 0.9 * total) <= len(lora)  # per-tensor rounding of k
    for p in lora:
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        assert torch.equal(m == 0, v == 0)  # one mask for both moments
        kept, dropped = original[p][m != 0].abs(), original[p][m == 0].abs()
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()  # the largest-magnitude entries survive
    for k, v in opt.state[model.model.norm.weight].items():
        assert torch.equal(v, norm_state[k])


def test_lr_factor_is_jagged(tiny_llama_dir):
    hook = ReLoRA(
        torch.nn.Linear(2, 2), ReloraConfig(merge_every=10, optimizer_prune=0.9, restart_warmup=4), 100
    )
    assert [hook.lr_factor(s) for s in (9, 10, 11, 12, 14, 20)] == [1.0, 0.0, 0.25, 0.5, 1.0, 0.0]


def _train(recipe, run_dir, *extra, env=None):
    import os

    cmd = [
        sys.executable,
        "-m",
        "greentune",
        "train",
        str(recipe),
        "--run-dir",
        str(run_dir),
        "--quiet",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.parametrize("quant_base", ["none", "q8_0"])
def test_resume_across_a_merge_is_bit_identical_and_merges_are_ledger_phases(
    tmp_path, tiny_llama_dir, text_jsonl, quant_base
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_llama_dir),
                "data": {"train": str(text_jsonl), "max_seq_len": 64},
                "method": {
                    "quant_base": quant_base,
                    "lora": {"rank": 4, "alpha": 8},
                    "relora": {"merge_every": 4, "optimizer_prune": 0.9, "restart_warmup": 2},
                },
                "train": {"steps": 12, "batch_size": 4, "lr": 2e-3, "warmup": 2, "checkpoint_every": 6},
                "energy": {"measure_savings": False},
            }
        )
    )
    ref = _train(recipe, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    # killed while writing the step-12 checkpoint: resumes from step 6 (after the merge at 4, before the one
    # at 8)
    r = _train(recipe, tmp_path / "run", env={"GREENTUNE_FAULT": "checkpoint-write:12"})
    assert r.returncode == -9
    r = _train(recipe, tmp_path / "run", "--resume")
    assert r.returncode == 0, r.stderr
    a = load_file(str(tmp_path / "ref" / "merged" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "merged" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    phases = [
        json.loads(line)["phase"] for line in (tmp_path / "ref" / "ledger.jsonl").read_text().splitlines()
    ]
    assert phases.count("merge") == 2 + 1  # two ReLoRA merges (steps 4 and 8) + the final merge
    metrics = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "relora_merge" in m] == [4, 8]
    assert metrics[4]["lr"] == 0.0  # 0-based step 4 is the first after the merge
