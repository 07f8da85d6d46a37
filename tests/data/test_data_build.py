"""build_datasets: eval from a file or a seeded held-out share of documents."""

import json

import pytest

from greentune.data.build import build_datasets, split_documents
from greentune.data.sources import TextSample
from greentune.errors import UserError


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def docs_in(tokenizer, data):
    """The document texts inside packed data, recovered by splitting on BOS/EOS."""
    text = tokenizer.decode(data.input_ids[data.attention_mask.bool()].tolist())
    return sorted(t for t in text.replace("<s>", "").split("</s>") if t)


TEXTS = [f"document number {i} is here" for i in range(40)]


def test_eval_file_is_used_as_is(tmp_path, tokenizer):
    train = write_texts(tmp_path / "train.jsonl", TEXTS)
    ev = write_texts(tmp_path / "eval.jsonl", ["held out text"])
    tr, ev_data = build_datasets(train, ev, tokenizer, max_seq_len=16, pack=True, seed=0)
    assert docs_in(tokenizer, tr) == sorted(TEXTS)
    assert docs_in(tokenizer, ev_data) == ["held out text"]
    assert tr.seq_len == ev_data.seq_len == 16


def test_held_out_split_is_by_document_and_seeded(tmp_path, tokenizer):
    train = write_texts(tmp_path / "train.jsonl", TEXTS)
    tr, ev = build_datasets(train, None, tokenizer, max_seq_len=16, pack=False, seed=0, eval_fraction=0.1)
    tr_docs, ev_docs = docs_in(tokenizer, tr), docs_in(tokenizer, ev)
    assert len(ev_docs) == 4 and len(tr_docs) == 36
    assert sorted(tr_docs + ev_docs) == sorted(TEXTS)
    tr2, ev2 = build_datasets(train, None, tokenizer, max_seq_len=16, pack=False, seed=0, eval_fraction=0.1)
    assert docs_in(tokenizer, ev2) == ev_docs and (tr2.input_ids == tr.input_ids).all()
    _, ev3 = build_datasets(train, None, tokenizer, max_seq_len=16, pack=False, seed=1, eval_fraction=0.1)
    assert docs_in(tokenizer, ev3) != ev_docs


def test_split_documents_keeps_at_least_one_on_each_side():
    samples = [TextSample(str(i), str(i)) for i in range(3)]
    tr, ev = split_documents(samples, seed=0, eval_fraction=0.01)
    assert (len(tr), len(ev)) == (2, 1)
    tr, ev = split_documents(samples[:2], seed=0, eval_fraction=0.99)
    assert (len(tr), len(ev)) == (1, 1)
    assert [s.text for s in tr] == sorted(s.text for s in tr)  # file order is kept
    with pytest.raises(ValueError, match="eval_fraction must be between 0 and 1"):
        split_documents(samples, seed=0, eval_fraction=0)


def test_one_document_and_no_eval_file_is_refused(tmp_path, tokenizer):
    p = tmp_path / "only.txt"
    p.write_text("one document")
    with pytest.raises(
        UserError,
        match=rf"^{p}: only one document, so none can be held out for evaluation; "
        r"add more documents or set data\.eval$",
    ):
        build_datasets(p, None, tokenizer, max_seq_len=16, pack=True, seed=0)


def test_no_loss_tokens_error_names_the_file(tmp_path, tokenizer):
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"prompt": "a long prompt " * 20, "completion": "x"}) + "\n")
    ev = write_texts(tmp_path / "e.jsonl", ["fine"])
    with pytest.raises(UserError, match=rf"^{train}: no loss tokens fit in max_seq_len=8"):
        build_datasets(train, ev, tokenizer, max_seq_len=8, pack=False, seed=0)


def test_errors_from_the_eval_file_name_it(tmp_path, tokenizer):
    train = write_texts(tmp_path / "t.jsonl", TEXTS)
    ev = tmp_path / "e.jsonl"
    ev.write_text("{oops\n")
    with pytest.raises(UserError, match=rf"^{ev}:1: malformed JSON"):
        build_datasets(train, ev, tokenizer, max_seq_len=8, pack=True, seed=0)
