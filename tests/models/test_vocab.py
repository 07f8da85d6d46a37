"""A tokenizer larger than the model's embedding is one line at `greentune train`, before any work
(`models.loader.check_tokenizer_fits`; on a q4_k base this was an IndexError in the quantised embedding)."""

from __future__ import annotations

import json

import pytest
import yaml

from greentune.cli import main
from greentune.models import tiny


@pytest.mark.parametrize("quant_base", ["none", "q4_k"])
def test_tokenizer_larger_than_the_embedding_is_one_line(tmp_path, capsys, tokenizer, quant_base):
    base = tmp_path / "base"
    tiny.build_tiny_model("llama", base, vocab_size=300)  # 300 embedding rows
    tokenizer.save_pretrained(base)  # 512+ ids: another model's tokenizer
    n = len(tokenizer)
    assert n > 300
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(20)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "data": {"train": str(data), "max_seq_len": 16},
                "method": {"quant_base": quant_base},
                "train": {"steps": 1},
            }
        )
    )
    run = tmp_path / "run"
    capsys.readouterr()  # the tiny model's save progress
    assert main(["train", str(recipe), "--run-dir", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("greentune: error: "), lines
    assert f"the tokenizer has {n} tokens" in lines[0] and "embedding has 300 rows" in lines[0]
    assert not run.exists()
