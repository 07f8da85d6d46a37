"""gpt-oss with MXFP4 experts, as the Hub ships it: a tiny checkpoint saved in that layout
(`*_blocks` / `*_scales`, quantization_config mxfp4) loads without unpickling or a float copy
of the experts, trains with `quant_base: mxfp4` (LoRA on attention and experts, ReLoRA merge
into the MXFP4 experts), and `greentune export --quant mxfp4` writes the experts' training
bytes unchanged into a GGUF that llama.cpp runs as PyTorch runs the GGUF's own weights."""

from __future__ import annotations

import json
import shutil

import gguf_inverse
import numpy as np
import pytest
import torch
from rows import BY_TYPE
from test_family_matrix import _compare, _export, _train

pytest.importorskip("xllamacpp", reason="llama.cpp binding (pip install xllamacpp, in the test extra)")

ROW = BY_TYPE["gpt_oss"]


def hub_mxfp4_checkpoint(src, dst):
    """`src` (a float gpt-oss folder) saved as the Hub does: experts in MXFP4 blocks/scales."""
    from safetensors.torch import load_file, save_file

    from greentune.quant.formats import get_format
    from greentune.quant.mxfp4 import ggml_to_hub

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    for name in [n for n in sd if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        packed = get_format("mxfp4").quantize(sd.pop(name).transpose(1, 2))  # [E, out, in/32·17]
        sd[f"{name}_blocks"], sd[f"{name}_scales"] = ggml_to_hub(packed)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "lm_head"],
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def hub_dir(family_base, tmp_path_factory):
    return hub_mxfp4_checkpoint(family_base("gpt_oss"), tmp_path_factory.mktemp("gpt-oss-hub") / "m")


def test_hub_checkpoint_loads_its_bytes_as_they_are(hub_dir, monkeypatch):
    from safetensors.torch import load_file

    from greentune.quant.loading import load_quantized
    from greentune.quant.mxfp4 import MXFP4, hub_to_ggml

    hub = load_file(hub_dir / "model.safetensors")

    def no_float(*a, **k):  # the mxfp4 path never dequantises an expert
        raise AssertionError("dequantised while loading")

    monkeypatch.setattr(MXFP4, "_dequantize_blocks", no_float)
    model = load_quantized(hub_dir, "mxfp4")
    assert not hasattr(model.config, "quantization_config")
    for i in range(2):
        for w in ("gate_up_proj", "down_proj"):
            store = getattr(model.model.layers[i].mlp.experts, w)
            name = f"model.layers.{i}.mlp.experts.{w}"
            assert store.fmt.name == "mxfp4"
            assert torch.equal(store.qweight, hub_to_ggml(hub[f"{name}_blocks"], hub[f"{name}_scales"]))
    assert model.model.layers[0].self_attn.q_proj.fmt.name == "q8_0"


def test_hub_checkpoint_without_quant_base_is_one_line(hub_dir, tmp_path, small_data, capsys):
    import yaml

    from greentune.cli import main

    recipe = {
        "base_model": str(hub_dir),
        "data": {"train": str(small_data[0]), "max_seq_len": 32},
        "method": {"quant_base": "none", "lora": {"rank": 4, "targets": ["attn", "experts"]}},
        "train": {"steps": 1, "batch_size": 2},
        "energy": {"measure_savings": False},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "ships its experts in MXFP4" in err and "quant_base: mxfp4" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hub", "fp32"])
def test_mxfp4_base_trains_and_ships_its_expert_bytes(
    source, hub_dir, family_base, tmp_path, small_data, banned
):
    from gguf import GGUFReader
    from safetensors import safe_open

    base = hub_dir if source == "hub" else family_base("gpt_oss")
    run = _train(tmp_path, base, small_data, ROW, "mxfp4", steps=4, relora=True)
    phases = [json.loads(line)["phase"] for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert phases.count("merge") >= 2, phases
    assert "quantization_config" not in json.loads((run / "merged" / "config.json").read_text())
    path = _export(run, "gguf", "mxfp4", tmp_path / "x") / "model-mxfp4.gguf"
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    with safe_open(str(run / "trained-base.safetensors"), "pt") as f:
        name = "model.layers.1.mlp.experts.gate_up_proj"
        assert f.metadata()[name] == "MXFP4"
        trained = f.get_tensor(name).numpy()  # [E, 2I (gate/up interleaved), H/32·17]
        attn = f.get_tensor("model.layers.1.self_attn.o_proj.weight").numpy()
    for gname, rows in (
        ("blk.1.ffn_gate_exps.weight", slice(0, None, 2)),
        ("blk.1.ffn_up_exps.weight", slice(1, None, 2)),
    ):
        t = tensors[gname]
        assert t.tensor_type.name == "MXFP4"
        written = np.asarray(t.data).view(np.uint8).reshape(trained[:, rows].shape)
        assert np.array_equal(written, trained[:, rows])
    assert tensors["blk.1.attn_output.weight"].tensor_type.name == "Q8_0"
    assert np.array_equal(
        np.asarray(tensors["blk.1.attn_output.weight"].data).view(np.uint8).reshape(attn.shape), attn
    )
    _compare(
        path,
        gguf_inverse.hf_model_from_gguf(path, run / "merged", ROW),
        banned,
        ROW,
        ROW.q_atol,
        quantised=True,
    )


def test_hub_checkpoint_into_another_block_format_goes_expert_by_expert(hub_dir):
    from safetensors.torch import load_file

    from greentune.quant.formats import get_format
    from greentune.quant.loading import load_quantized
    from greentune.quant.mxfp4 import hub_to_ggml

    hub = load_file(hub_dir / "model.safetensors")
    model = load_quantized(hub_dir, "q4_k")
    store = model.model.layers[1].mlp.experts.down_proj
    name = "model.layers.1.mlp.experts.down_proj"
    floats = get_format("mxfp4").dequantize(
        hub_to_ggml(hub[f"{name}_blocks"], hub[f"{name}_scales"]), store.shape
    )
    assert store.fmt.name == "q4_k"
    assert torch.equal(store.qweight, get_format("q4_k").quantize(floats))


def test_hub_checkpoint_exports_directly_with_its_own_expert_values(hub_dir, tmp_path):
    """`greentune export` of the Hub folder itself (no training): the experts read as the floats
    their MXFP4 pairs encode; `--quant mxfp4` holds exactly those values."""
    import helpers
    from safetensors.torch import load_file

    from greentune.cli import main
    from greentune.quant.formats import get_format
    from greentune.quant.mxfp4 import hub_to_ggml

    out = tmp_path / "x"
    assert main(["export", str(hub_dir), "--format", "gguf", "--quant", "mxfp4", "--out", str(out)]) == 0
    _, t, types = helpers.read_gguf(out / "model-mxfp4.gguf")
    assert types["blk.0.ffn_up_exps.weight"] == "MXFP4" and types["blk.0.attn_q.weight"] == "Q8_0"
    hub = load_file(hub_dir / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    packed = hub_to_ggml(hub[f"{name}_blocks"], hub[f"{name}_scales"])
    floats = get_format("mxfp4").dequantize(packed, (4, 512, 256)).numpy()  # [E, 2I, H], rows interleaved
    np.testing.assert_array_equal(t["blk.0.ffn_gate_exps.weight"], floats[:, 0::2])
    np.testing.assert_array_equal(t["blk.0.ffn_up_exps.weight"], floats[:, 1::2])
