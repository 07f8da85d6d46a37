"""`greentune export` on a run dir and on a model folder; a bad --quant is one line, exit 2."""

import pytest
import yaml

from greentune.cli import main


@pytest.fixture(scope="module")
def q8_run(tmp_path_factory, tiny_llama_dir, text_jsonl):
    from greentune.pipeline import train

    d = tmp_path_factory.mktemp("q8run")
    recipe = d / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_llama_dir),
                "data": {"train": str(text_jsonl), "max_seq_len": 64},
                "method": {"quant_base": "q8_0", "lora": {"rank": 4, "alpha": 8}},
                "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2},
                "energy": {"measure_savings": False},
            }
        )
    )
    train(recipe, run_dir=d / "run", progress=False)
    return d / "run"


def test_export_run_dir_to_gguf_reuses_the_training_bytes(capsys, q8_run):
    import numpy as np
    from gguf import GGUFReader
    from safetensors import safe_open

    assert (
        main(["export", str(q8_run), "--format", "gguf", "--quant", "q8_0", "--out", str(q8_run / "x")]) == 0
    )
    path = q8_run / "x" / "model-q8_0.gguf"
    assert f"wrote {path}" in capsys.readouterr().out
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    with safe_open(str(q8_run / "trained-base.safetensors"), "pt") as f:
        trained = f.get_tensor("model.layers.0.mlp.up_proj.weight").numpy()
    assert np.array_equal(
        np.asarray(tensors["blk.0.ffn_up.weight"].data).view(np.uint8).reshape(trained.shape), trained
    )
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


def test_out_ending_in_gguf_is_the_file(tmp_path, tiny_llama_dir, capsys):
    from gguf import GGUFReader

    out = tmp_path / "mine" / "model.gguf"
    assert (
        main(["export", str(tiny_llama_dir), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    )
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    assert len(GGUFReader(out).tensors) > 0
    assert (tmp_path / "mine" / "model.Modelfile").read_text().startswith("FROM ")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["model.Modelfile", "model.gguf"]


def test_out_ending_in_gguf_needs_the_gguf_format(tmp_path, tiny_llama_dir, capsys):
    assert main(["export", str(tiny_llama_dir), "--format", "hf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("greentune: error: --out ") and "is a GGUF file, but --format is hf" in err
    assert not (tmp_path / "m.gguf").exists()


def test_outputs_honour_the_umask(tmp_path, tiny_llama_dir):
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert (
            main(
                [
                    "export",
                    str(tiny_llama_dir),
                    "--format",
                    "gguf",
                    "--quant",
                    "q8_0",
                    "--out",
                    str(tmp_path / "a.gguf"),
                ]
            )
            == 0
        )
        assert main(["export", str(tiny_llama_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
        os.umask(0o077)
        assert (
            main(
                [
                    "export",
                    str(tiny_llama_dir),
                    "--format",
                    "gguf",
                    "--quant",
                    "q8_0",
                    "--out",
                    str(tmp_path / "b.gguf"),
                ]
            )
            == 0
        )
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "a.gguf") == 0o644 and mode(tmp_path / "a.Modelfile") == 0o644
    assert mode(tmp_path / "hf" / "model-hf") == 0o755
    assert mode(tmp_path / "b.gguf") == 0o600


def test_version(capsys):
    import greentune

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"greentune {greentune.__version__} (torch ")
