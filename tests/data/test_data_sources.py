"""Reading .jsonl / .txt / directories, and one clear UserError line for each bad input."""

import json

import pytest

from greentune.data.sources import SHAPES, ChatSample, PromptSample, TextSample, read_samples
from greentune.errors import UserError


def write_jsonl(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_jsonl_three_shapes_mixed_in_one_file(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        {"text": "hello world", "id": 7},
        "   ",
        {"prompt": "Q: 1+1?", "completion": " 2"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]},
    )
    assert read_samples(p) == [
        TextSample("hello world", f"{p}:1"),
        PromptSample("Q: 1+1?", " 2", f"{p}:3"),
        ChatSample((("user", "hi"), ("assistant", "hey")), f"{p}:4"),
    ]


def test_empty_prompt_is_allowed(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", {"prompt": "", "completion": "x"})
    assert read_samples(p) == [PromptSample("", "x", f"{p}:1")]


def test_txt_file_is_one_document_even_with_blank_lines(tmp_path):
    p = tmp_path / "code.txt"
    p.write_text("def f():\n    pass\n\n\ndef g():\n    pass\n")
    assert read_samples(p) == [TextSample("def f():\n    pass\n\n\ndef g():\n    pass\n", str(p))]


def test_directory_of_txt_sorted_recursive_skipping_empty_and_hidden(tmp_path, caplog):
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("C")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    samples = read_samples(tmp_path)
    assert [s.text for s in samples] == ["A", "B", "C"]
    assert [s.origin for s in samples] == [str(tmp_path / n) for n in ("a.txt", "b.txt", "sub/c.txt")]
    assert "empty.txt: empty, skipped" in caplog.text


def bad(tmp_path, name, content: str | bytes):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as err:
        read_samples(p)
    msg = str(err.value)
    assert "\n" not in msg
    return msg, p


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        read_samples(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("e.jsonl", "", "{p}: empty file, no training samples"),
        ("e.jsonl", "\n  \n", "{p}: empty file, no training samples"),
        ("e.txt", " \n", "{p}: empty file, no training samples"),
        (
            "d.json",
            "{}",
            "{p}: unsupported data file; use .jsonl, .txt, .parquet, .csv or a directory of .txt files "
            "(other formats: data.train: {dataset: PATH})",
        ),
        ("d.jsonl", '{"text": "a"}\n{"text": "b"\n', "{p}:2: malformed JSON: Expecting ',' delimiter"),
        (
            "d.jsonl",
            '{"text": "a"}\n\n[1, 2]\n',
            "{p}:3: expected a JSON object, got an array; accepted shapes: " + SHAPES,
        ),
        (
            "d.jsonl",
            '"just text"\n',
            "{p}:1: expected a JSON object, got a string; accepted shapes: " + SHAPES,
        ),
        (
            "d.jsonl",
            '{"input": "a", "output": "b"}\n',
            "{p}:1: no known keys (found: input, output); accepted shapes: " + SHAPES,
        ),
        (
            "d.jsonl",
            '{"text": "a", "prompt": "b", "completion": "c"}\n',
            "{p}:1: ambiguous record, has keys of several shapes (prompt/completion and text); use exactly "
            "one of " + SHAPES,
        ),
        (
            "d.jsonl",
            '{"prompt": "a"}\n',
            '{p}:1: "completion" is missing; a prompt/completion record needs both keys',
        ),
        ("d.jsonl", '{"text": 3}\n', '{p}:1: "text" must be a string, got a number'),
        (
            "d.jsonl",
            '{"text": ""}\n{"text": " \\n "}\n',
            "{p}: empty file, no training samples (2 whitespace-only document(s) skipped)",
        ),
        ("d.jsonl", '{"prompt": null, "completion": "x"}\n', '{p}:1: "prompt" must be a string, got null'),
        ("d.jsonl", '{"prompt": "x", "completion": ""}\n', '{p}:1: "completion" is empty'),
        (
            "d.jsonl",
            '{"messages": "hi"}\n',
            '{p}:1: "messages" must be a non-empty list of {"role", "content"} objects, got a string',
        ),
        (
            "d.jsonl",
            '{"messages": []}\n',
            '{p}:1: "messages" must be a non-empty list of {"role", "content"} objects, got an array',
        ),
        (
            "d.jsonl",
            '{"messages": [{"role": "user"}]}\n',
            '{p}:1: messages[0] must be an object with "role" and "content"',
        ),
        (
            "d.jsonl",
            '{"messages": [{"role": "user", "content": ["a"]}]}\n',
            '{p}:1: messages[0]["content"] must be a string, got an array',
        ),
        ("d.jsonl", '{"messages": [{"role": "", "content": "a"}]}\n', '{p}:1: messages[0]["role"] is empty'),
        (
            "d.jsonl",
            '{"messages": [{"role": "user", "content": "a"}]}\n',
            '{p}:1: no "assistant" message, so nothing to learn from this conversation',
        ),
        ("d.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "{p}:2: not UTF-8 text (byte 10)"),
    ],
)
def test_bad_input_is_one_line_with_file_and_line(tmp_path, name, content, expected):
    msg, p = bad(tmp_path, name, content)
    assert msg == expected.replace("{p}", str(p))


def test_directory_without_txt_and_with_only_empty_txt(tmp_path):
    (tmp_path / "a.md").write_text("x")
    with pytest.raises(UserError, match=r": no \.txt files in this directory$"):
        read_samples(tmp_path)
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(UserError, match=r": no training samples$"):
        read_samples(tmp_path)
