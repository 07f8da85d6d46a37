"""Every user mistake: one line on stderr naming the problem, exit code 2, nothing half-written."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from greentune.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line(code, err, *needles):
    assert code == 2
    assert err.startswith("greentune: error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.fixture
def good(tmp_path, tiny_llama_dir, text_jsonl, write_recipe):
    return write_recipe(tiny_llama_dir, text_jsonl)


def _edit(path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))
    return path


def test_missing_model_dir(capsys, tmp_path, good):
    _edit(good, lambda d: d.update(base_model=str(tmp_path / "nope")))
    _assert_one_line(*_run(capsys, "train", str(good), "--run-dir", str(tmp_path / "run")), "model not found")
    assert not (tmp_path / "run").exists()


def test_pickle_only_checkpoint(capsys, tmp_path, good, tiny_llama_dir):
    d = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    _edit(good, lambda r: r.update(base_model=str(d)))
    _assert_one_line(*_run(capsys, "train", str(good), "--run-dir", str(tmp_path / "run")), "never unpickles")
    assert not (tmp_path / "run").exists()


def test_corrupt_safetensors(capsys, tmp_path, good, tiny_llama_dir):
    d = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    _edit(good, lambda r: r.update(base_model=str(d)))
    _assert_one_line(
        *_run(capsys, "train", str(good), "--run-dir", str(tmp_path / "run")), "corrupt safetensors"
    )


def test_missing_tokenizer(capsys, tmp_path, good, tiny_llama_dir):
    d = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    _edit(good, lambda r: r.update(base_model=str(d)))
    _assert_one_line(*_run(capsys, "train", str(good), "--run-dir", str(tmp_path / "run")), "no tokenizer")


def test_empty_data_file(capsys, tmp_path, good):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _edit(good, lambda r: r["data"].update(train=str(empty)))
    _assert_one_line(*_run(capsys, "train", str(good), "--run-dir", str(tmp_path / "run")), "empty.jsonl")
    assert not (tmp_path / "run").exists()


def test_malformed_json_line_names_file_and_line(capsys, tmp_path, good):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "broken\n')
    _edit(good, lambda r: r["data"].update(train=str(bad)))
    _assert_one_line(*_run(capsys, "train", str(good), "--run-dir", str(tmp_path / "run")), "bad.jsonl:2")


def test_unknown_recipe_key(capsys, tmp_path, good):
    _edit(good, lambda r: r["train"].update(stepz=3))
    _assert_one_line(*_run(capsys, "train", str(good)), "unknown key 'train.stepz'")


def test_max_seq_len_beyond_positions(capsys, tmp_path, good):
    _edit(good, lambda r: r["data"].update(max_seq_len=100_000))
    _assert_one_line(
        *_run(capsys, "train", str(good), "--run-dir", str(tmp_path / "run")),
        "max_seq_len 100000 exceeds the model's 256 positions",
    )


def test_resume_without_checkpoint(capsys, tmp_path, good):
    _assert_one_line(
        *_run(capsys, "train", str(good), "--run-dir", str(tmp_path / "run"), "--resume"), "--resume"
    )


def test_run_dir_of_another_recipe(capsys, tmp_path, good):
    from greentune.ownership import RUN, mark

    run = tmp_path / "run"
    run.mkdir()
    mark(run, RUN)  # a run dir greentune made (an unmarked folder is refused as the user's)
    other = yaml.safe_load(good.read_text())
    other["train"]["lr"] = 0.5
    (run / "recipe.yaml").write_text(yaml.safe_dump(other))
    _assert_one_line(
        *_run(capsys, "train", str(good), "--run-dir", str(run)),
        "belongs to a different recipe (differs at 'train.lr')",
    )


def test_unknown_region(capsys, tmp_path, good):
    _edit(good, lambda r: r.update(energy={"region": "ATLANTIS"}))
    _assert_one_line(*_run(capsys, "train", str(good), "--run-dir", str(tmp_path / "run")), "ATLANTIS")


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "greentune", "train", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"greentune: error: recipe file not found: {tmp_path / 'missing.yaml'}"
    )


@pytest.mark.parametrize(
    "argv, needle",
    [
        (("upcycle", "m", "--out", "o", "--experts", "abc"), "--experts must be a whole number"),
        (("eval", "m", "--data", "d.jsonl", "--batch-size", "-3"), "--batch-size must be between 1"),
        (("train", "r.yaml", "--nproc", "2.5"), "--nproc must be a whole number"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, needle):
    _assert_one_line(*_run(capsys, *argv), needle)
