"""Fixtures for export tests: tiny models with structure, a SentencePiece-style tokenizer, exports cached."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import helpers  # noqa: E402

from greentune.models import tiny  # noqa: E402


@pytest.fixture(scope="session")
def scaled_llama_dir(tmp_path_factory, tiny_llama_dir):
    """tiny_llama with weights ×8: hidden 64, rows not a multiple of 256."""
    return helpers.scale_weights(tiny_llama_dir, tmp_path_factory.mktemp("llama-s"))


@pytest.fixture(scope="session")
def scaled_mixtral_dir(tmp_path_factory, tiny_mixtral_dir):
    return helpers.scale_weights(tiny_mixtral_dir, tmp_path_factory.mktemp("mixtral-s"))


@pytest.fixture(scope="session")
def scaled_qwen2_dir(tmp_path_factory, tokenizer):
    """Qwen2 (q/k/v biases) as GGUF "llama"."""
    d = tmp_path_factory.mktemp("qwen2")
    tiny.build_tiny_model("qwen2", d, tokenizer=tokenizer)
    return helpers.scale_weights(d, tmp_path_factory.mktemp("qwen2-s"))


@pytest.fixture(scope="session")
def scaled_mistral_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("mistral")
    tiny.build_tiny_model("mistral", d, tokenizer=tokenizer)
    return helpers.scale_weights(d, tmp_path_factory.mktemp("mistral-s"))


def _wide(tmp_path_factory, tokenizer, arch):
    d = tmp_path_factory.mktemp(f"{arch}-256")
    tiny.build_tiny_model(arch, d, tokenizer=tokenizer, hidden=256, intermediate=512, layers=2)
    return helpers.scale_weights(d, tmp_path_factory.mktemp(f"{arch}-256-s"), factor=4.0)


@pytest.fixture(scope="session")
def wide_llama_dir(tmp_path_factory, tokenizer):
    """Llama with hidden 256 / ff 512, so Q4_K and Q6_K blocks (256 weights) fit the rows."""
    return _wide(tmp_path_factory, tokenizer, "llama")


@pytest.fixture(scope="session")
def wide_mixtral_dir(tmp_path_factory, tokenizer):
    return _wide(tmp_path_factory, tokenizer, "mixtral")


@pytest.fixture(scope="session")
def banned(tokenizer):
    return helpers.banned_ids(tokenizer)


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory):
    """export(model_dir, quant) → path, each export done once per session."""
    from greentune.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    done = {}

    def export(model_dir, quant):
        key = (str(model_dir), quant)
        if key not in done:
            path = out / f"{Path(model_dir).name}-{quant}.gguf"
            done[key] = export_gguf(model_dir, path, quant)
        return done[key]

    return export


def build_spm_tokenizer(texts, out_dir, vocab_size=600):
    """A Llama-2-style tokenizer.json: BPE with byte fallback, "▁" for spaces, <0xNN> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = norm
    t.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<s>", "</s>"],
            show_progress=False,
            limit_alphabet=100,
        ),
    )
    tj = json.loads(t.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tj["model"]["merges"]]
    t2 = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    t2.normalizer = norm
    t2.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    t2.add_special_tokens(["<unk>", "<s>", "</s>"])
    t2.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=t2, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


@pytest.fixture(scope="session")
def spm_llama_dir(tmp_path_factory, corpus_texts):
    d = tmp_path_factory.mktemp("spm-llama")
    tok = build_spm_tokenizer(corpus_texts[:400], d)
    tiny.build_tiny_model("llama", d, tokenizer=tok)
    return d
