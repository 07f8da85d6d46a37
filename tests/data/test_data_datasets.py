"""Data through `datasets` (parquet, CSV, JSON, save_to_disk, a dataset folder) and every row shape."""

import json

import pytest

from greentune.data.build import build_datasets
from greentune.data.hf_datasets import DatasetSpec
from greentune.data.shapes import SHAPES
from greentune.data.sources import ChatSample, PromptSample, TextSample, read_samples
from greentune.errors import UserError
from greentune.recipe import recipe_from_dict

pd = pytest.importorskip("pandas")


def test_parquet_and_csv_by_suffix(tmp_path):
    pq = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["first doc", "  ", "second doc"], "id": [1, 2, 3]}).to_parquet(pq)
    assert read_samples(pq) == [
        TextSample("first doc", f"{pq} row 0"),
        TextSample("second doc", f"{pq} row 2"),
    ]
    csv = tmp_path / "d.csv"
    pd.DataFrame({"prompt": ["Q: 1+1?"], "completion": [" 2"]}).to_csv(csv, index=False)
    assert read_samples(csv) == [PromptSample("Q: 1+1?", " 2", f"{csv} row 0")]


def test_whitespace_only_documents_are_counted_in_the_log(tmp_path, caplog):
    pq = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["real", " ", "\n\t", "also real"]}).to_parquet(pq)
    assert len(read_samples(pq)) == 2
    assert f"{pq}: skipped 2 whitespace-only documents" in caplog.text


def test_json_file_through_a_dataset_entry_with_renamed_columns(tmp_path):
    p = tmp_path / "qa.json"
    p.write_text(
        json.dumps([{"question": "What is 2+2?", "answer": "4"}, {"question": "Hi", "answer": "Hello"}])
    )
    spec = DatasetSpec(dataset=str(p), columns={"question": "prompt", "answer": "completion"})
    assert read_samples(spec) == [
        PromptSample("What is 2+2?", "4", f"{p}[train] row 0"),
        PromptSample("Hi", "Hello", f"{p}[train] row 1"),
    ]


def test_save_to_disk_folder_and_its_splits(tmp_path):
    import datasets

    d = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"conversations": [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]]}
            ),
            "test": datasets.Dataset.from_dict(
                {"instruction": ["Add"], "input": ["1 and 2"], "output": ["3"]}
            ),
        }
    ).save_to_disk(str(d))
    assert read_samples(DatasetSpec(dataset=str(d))) == [
        ChatSample((("user", "hi"), ("assistant", "hello")), f"{d}[train] row 0")
    ]
    assert read_samples(DatasetSpec(dataset=str(d), split="test")) == [
        PromptSample("Add\n\n1 and 2\n\n", "3", f"{d}[test] row 0")
    ]
    with pytest.raises(UserError, match=r"\[validation\]: no split 'validation' \(splits: train, test\)$"):
        read_samples(DatasetSpec(dataset=str(d), split="validation"))


def test_a_dataset_folder_of_parquet_files(tmp_path):
    """A Hub dataset's own layout (data/train-*.parquet), read from a local folder: `datasets` cannot
    resolve a Hub id offline unless it prepared that dataset online before, so this is the offline test."""
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pd.DataFrame({"text": ["a b c", "d e f"]}).to_parquet(
        tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"
    )
    pd.DataFrame({"text": ["held"]}).to_parquet(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet")
    spec = DatasetSpec(dataset=str(tmp_path / "repo"), split="test")
    assert [s.text for s in read_samples(spec)] == ["held"]


def test_hub_dataset_not_in_the_cache_offline_is_one_line(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        read_samples(DatasetSpec(dataset="nobody/nothing"))
    msg = str(err.value)
    assert msg.startswith("nobody/nothing[train]: ") and "\n" not in msg, msg


def _jsonl(tmp_path, *records):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def test_every_shape_is_detected_per_row(tmp_path):
    p = _jsonl(
        tmp_path,
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]},
            ]
        },
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Add", "input": "", "output": "0"},
    )
    assert read_samples(p) == [
        ChatSample(
            (
                ("system", "be brief"),
                ("user", "weather?"),
                ("assistant", ""),
                ("tool", "sunny"),
                ("assistant", "Sunny."),
            ),
            f"{p}:1",
        ),
        ChatSample((("system", "s"), ("user", "q"), ("assistant", "a")), f"{p}:2"),
        PromptSample("Say hi\n\n", "hi", f"{p}:3"),
        PromptSample("Add\n\n", "0", f"{p}:4"),
    ]


@pytest.mark.parametrize(
    "record,expected",
    [
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "{p}:1: messages[0] has unknown role 'bot'; roles are system, developer, user, assistant, tool",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "chatgpt", "value": "a"}]},
            "{p}:1: conversations[1] has unknown role 'chatgpt'; ShareGPT roles are system, human, user, "
            "gpt, assistant",
        ),
        (
            {"conversations": [{"role": "user", "content": "q"}]},
            '{p}:1: conversations[0] must be an object with "from" and "value"',
        ),
        (
            {"instruction": "x"},
            '{p}:1: "output" is missing; an Alpaca record needs "instruction" and "output"',
        ),
        (
            {"instruction": "x", "output": "y", "text": "z"},
            "{p}:1: ambiguous record, has keys of several shapes (instruction/output and text); use exactly "
            "one of " + SHAPES,
        ),
        ({"body": "x"}, "{p}:1: no known keys (found: body); accepted shapes: " + SHAPES),
    ],
)
def test_a_row_that_fits_no_shape_is_one_line(tmp_path, record, expected):
    p = _jsonl(tmp_path, record)
    with pytest.raises(UserError) as err:
        read_samples(p)
    assert str(err.value) == expected.replace("{p}", str(p))


def test_a_complete_shape_wins_over_a_stray_column(tmp_path):
    """As in HuggingFaceH4/no_robots: rows have "messages" and also a "prompt" column."""
    p = _jsonl(
        tmp_path,
        {
            "prompt": "hi",
            "prompt_id": "7",
            "category": "chat",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}],
        },
    )
    assert read_samples(p) == [ChatSample((("user", "hi"), ("assistant", "hey")), f"{p}:1")]


def test_unknown_role_in_a_dataset_names_the_row(tmp_path):
    pq = tmp_path / "chat.parquet"
    pd.DataFrame(
        {
            "messages": [
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                [{"role": "narrator", "content": "c"}],
            ]
        }
    ).to_parquet(pq)
    with pytest.raises(UserError, match=rf"^{pq} row 1: messages\[0\] has unknown role 'narrator'"):
        read_samples(pq)


def test_recipe_accepts_a_dataset_entry_and_resolves_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    r = recipe_from_dict(
        {
            "base_model": "org/model",
            "data": {
                "train": {"dataset": "data/qa.json", "columns": {"q": "prompt", "a": "completion"}},
                "eval": {"dataset": "org/some-dataset", "split": "test", "name": "en"},
            },
        },
        base_dir=tmp_path,
    )
    assert r.data.train == DatasetSpec(
        dataset=str(tmp_path / "data" / "qa.json"), columns={"q": "prompt", "a": "completion"}
    )
    assert r.data.eval == DatasetSpec(dataset="org/some-dataset", split="test", name="en")
    assert r.dump()["data"]["eval"] == {
        "dataset": "org/some-dataset",
        "split": "test",
        "name": "en",
        "columns": {},
    }
    with pytest.raises(UserError, match="maps onto unknown key"):
        recipe_from_dict(
            {"base_model": "m", "data": {"train": {"dataset": "x", "columns": {"q": "question"}}}}
        )


def test_build_datasets_from_a_dataset_entry(tmp_path, tokenizer):
    pq = tmp_path / "d.parquet"
    texts = [f"document number {i} is here" for i in range(20)]
    pd.DataFrame({"body": texts}).to_parquet(pq)
    train, held = build_datasets(
        DatasetSpec(dataset=str(pq), columns={"body": "text"}),
        None,
        tokenizer,
        max_seq_len=16,
        pack=False,
        seed=0,
        eval_fraction=0.1,
    )
    assert len(train) == 18 and len(held) == 2


def test_the_recipe_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, greentune.recipe; print('torch' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr
