"""`greentune plan --write-recipe`: the recommendation as a recipe that loads and trains."""

import json

import pytest
import yaml

from greentune.cli import main
from greentune.recipe import load_recipe


def test_catalogue_plan_writes_a_recipe_load_recipe_accepts(tmp_path, capsys):
    out = tmp_path / "mixtral.yaml"
    assert (
        main(
            [
                "plan",
                "--model",
                "mixtral-8x7b",
                "--hardware",
                "H100",
                "--tokens",
                "1000000",
                "--write-recipe",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    recommended = json.loads(capsys.readouterr().out)["recommended"]
    text = out.read_text()
    assert "# FILL IN: your training data" in text and f"# Technique: {recommended}," in text
    recipe = load_recipe(out)
    assert recipe.base_model == "mistralai/Mixtral-8x7B-v0.1"
    assert recipe.data.train == tmp_path / "FILL-IN" / "train.jsonl"
    assert recipe.method.quant_base in {"nf4", "q4_k"} and "experts" in recipe.method.lora.targets
    # an existing file is never overwritten
    assert main(["plan", "--model", "mixtral-8x7b", "--hardware", "H100", "--write-recipe", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == text


@pytest.mark.slow
def test_a_tiny_plans_recipe_trains_end_to_end(tmp_path, tiny_llama_dir, text_jsonl, capsys):
    out = tmp_path / "planned.yaml"
    assert (
        main(
            [
                "plan",
                "--model",
                str(tiny_llama_dir),
                "--hardware",
                "this",
                "--tokens",
                "256",
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--rank",
                "4",
                "--write-recipe",
                str(out),
            ]
        )
        == 0
    )
    assert f"wrote {out}" in capsys.readouterr().out
    data = yaml.safe_load(out.read_text())
    assert data["base_model"] == str(tiny_llama_dir) and data["train"]["steps"] == 2
    assert data["data"]["max_seq_len"] == 32 and data["method"]["lora"]["rank"] == 4
    # the user's part: the data (and, for a test's speed, no savings measurement)
    data["data"]["train"] = str(text_jsonl)
    data["energy"] = {"measure_savings": False}
    out.write_text(yaml.safe_dump(data))
    assert main(["train", str(out), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] == 2 * 4 * 32
