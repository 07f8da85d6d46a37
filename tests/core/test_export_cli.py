"""`greentune export` on a run dir and on a model folder; a bad --quant is one line, exit 2."""
import pytest
import yaml

from greentune.cli import main


@pytest.fixture(scope="module")
def q8_run(tmp_path_factory, tiny_llama_dir, text_jsonl):
    from greentune.pipeline import train

    d = tmp_path_factory.mktemp("q8run")
    recipe = d / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "base_model": str(tiny_llama_dir), "data": {"train": str(text_jsonl), "max_seq_len": 64},
        "method": {"quant_base": "q8_0", "lora": {"rank": 4, "alpha": 8}},
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2}, "energy": {"measure_savings": False}}))
    train(recipe, run_dir=d / "run", progress=False)
    return d / "run"


def test_export_run_dir_to_gguf_reuses_the_training_bytes(capsys, q8_run):
    import numpy as np
    from gguf import GGUFReader
    from safetensors import safe_open

    assert main(["export", str(q8_run), "--format", "gguf", "--quant", "q8_0", "--out", str(q8_run / "x")]) == 0
    path = q8_run / "x" / "model-q8_0.gguf"
    assert f"wrote {path}" in capsys.readouterr().out
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    with safe_open(str(q8_run / "trained-base.safetensors"), "pt") as f:
        trained = f.get_tensor("model.layers.0.mlp.up_proj.weight").numpy()
    assert np.array_equal(np.asarray(tensors["blk.0.ffn_up.weight"].data).view(np.uint8).reshape(trained.shape), trained)
    assert (q8_run / "x" / "model-q8_0.Modelfile").read_text().startswith("FROM ")


def test_export_model_folder_to_mlx_and_hf(tmp_path, tiny_llama_dir):
    assert main(["export", str(tiny_llama_dir), "--format", "mlx", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model-mlx-4bit" / "config.json").exists()
    assert main(["export", str(tiny_llama_dir), "--format", "hf", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model-hf" / "model.safetensors").exists()


def test_bad_quant_is_one_line(capsys, tiny_llama_dir):
    assert main(["export", str(tiny_llama_dir), "--format", "gguf", "--quant", "q3_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("greentune: error: --quant: quant 'q3_k' is not one of") and "\n" not in err
