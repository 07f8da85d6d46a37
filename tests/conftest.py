"""Shared fixtures: a locally trained tokenizer and tiny checkpoints, built once per session."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from greentune.demo import corpus
from greentune.models import tiny


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Calibrations and the demo base go to a temporary cache, never the user's (subprocesses inherit it)."""
    import os
    os.environ["GREENTUNE_CACHE"] = str(tmp_path_factory.mktemp("greentune-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def corpus_texts():
    """A few hundred kB of real text: stdlib docstrings."""
    return corpus.docstrings(limit_chars=300_000)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_texts):
    d = tmp_path_factory.mktemp("tokenizer")
    tiny.build_tokenizer(corpus_texts, d, vocab_size=512)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _model_dir(tmp_path_factory, tokenizer, arch, **sizes):
    d = tmp_path_factory.mktemp(f"tiny-{arch}")
    tiny.build_tiny_model(arch, d, tokenizer=tokenizer, **sizes)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """Llama: vocab 512+, hidden 64, 2 layers, 4 heads / 2 KV heads, ff 128."""
    return _model_dir(tmp_path_factory, tokenizer, "llama")


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory, tokenizer):
    """Mixtral: as tiny_llama plus 4 experts, top-2."""
    return _model_dir(tmp_path_factory, tokenizer, "mixtral")


@pytest.fixture(scope="session")
def tiny_qwen2_moe_dir(tmp_path_factory, tokenizer):
    """Qwen2-MoE: 4 experts top-2 plus a shared expert."""
    return _model_dir(tmp_path_factory, tokenizer, "qwen2_moe")


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory, corpus_texts):
    """400 real-text documents as {"text"} lines."""
    import json
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:400]))
    return p


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe YAML for a tiny model and return its path; keyword overrides per section."""
    import yaml

    def make(base_model, train_path, *, data=None, method=None, train=None, **top):
        recipe = {
            "base_model": str(base_model),
            "data": {"train": str(train_path), "max_seq_len": 64, **(data or {})},
            "method": {"lora": {"rank": 4, "alpha": 8, "targets": ["attn", "mlp"]}, **(method or {})},
            "train": {"steps": 12, "batch_size": 4, "lr": 1e-3, "warmup": 2, "checkpoint_every": 5, **(train or {})},
            **top,
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make


@pytest.fixture(scope="session")
def pretrained_llama_dir(tmp_path_factory, tokenizer, corpus_texts):
    """The tiny Llama after 60 full-training steps on stdlib docstrings: a base worth reusing."""
    from greentune.data import BatchStream, pack, tokenize
    from greentune.data.sources import TextSample

    d = tmp_path_factory.mktemp("pretrained-llama")
    model = tiny.build_tiny_model("llama", d, tokenizer=tokenizer)
    rows = pack(tokenize([TextSample(t, "docstrings") for t in corpus_texts[:600]], tokenizer), 64)
    stream = BatchStream(rows, 8, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        model(**next(stream)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def code_jsonl(tmp_path_factory):
    """Real Python source (stdlib), as {"text"} lines: a 'client' domain unlike the docstrings."""
    import json
    p = tmp_path_factory.mktemp("code") / "code.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.source_snippets(limit_chars=200_000)))
    return p
