"""Training: the loss falls on real text, and a SIGKILLed run resumes bit-identically."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


def _train(recipe, run_dir, *extra, env=None):
    cmd = [
        sys.executable,
        "-m",
        "greentune",
        "train",
        str(recipe),
        "--run-dir",
        str(run_dir),
        "--quiet",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_llama_dir, text_jsonl):
    import yaml

    d = tmp_path_factory.mktemp("ref")
    recipe = d / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_llama_dir),
                "data": {"train": str(text_jsonl), "max_seq_len": 64},
                "method": {"lora": {"rank": 4, "alpha": 8, "dropout": 0.1}},
                "train": {"steps": 12, "batch_size": 4, "lr": 2e-3, "warmup": 2, "checkpoint_every": 5},
            }
        )
    )
    r = _train(recipe, d / "run")
    assert r.returncode == 0, r.stderr
    return recipe, d / "run"


def test_run_dir_holds_recipe_metrics_adapter_merged(reference_run):
    _, run = reference_run
    for name in (
        "recipe.yaml",
        "metrics.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "merged/config.json",
        "merged/model.safetensors",
        "summary.json",
        "calibration.json",
        "ledger.jsonl",
        "savings.json",
        "report.html",
    ):
        assert (run / name).exists(), name
    m = _metrics(run)
    assert [x["step"] for x in m] == list(range(1, 13))
    assert m[-1]["tokens"] == sum(1 for _ in m) * 4 * 64


@pytest.mark.parametrize("fault", ["checkpoint-write:10", None])
def test_sigkill_then_resume_is_bit_identical(reference_run, tmp_path, fault):
    recipe, ref = reference_run
    run = tmp_path / "run"
    if fault:  # killed halfway through writing the step-10 checkpoint
        r = _train(recipe, run, env={"GREENTUNE_FAULT": fault})
        assert r.returncode == -9
        assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == [
            "step-5"
        ]
    else:  # killed from outside at an arbitrary moment after the first checkpoint
        p = subprocess.Popen(
            [sys.executable, "-m", "greentune", "train", str(recipe), "--run-dir", str(run), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while not (run / "checkpoints" / "step-5").exists() and time.time() < deadline:
            time.sleep(0.05)
        p.kill()
        p.wait()
    r = _train(recipe, run, "--resume")
    assert r.returncode == 0, r.stderr
    a, b = _adapter(ref), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in _metrics(run)] == [m["loss"] for m in _metrics(ref)]


def test_loss_goes_down_on_real_text(tmp_path, pretrained_llama_dir, code_jsonl, write_recipe):
    """LoRA on a (briefly) pretrained base adapts it to real Python source: train and held-out loss fall."""
    from greentune.evaluate import evaluate_path
    from greentune.pipeline import train

    recipe = write_recipe(
        pretrained_llama_dir,
        code_jsonl,
        method={"lora": {"rank": 8, "alpha": 16}},
        train={"steps": 30, "lr": 1e-2, "warmup": 3, "checkpoint_every": 30},
    )
    result = train(recipe, run_dir=tmp_path / "run", progress=False)
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last)
    base_eval = evaluate_path(pretrained_llama_dir, code_jsonl, max_seq_len=64)["loss"]
    assert result.eval_loss < base_eval - 0.1, (base_eval, result.eval_loss)
