"""`save_dequantized_`: merged/ of a quantised-base model written one decoder layer at a time equals
`dequantize_model_` + `save_pretrained` (names, values, block bytes), and a GGUF exported from that
folder with the training bytes (in-memory fused expert names) writes those bytes unchanged."""

import json

import numpy as np
import torch
from safetensors import safe_open


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_layer_by_layer_equals_whole_model_save(tmp_path, tiny_mixtral_dir):
    from greentune.quant import load_quantized
    from greentune.quant.dequantize import dequantize_model_
    from greentune.quant.save_merged import save_dequantized_

    ref = load_quantized(tiny_mixtral_dir, "q8_0")
    ref_packed = dequantize_model_(ref)
    ref.save_pretrained(tmp_path / "ref", safe_serialization=True)

    model = load_quantized(tiny_mixtral_dir, "q8_0")
    n_layers = model.config.num_hidden_layers
    (tmp_path / "new").mkdir()
    packed = save_dequantized_(model, tmp_path / "new", torch.float32, whole_bytes=0)

    assert packed.keys() == ref_packed.keys()
    for k, (t, data) in packed.items():
        assert t == ref_packed[k][0] and torch.equal(data, ref_packed[k][1]), k
    a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "new")
    assert a.keys() == b.keys()
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in b)  # the hub's names
    for k in a:
        assert torch.equal(a[k], b[k]), k
    shards = sorted(p.name for p in (tmp_path / "new").glob("*.safetensors"))
    assert len(shards) == n_layers + 1  # one per decoder layer, one for the rest
    index = json.loads((tmp_path / "new" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and set(index["weight_map"].values()) == set(shards)
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())  # consumed


def test_gguf_from_the_folder_writes_the_fused_expert_training_bytes(tmp_path, tiny_mixtral_dir):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from greentune.export import write_gguf
    from greentune.quant import load_quantized
    from greentune.quant.save_merged import save_dequantized_

    model = load_quantized(tiny_mixtral_dir, "q8_0")
    merged = tmp_path / "merged"
    merged.mkdir()
    packed = save_dequantized_(model, merged, torch.float32, whole_bytes=0)
    AutoTokenizer.from_pretrained(tiny_mixtral_dir).save_pretrained(merged)
    assert "model.layers.0.mlp.experts.gate_up_proj" in packed  # in-memory names, fused

    path = write_gguf(merged, tmp_path / "m.gguf", "q8_0", prequantized=packed)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    gate_up = packed["model.layers.0.mlp.experts.gate_up_proj"][1].numpy()
    n_exp, inter = gate_up.shape[0], model.config.intermediate_size
    rows = gate_up.reshape(n_exp, 2 * inter, -1)
    for gguf_name, want in (
        ("blk.0.ffn_gate_exps.weight", rows[:, :inter]),
        ("blk.0.ffn_up_exps.weight", rows[:, inter:]),
    ):
        got = np.asarray(tensors[gguf_name].data).view(np.uint8).reshape(want.shape)
        assert np.array_equal(got, want), gguf_name
    down = packed["model.layers.0.mlp.experts.down_proj"][1].numpy()
    got = np.asarray(tensors["blk.0.ffn_down_exps.weight"].data).view(np.uint8).reshape(down.shape)
    assert np.array_equal(got, down)


def test_a_small_model_is_written_whole(tmp_path, tiny_mixtral_dir):
    from transformers import AutoModelForCausalLM

    from greentune.quant import load_quantized
    from greentune.quant.save_merged import float_bytes, save_dequantized_

    model = load_quantized(tiny_mixtral_dir, "q8_0")
    ref = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32)
    assert float_bytes(model, torch.float32) == 4 * sum(p.numel() for p in ref.parameters())
    (tmp_path / "m").mkdir()
    save_dequantized_(model, tmp_path / "m", torch.float32)
    assert [p.name for p in (tmp_path / "m").glob("*.safetensors")] == ["model.safetensors"]
