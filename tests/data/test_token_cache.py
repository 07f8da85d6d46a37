"""The token cache: the same rows as the in-memory path, reused, keyed on content and settings."""

import json
import logging

import pytest
import torch

from greentune.data import token_cache
from greentune.data.build import build_datasets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = (
    [{"text": f"document number {i} " + "word " * (i % 7)} for i in range(30)]
    + [{"prompt": f"Q{i}: what is {i}+{i}?", "completion": f" {2 * i}"} for i in range(10)]
    + [
        {
            "messages": [
                {"role": "system", "content": "terse"},
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": f"hello {i}"},
            ]
        }
        for i in range(10)
    ]
)


def same(a, b):
    return all(
        torch.equal(getattr(a, n), getattr(b, n)) and getattr(b, n).dtype == torch.long
        for n in ("input_ids", "labels", "attention_mask")
    )


@pytest.mark.parametrize("chunk", [token_cache.TOKENS_PER_CHUNK, 50])
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("with_eval", [True, False])
def test_cached_rows_equal_the_in_memory_rows(
    tmp_path, tokenizer, cache, monkeypatch, pack, with_eval, chunk
):
    monkeypatch.setattr(token_cache, "TOKENS_PER_CHUNK", chunk)  # 50: rows span many packing chunks
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    ev = write_jsonl(tmp_path / "eval.jsonl", RECORDS[::7]) if with_eval else None
    expected = build_datasets(
        train, ev, tokenizer, max_seq_len=12, pack=pack, seed=3, eval_fraction=0.2, cache=False
    )
    got = build_datasets(train, ev, tokenizer, max_seq_len=12, pack=pack, seed=3, eval_fraction=0.2)
    again = build_datasets(train, ev, tokenizer, max_seq_len=12, pack=pack, seed=3, eval_fraction=0.2)
    for e, g, a in zip(expected, got, again):
        assert same(e, g) and same(e, a)


def test_entries_are_reused_and_keyed_on_content_and_settings(tmp_path, tokenizer, cache, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    with caplog.at_level(logging.INFO, logger="greentune.data.token_cache"):
        build_datasets(train, None, tokenizer, max_seq_len=16)
        assert "tokenised " + str(train) + " into" in caplog.text
        caplog.clear()
        build_datasets(train, None, tokenizer, max_seq_len=16)
        assert "reusing" in caplog.text and "into" not in caplog.text
    entries = lambda kind: sorted(p.name for p in cache.iterdir() if p.name.startswith(kind))  # noqa: E731
    assert len(entries("docs-")) == 1 and len(entries("rows-")) == 1
    build_datasets(train, None, tokenizer, max_seq_len=32)  # repacked, not re-tokenised
    build_datasets(train, None, tokenizer, max_seq_len=16, pack=False)
    build_datasets(train, None, tokenizer, max_seq_len=16, seed=1)
    assert len(entries("docs-")) == 1 and len(entries("rows-")) == 4
    write_jsonl(train, RECORDS + [{"text": "one more"}])  # same name, new content
    build_datasets(train, None, tokenizer, max_seq_len=16)
    assert len(entries("docs-")) == 2
    tok = token_cache.tokenizer_digest(tokenizer)
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert token_cache.tokenizer_digest(other) != tok
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no temporary folders left


def test_an_unreadable_entry_is_rebuilt(tmp_path, tokenizer, cache):
    train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    mapped, _ = build_datasets(train, None, tokenizer, max_seq_len=16)
    first = type(mapped)(*(getattr(mapped, n).clone() for n in ("input_ids", "labels", "attention_mask")))
    del (
        mapped
    )  # truncating a mapped file in place (as this test does, and greentune never does) faults readers
    for entry in cache.iterdir():
        victim = entry / ("ids.u32" if entry.name.startswith("docs-") else "train.input_ids.i64")
        victim.write_bytes(b"\0\0")
    again, _ = build_datasets(train, None, tokenizer, max_seq_len=16)
    assert same(first, again)


def test_a_bad_record_leaves_no_entry(tmp_path, tokenizer, cache):
    from greentune.errors import UserError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"text": "fine"})
        + "\n"
        + json.dumps({"messages": [{"role": "bot", "content": "x"}]})
        + "\n"
    )
    with pytest.raises(UserError, match=rf"^{bad}:2: messages\[0\] has unknown role 'bot'"):
        build_datasets(bad, None, tokenizer, max_seq_len=16)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_when_two_processes_build_one_entry_the_first_rename_wins(tmp_path):
    folder = tmp_path / "tokens" / "docs-x"
    with token_cache._new_entry(folder) as late:
        (late / "offsets.i64").write_text("late")
        with token_cache._new_entry(folder) as early:
            (early / "offsets.i64").write_text("early")
        assert (folder / "offsets.i64").read_text() == "early"
    assert (folder / "offsets.i64").read_text() == "early"
    assert [p.name for p in folder.parent.iterdir()] == ["docs-x"]
