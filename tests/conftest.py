"""Shared fixtures: a locally trained tokenizer and tiny checkpoints, built once per session."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from greentune.demo import corpus
from greentune.models import tiny


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
