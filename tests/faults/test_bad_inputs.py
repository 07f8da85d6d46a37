"""Bad input and the filesystem (issue 15): each case exits 2 with one line on stderr, no
traceback, nothing half-written, and nothing of the user's deleted or overwritten.

Full-disk and read-only cases run on a real tmpfs (mounted here when the test runs as root
with mount rights, skipped otherwise), so the OS itself raises ENOSPC / EROFS."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from greentune.cli import main
from greentune.errors import UserError

# ---------------------------------------------------------------- helpers


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _assert_one_line(code, err, *needles):
    assert code == 2, err
    assert err.startswith("greentune: error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: to prove nothing was changed or deleted."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_temp_files(folder: Path) -> None:
    left = [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]
    assert not left, left


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory, corpus_texts):
    p = tmp_path_factory.mktemp("small-data") / "train.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:40]))
    return p


@pytest.fixture
def model_copy(tmp_path, tiny_llama_dir):
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


@pytest.fixture
def recipe_for(write_recipe, small_jsonl):
    def make(model_dir, **sections):
        return write_recipe(model_dir, small_jsonl, **sections)

    return make


def _rewrite_weights(model_dir: Path, fn) -> None:
    sd = load_file(str(model_dir / "model.safetensors"))
    save_file(fn(sd), str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def _raw_safetensors(header, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# ---------------------------------------------------------------- item 1: never delete what is not ours


def test_upcycle_refuses_a_folder_greentune_did_not_write(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "my-folder"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    _assert_one_line(
        *_run(capsys, "upcycle", tiny_llama_dir, "--experts", 2, "--out", out),
        str(out),
        "not made by greentune",
        "--force",
    )
    assert _snapshot(out) == before


def test_upcycle_never_replaces_the_folder_holding_its_source(capsys, tmp_path, tiny_llama_dir):
    parent = tmp_path / "models"
    src = Path(shutil.copytree(tiny_llama_dir, parent / "llama"))
    (parent / "sibling.txt").write_text("keep me")
    before = _snapshot(parent)
    for extra in ((), ("--force",)):
        _assert_one_line(
            *_run(capsys, "upcycle", src, "--experts", 2, "--out", parent, *extra), str(parent), "contains"
        )
    assert _snapshot(parent) == before


def test_upcycle_replaces_its_own_output_and_a_forced_folder(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "moe"
    for _ in range(2):  # the second run replaces the first's output: greentune wrote it
        code, err = _run(capsys, "upcycle", tiny_llama_dir, "--experts", 2, "--out", out)
        assert code == 0, err
    forced = tmp_path / "forced"
    forced.mkdir()
    (forced / "old.txt").write_text("x")
    code, err = _run(capsys, "upcycle", tiny_llama_dir, "--experts", 2, "--out", forced, "--force")
    assert code == 0, err
    assert (forced / "config.json").is_file() and not (forced / "old.txt").exists()


def test_upcycle_experts_range_checked_before_allocating(capsys, tmp_path, tiny_llama_dir):
    _assert_one_line(
        *_run(capsys, "upcycle", tiny_llama_dir, "--experts", 100000, "--out", tmp_path / "o"),
        "--experts",
        "256",
    )
    from greentune.moe import upcycle

    with pytest.raises(UserError, match="at most 256"):
        upcycle(tiny_llama_dir, tmp_path / "o", experts=100000)
    assert not (tmp_path / "o").exists()


def test_train_refuses_a_run_dir_that_is_not_a_run(capsys, tmp_path, tiny_llama_dir, recipe_for):
    other = tmp_path / "results"
    other.mkdir()
    (other / "summary.json").write_text('{"mine": true}\n')
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    before = _snapshot(other)
    _assert_one_line(
        *_run(capsys, "train", recipe_for(tiny_llama_dir), "--run-dir", other),
        str(other),
        "not a greentune run",
    )
    assert _snapshot(other) == before


def test_train_refuses_a_run_dir_that_is_a_file(capsys, tmp_path, tiny_llama_dir, recipe_for):
    f = tmp_path / "run"
    f.write_text("a file")
    _assert_one_line(*_run(capsys, "train", recipe_for(tiny_llama_dir), "--run-dir", f), str(f), "is a file")
    assert f.read_text() == "a file"


def test_demo_starts_over_only_in_its_own_run_dir(tmp_path):
    from greentune.demo.run import _fresh_or_resume
    from greentune.ownership import RUN, mark

    foreign = tmp_path / "lora"
    foreign.mkdir()
    (foreign / "summary.json").write_text("{}")
    _fresh_or_resume(foreign)
    assert (foreign / "summary.json").read_text() == "{}"  # not ours: left for train to refuse
    ours = tmp_path / "ours"
    ours.mkdir()
    mark(ours, RUN)
    (ours / "summary.json").write_text("{}")
    assert _fresh_or_resume(ours) is False and not ours.exists()


# ---------------------------------------------------------------- item 3: incomplete checkpoints

WEIGHT_FAULTS = {
    "missing layer 1": (
        lambda sd: {k: v for k, v in sd.items() if not k.startswith("model.layers.1.")},
        ["9 of", "weights missing", "model.layers.1."],
    ),
    "no tensors at all": (lambda sd: {}, ["weights missing", "of 21"]),
    "unexpected tensor": (
        lambda sd: {**sd, "model.layers.7.mlp.extra.weight": torch.zeros(4)},
        ["1 tensors the architecture does not have", "model.layers.7.mlp.extra.weight"],
    ),
    "shape unequal": (
        lambda sd: {**sd, "model.norm.weight": torch.zeros(7)},
        ["wrong shape", "model.norm.weight", "(7,)", "(64,)"],
    ),
}


@pytest.mark.parametrize("fault", list(WEIGHT_FAULTS))
def test_incomplete_checkpoint_is_refused_by_train_and_eval(
    capsys, tmp_path, model_copy, recipe_for, small_jsonl, fault
):
    edit, needles = WEIGHT_FAULTS[fault]
    _rewrite_weights(model_copy, edit)
    _assert_one_line(
        *_run(capsys, "train", recipe_for(model_copy), "--run-dir", tmp_path / "run"),
        "does not match its architecture",
        *needles,
    )
    assert not (tmp_path / "run").exists()  # refused from the headers, before any work
    _assert_one_line(
        *_run(capsys, "eval", model_copy, "--data", small_jsonl), "does not match its architecture"
    )
    _assert_one_line(
        *_run(capsys, "export", model_copy, "--quant", "f32", "--out", tmp_path / "x"),
        "does not match its architecture",
        *needles,
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fault", list(WEIGHT_FAULTS))
def test_incomplete_checkpoint_is_refused_by_the_fp32_loader_itself(model_copy, fault):
    """The loader's own check on transformers' loading report (library users skip the CLI's header check)."""
    from greentune.models.loader import load_model

    edit, needles = WEIGHT_FAULTS[fault]
    _rewrite_weights(model_copy, edit)
    with pytest.raises(UserError, match="does not match its architecture") as err:
        load_model(model_copy)
    assert "\n" not in str(err.value) and all(n in str(err.value) for n in needles), err.value


@pytest.mark.parametrize("fault", list(WEIGHT_FAULTS))
def test_incomplete_checkpoint_is_refused_by_the_quantised_loader(model_copy, fault):
    from greentune.quant import load_quantized

    edit, needles = WEIGHT_FAULTS[fault]
    _rewrite_weights(model_copy, edit)
    with pytest.raises(UserError, match="does not match its architecture") as err:
        load_quantized(model_copy, "q8_0")
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles if n != "of 21" and n != "9 of"), msg


def test_tied_head_and_saved_inv_freq_are_not_faults(tmp_path, tokenizer):
    """A tied checkpoint omits lm_head; old checkpoints carry rotary inv_freq: both load."""
    from transformers import AutoModelForCausalLM

    from greentune.models.loader import load_model
    from greentune.models.tiny import tiny_config
    from greentune.quant import load_quantized

    config = tiny_config("llama", vocab_size=len(tokenizer), tokenizer=tokenizer)
    config.tie_word_embeddings = True
    d = tmp_path / "tied"
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    sd = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in sd
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    m = load_model(d)
    assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
    load_quantized(d, "q8_0")


# ---------------------------------------------------------------- item 9: malformed safetensors headers

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADER_FAULTS = {
    "a JSON list": ([1, 2, 3], b"", "not an object"),
    "overflowing shape": (
        {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}},
        b"\0" * 8,
        "needs",
    ),
    "negative offset": (
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
        b"\0" * 8,
        "data_offsets",
    ),
    "overlapping offsets": (
        {"a": F32_2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
        b"\0" * 8,
        "overlaps",
    ),
    "non-string metadata": ({"__metadata__": {"format": 3}, "w": F32_2}, b"\0" * 8, "__metadata__"),
    "unknown dtype": (
        {"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}},
        b"\0" * 8,
        "unknown dtype",
    ),
    "truncated data": ({"w": F32_2}, b"\0" * 4, "tensors end at byte"),
}


@pytest.mark.parametrize("fault", list(HEADER_FAULTS))
def test_malformed_safetensors_header_is_one_line_everywhere(capsys, tmp_path, model_copy, recipe_for, fault):
    from greentune.quant import load_quantized

    header, data, needle = HEADER_FAULTS[fault]
    weights = model_copy / "model.safetensors"
    weights.write_bytes(_raw_safetensors(header, data))
    _assert_one_line(
        *_run(capsys, "train", recipe_for(model_copy), "--run-dir", tmp_path / "run"),
        str(weights),
        "corrupt safetensors",
        needle,
    )
    assert not (tmp_path / "run").exists()
    _assert_one_line(
        *_run(capsys, "export", model_copy, "--quant", "f32", "--out", tmp_path / "x"),
        "corrupt safetensors",
        needle,
    )
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="corrupt safetensors"):
        load_quantized(model_copy, "q8_0")


def test_corrupt_training_bytes_of_a_run_are_one_line_in_export(capsys, tmp_path, tiny_llama_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "merged")
    (run / "recipe.yaml").write_text(
        yaml.safe_dump({"base_model": str(tiny_llama_dir), "method": {"quant_base": "q8_0"}})
    )
    bad = run / "trained-base.safetensors"
    bad.write_bytes(_raw_safetensors({"__metadata__": {"w": 1}, "w": F32_2}, b"\0" * 8))
    _assert_one_line(*_run(capsys, "export", run, "--quant", "q8_0"), str(bad), "corrupt safetensors")
    bad.write_bytes(_raw_safetensors({"__metadata__": {"w": "NOT_A_TYPE"}, "w": F32_2}, b"\0" * 8))
    _assert_one_line(*_run(capsys, "export", run, "--quant", "q8_0"), str(bad), "no GGML type")
    assert not (run / "export").exists()


# ---------------------------------------------------------------- item 9: config, tokenizer, data, recipe


def test_config_vocab_size_unequal_to_the_weights(capsys, tmp_path, model_copy, recipe_for):
    cfg = json.loads((model_copy / "config.json").read_text())
    rows = cfg["vocab_size"]
    cfg["vocab_size"] = rows + 100
    (model_copy / "config.json").write_text(json.dumps(cfg))
    _assert_one_line(
        *_run(capsys, "train", recipe_for(model_copy), "--run-dir", tmp_path / "run"),
        f"vocab_size {rows + 100}",
        f"{rows} rows",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ['{"foo": 1}', "[1, 2]", '{"model": {"type": "BPE"}}', '"text"'])
def test_tokenizer_json_of_the_wrong_structure(capsys, tmp_path, model_copy, recipe_for, content):
    (model_copy / "tokenizer.json").write_text(content)
    _assert_one_line(
        *_run(capsys, "train", recipe_for(model_copy), "--run-dir", tmp_path / "run"),
        "tokenizer.json",
        "not a tokenizer file",
    )
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_embedding(capsys, tmp_path, model_copy, recipe_for, small_jsonl):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_copy)
    rows = json.loads((model_copy / "config.json").read_text())["vocab_size"]
    tok.add_tokens([f"<extra_{i}>" for i in range(10)])
    tok.save_pretrained(model_copy)
    _assert_one_line(
        *_run(capsys, "train", recipe_for(model_copy), "--run-dir", tmp_path / "run"),
        f"{len(tok)} tokens",
        f"{rows} rows",
    )
    assert not (tmp_path / "run").exists()
    _assert_one_line(*_run(capsys, "eval", model_copy, "--data", small_jsonl), f"{len(tok)} tokens")


def test_deeply_nested_json_line_in_data(capsys, tmp_path, tiny_llama_dir, write_recipe):
    data = tmp_path / "deep.jsonl"
    data.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    _assert_one_line(
        *_run(capsys, "train", write_recipe(tiny_llama_dir, data), "--run-dir", tmp_path / "run"),
        f"{data}:2",
        "nested too deeply",
    )
    assert not (tmp_path / "run").exists()


def test_binary_recipe_file(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(bytes(range(256)) * 8)
    _assert_one_line(*_run(capsys, "train", recipe, "--run-dir", tmp_path / "run"), str(recipe))
    _assert_one_line(*_run(capsys, "plan", recipe), str(recipe))
    assert not (tmp_path / "run").exists()


def test_binary_recipe_in_a_run_dir(capsys, tmp_path, tiny_llama_dir, small_jsonl):
    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "merged")
    (run / "recipe.yaml").write_bytes(b"\xff\xfe\x00binary" * 50)
    _assert_one_line(*_run(capsys, "eval", run, "--data", small_jsonl), str(run / "recipe.yaml"), "corrupt")
    _assert_one_line(*_run(capsys, "export", run, "--quant", "f32"), str(run / "recipe.yaml"), "corrupt")
    assert not (run / "export").exists()


def test_lora_rank_larger_than_the_layers(capsys, tmp_path, tiny_llama_dir, recipe_for):
    recipe = recipe_for(
        tiny_llama_dir, method={"lora": {"rank": 4096, "alpha": 8, "targets": ["attn", "mlp"]}}
    )
    _assert_one_line(*_run(capsys, "train", recipe, "--run-dir", tmp_path / "run"), "rank 4096", "at most 32")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- item 9: eval and report


def test_eval_numbers_checked(capsys, tiny_llama_dir, small_jsonl):
    _assert_one_line(
        *_run(capsys, "eval", tiny_llama_dir, "--data", small_jsonl, "--max-seq-len", 100000),
        "--max-seq-len 100000",
        "256 positions",
    )
    _assert_one_line(
        *_run(capsys, "eval", tiny_llama_dir, "--data", small_jsonl, "--batch-size", 0), "--batch-size"
    )


@pytest.fixture
def report_run(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "report"))
    from runfixture import make_run

    run = tmp_path / "run"
    make_run(run)
    return run


@pytest.mark.parametrize("corruption", ["list line", "text step", "binary"])
def test_report_on_corrupt_metrics(capsys, report_run, corruption):
    metrics = report_run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    if corruption == "list line":
        lines.insert(1, "[1, 2, 3]")
        metrics.write_text("\n".join(lines) + "\n")
    elif corruption == "text step":
        lines.insert(1, '{"step": "seven", "loss": 1.0}')
        metrics.write_text("\n".join(lines) + "\n")
    else:
        metrics.write_bytes(b"\xff\xfe" * 100)
    (report_run / "report.html").unlink(missing_ok=True)
    _assert_one_line(*_run(capsys, "report", report_run), str(metrics))
    assert not (report_run / "report.html").exists()


@pytest.mark.parametrize("summary", ["[1, 2]", '{"hardware": 5}', "\xff not json"])
def test_report_with_a_corrupt_summary_leaves_it_out(capsys, report_run, summary):
    (report_run / "summary.json").write_text(summary, encoding="latin-1")
    code, err = _run(capsys, "report", report_run)
    assert code == 0 and "Traceback" not in err, err
    assert (report_run / "report.html").is_file()


# ---------------------------------------------------------------- item 10: CLI numbers


@pytest.mark.parametrize(
    "argv, needle",
    [
        (("--tokens", "0"), "--tokens must be between 1"),
        (("--tokens", "1e30"), "--tokens must be between 1"),
        (("--tokens", "ten"), "--tokens must be a whole number"),
        (("--deadline-h", "nan"), "--deadline-h must be a finite number"),
        (("--deadline-h", "0"), "--deadline-h must be positive"),
        (("--gpus", "0"), "--gpus must be between 1"),
        (("--pue", "0.5"), "--pue must be between 1"),
    ],
)
def test_plan_numbers_range_checked(capsys, tiny_llama_dir, argv, needle):
    _assert_one_line(*_run(capsys, "plan", "--model", tiny_llama_dir, *argv), needle)


def test_plan_table_columns_stay_apart_at_the_largest_token_count(capsys, tiny_llama_dir):
    assert main(["plan", "--model", str(tiny_llama_dir), "--tokens", "1e15"]) == 0
    out = capsys.readouterr().out
    training_table = out.split("assumptions:")[0]  # the serving table below has a "fits" column too
    rows = [line for line in training_table.splitlines() if line.rstrip().endswith(" yes")]
    assert len(rows) >= 3, out
    assert {len(line.split()) for line in rows} == {12}, rows  # name, 9 numbers (time has a unit), "yes"


# ---------------------------------------------------------------- item 9: a full disk, a read-only folder


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs at tmp_path/mnt; skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root with mount rights)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> None:
    """Write until the OS says ENOSPC (unbuffered, in shrinking chunks, so not a byte is left)."""
    with open(mnt / "filler", "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == 28, err


def _read_only(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    with pytest.raises(OSError):
        (mnt / "probe").write_text("x")  # really read-only, even for root


def test_full_disk_during_train_is_one_line(capsys, tmpfs, tiny_llama_dir, recipe_for):
    _fill(tmpfs)
    run = tmpfs / "run"
    _assert_one_line(
        *_run(capsys, "train", recipe_for(tiny_llama_dir), "--run-dir", run),
        str(run),
        "No space left on device",
    )
    _no_temp_files(tmpfs)


def test_full_disk_during_export_is_one_line(capsys, tmpfs, tiny_llama_dir):
    (tmpfs / "keep.txt").write_text("mine")
    _fill(tmpfs)
    out = tmpfs / "export"
    _assert_one_line(
        *_run(capsys, "export", tiny_llama_dir, "--quant", "f32", "--out", out),
        str(out),
        "No space left on device",
    )
    _no_temp_files(tmpfs)
    assert not (out / "model-f32.gguf").exists() and (tmpfs / "keep.txt").read_text() == "mine"


def test_read_only_run_dir_and_export_target(capsys, tmpfs, tiny_llama_dir, recipe_for):
    _read_only(tmpfs)
    run, out = tmpfs / "run", tmpfs / "export"
    _assert_one_line(
        *_run(capsys, "train", recipe_for(tiny_llama_dir), "--run-dir", run),
        str(run),
        "Read-only file system",
    )
    _assert_one_line(
        *_run(capsys, "export", tiny_llama_dir, "--quant", "f32", "--out", out),
        str(out),
        "Read-only file system",
    )
    _assert_one_line(
        *_run(capsys, "upcycle", tiny_llama_dir, "--experts", 2, "--out", tmpfs / "moe"),
        str(tmpfs / "moe"),
        "Read-only file system",
    )
