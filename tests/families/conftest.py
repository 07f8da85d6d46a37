"""Family-matrix fixtures: one tiny, weight-spread base per family row, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "export"))
import helpers  # noqa: E402
import rows  # noqa: E402

# hidden 256 and expert/MLP width 256: every row a whole number of Q4_K/Q6_K blocks (256 weights)
HIDDEN, FF = 256, 256


@pytest.fixture(scope="session")
def family_base(tmp_path_factory, tokenizer):
    """model_type → HF folder of a random tiny model of that family, weights ×4 (spread logits)."""
    from transformers import AutoModelForCausalLM

    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            row = rows.BY_TYPE[model_type]
            ids = dict(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            raw = tmp_path_factory.mktemp(f"{model_type}-raw")
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(
                row.make(len(tokenizer), ids, HIDDEN, FF), dtype=torch.float32
            ).save_pretrained(raw)
            tokenizer.save_pretrained(raw)
            out = helpers.scale_weights(raw, tmp_path_factory.mktemp(model_type), factor=4.0)
            if row.moe:
                _spread_router(out)
            built[model_type] = out
        return built[model_type]

    return get


def _spread_router(model_dir: Path, factor: float = 4.0) -> None:
    """Router weights ×`factor` more: top-k boundaries far apart, so llama.cpp's 8-bit activation
    rounding in quantised files rarely routes a token to another expert than PyTorch does."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    sd = load_file(path)
    g = torch.Generator().manual_seed(1)
    gc = torch.Generator().manual_seed(0)
    for name in sd:
        if name.endswith("mlp.gate.e_score_correction_bias"):
            # sigmoid routers (DeepSeek, GLM): scores already spread over (0, 1), ×4 would saturate
            # them into ties at 1.0; a bias of std 0.1 makes the correction term change choices
            sd[name] = 0.1 * torch.randn(sd[name].shape, generator=gc)
        elif name.endswith(
            ("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight", "router.layer.weight")
        ):
            if name.replace(".weight", ".e_score_correction_bias") not in sd:
                sd[name] = sd[name] * factor
        elif name.endswith(("_proj_bias", ".sinks")):  # gpt-oss: expert biases, attention sinks
            sd[name] = 0.5 * torch.randn(sd[name].shape, generator=g)
    save_file(sd, path, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def banned(tokenizer):
    """Special tokens and tokens that are not whole UTF-8 on their own (see helpers.banned_ids)."""
    return helpers.banned_ids(tokenizer)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, corpus_texts):
    """(train, eval) .jsonl files of 60 and 4 real-text documents: a 4-step run needs no more."""
    import json

    d = tmp_path_factory.mktemp("family-data")
    for name, texts in (("train", corpus_texts[:60]), ("eval", corpus_texts[60:64])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return d / "train.jsonl", d / "eval.jsonl"
