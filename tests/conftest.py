"""Shared fixtures: a locally trained tokenizer and tiny checkpoints, built once per session."""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from greentune.demo import corpus
from greentune.models import tiny

# Shared test helpers are imported by absolute module name (`from lora_helpers import ...`): the tests are
# no package and run under --import-mode=importlib, so their directories go on the path here, once, for
# every test module that uses them (tests/train uses the adapters' helpers too).
for _helpers in ("adapters", "energy", "moe", "report"):
    sys.path.insert(0, str(Path(__file__).parent / _helpers))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Calibrations and the demo base go to a temporary cache, never the user's (subprocesses inherit it)."""
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
            "train": {
                "steps": 12,
                "batch_size": 4,
                "lr": 1e-3,
                "warmup": 2,
                "checkpoint_every": 5,
                **(train or {}),
            },
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


# ---------------------------------------------------------------- an offline Hugging Face cache
# Lay files out exactly as huggingface_hub's cache does, so tests resolve Hub ids offline.
#
#     HF_HUB_CACHE/{models|datasets}--ORG--NAME/
#         blobs/<sha256 of the file>
#         snapshots/<commit>/<name> -> ../../blobs/<sha256>
#         refs/main                  (the commit)


def _add_to_hub_cache(
    hub_cache: Path,
    repo_id: str,
    src: Path,
    *,
    repo_type: str = "model",
    commit: str | None = None,
    only: list[str] | None = None,
) -> str:
    """Copy the files under `src` (or the names in `only`) into the cache as one commit; return it."""
    repo = Path(hub_cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(f"{repo_id}:{sorted(os.listdir(src))}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for f in sorted(Path(src).rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or (only is not None and str(rel) not in only):
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


class OfflineHub:
    """A temporary HF_HOME: `.home`, `.hub_cache`, and `.add(repo_id, folder, ...)` → commit."""

    def __init__(self, home: Path):
        self.home, self.hub_cache = home, home / "hub"

    def add(self, repo_id: str, src: Path, **kw) -> str:
        return _add_to_hub_cache(self.hub_cache, repo_id, src, **kw)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A temporary, empty HF_HOME in offline mode, for this process and its subprocesses.

    Files are laid out exactly as huggingface_hub's cache does (see `_add_to_hub_cache`).

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once at import, so its constants are
    patched as well as the environment."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    (home / "hub").mkdir(parents=True)
    for name, value in (
        ("HF_HOME", home),
        ("HF_HUB_CACHE", home / "hub"),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_CACHE", home / "datasets"),
        ("HF_DATASETS_OFFLINE", "1"),
    ):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return OfflineHub(home)
