"""QLoRA + ReLoRA through the pipeline, and "train on what you ship": the GGUF holds the
training bytes of the quantised base, byte for byte."""

import json

import numpy as np
import pytest
import yaml
from safetensors import safe_open


def _run(tmp_path, base, data, quant, targets, moe=None, steps=16):
    from greentune.pipeline import train

    recipe = {
        "base_model": str(base),
        "data": {"train": str(data), "max_seq_len": 64},
        "method": {
            "quant_base": quant,
            "lora": {"rank": 8, "alpha": 16, "targets": targets},
            "relora": {"merge_every": 6, "optimizer_prune": 0.9, "restart_warmup": 2},
        },
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-2, "warmup": 2, "checkpoint_every": steps},
        "energy": {"measure_savings": False},
        "export": [{"format": "gguf", "quant": {"q8_0": "q8_0", "q4_k": "q4_k_m", "q4_0": "q4_0"}[quant]}],
    }
    if moe:
        recipe["moe"] = moe
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = train(path, run_dir=tmp_path / "run", progress=False)
    return result, tmp_path / "run"


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_ships_training_bytes(run, quant):
    from gguf import GGUFReader

    gguf_path = next((run / "export").glob("*.gguf"))
    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    with safe_open(str(run / "trained-base.safetensors"), "pt") as f:
        trained = f.get_tensor("model.layers.1.mlp.down_proj.weight").numpy()
        assert f.metadata()["model.layers.1.mlp.down_proj.weight"] == quant.upper()
    written = np.asarray(tensors["blk.1.ffn_down.weight"].data).view(np.uint8).reshape(trained.shape)
    assert np.array_equal(written, trained)


@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_qlora_relora_dense_lowers_loss_and_ships_the_training_bytes(
    tmp_path, pretrained_llama_dir, code_jsonl, quant
):
    result, run = _run(tmp_path, pretrained_llama_dir, code_jsonl, quant, ["attn", "mlp"])
    losses = _losses(run)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    phases = [json.loads(line)["phase"] for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert phases.count("merge") == 2 + 1 and "quantise" in phases and "export" in phases
    _assert_ships_training_bytes(run, quant)


def test_q4_k_base_ships_its_training_bytes_in_q4_k_m(tmp_path, tokenizer, text_jsonl):
    """Q4_K needs rows of 256: a model with hidden 256 and intermediate 512."""
    from greentune.models.tiny import build_tiny_model

    base = tmp_path / "wide"
    build_tiny_model("llama", base, tokenizer=tokenizer, hidden=256, intermediate=512, heads=4, kv_heads=2)
    _, run = _run(tmp_path, base, text_jsonl, "q4_k", ["attn", "mlp"], steps=6)
    _assert_ships_training_bytes(run, "q4_k")


def test_qlora_relora_moe_lowers_loss(tmp_path, tiny_mixtral_dir, text_jsonl):
    result, run = _run(
        tmp_path,
        tiny_mixtral_dir,
        text_jsonl,
        "q8_0",
        ["attn", "experts"],
        moe={"aux_loss_coef": 0.01},
        steps=16,
    )
    losses = _losses(run)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(next((run / "export").glob("*.gguf"))).tensors}
    assert "blk.0.ffn_gate_exps.weight" in names
