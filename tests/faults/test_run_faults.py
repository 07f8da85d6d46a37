"""Faults a real run meets, injected where they happen: SIGKILL at chosen phases, SIGTERM and
SIGINT, two trainers on one run dir, damaged checkpoints, NaN weights and losses, an
unwritable cache, temp files of a killed writer, data changed under a run.

Each asserts the exit code, one line on stderr and no traceback, that nothing was lost, and,
where the run can go on, that `--resume` ends bit-identical to an uninterrupted run. Faults
come from `GREENTUNE_FAULT` (see `greentune/faults.py`); one tiny recipe (4 steps, a
checkpoint every 2) is shared by all, and its uninterrupted run is the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from greentune.errors import UserError

STEPS = 4


def _recipe(path: Path, base, data, **train) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "data": {"train": str(data), "max_seq_len": 32},
                "method": {"lora": {"rank": 2, "alpha": 4, "dropout": 0.1}},
                "train": {
                    "steps": STEPS,
                    "batch_size": 2,
                    "lr": 2e-3,
                    "warmup": 1,
                    "checkpoint_every": 2,
                    **train,
                },
                "energy": {"measure_savings": False},
            }
        )
    )
    return path


def _env(fault=None, **extra):
    env = {k: v for k, v in os.environ.items() if k != "GREENTUNE_FAULT"}
    if fault:
        env["GREENTUNE_FAULT"] = fault
    env.update(extra)
    return env


def _cli(*args, fault=None, env=None):
    cmd = [sys.executable, "-m", "greentune", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(fault), timeout=600)


def _train(recipe, run, *extra, fault=None, env=None):
    return _cli("train", recipe, "--run-dir", run, "--quiet", *extra, fault=fault, env=env)


def _one_line(stderr: str) -> str:
    """The single non-empty stderr line (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run, ref):
    a, b = _adapter(ref), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(run) == _losses(ref)


def _greentune_temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".greentune-" in p.name)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_llama_dir, text_jsonl):
    return _recipe(tmp_path_factory.mktemp("faults") / "r.yaml", tiny_llama_dir, text_jsonl)


@pytest.fixture(scope="module")
def reference(recipe):
    run = recipe.parent / "reference"
    r = _train(recipe, run)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def killed_in_merge(recipe):
    """A run SIGKILLed while writing merged/: both checkpoints (step-2, step-4) complete."""
    run = recipe.parent / "killed-in-merge"
    r = _train(recipe, run, fault="write:merged")
    assert r.returncode == -signal.SIGKILL
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-2", "step-4"]
    return run


# ---------------------------------------------------------------- SIGKILL at chosen phases


@pytest.mark.slow
@pytest.mark.parametrize("again", [["--resume"], []], ids=["resume", "plain-rerun"])
def test_kill_in_the_first_checkpoint_write_does_not_leave_the_run_stuck(recipe, reference, tmp_path, again):
    run = tmp_path / "run"
    r = _train(recipe, run, fault="checkpoint-write:2")
    assert r.returncode == -signal.SIGKILL
    assert not [p for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")]
    r = _train(recipe, run, *again)
    assert r.returncode == 0, r.stderr[-3000:]
    if again:
        assert "no complete checkpoint" in _one_line(r.stderr) and "starting from step 0" in r.stderr
    _assert_same_run(run, reference)
    assert not _greentune_temps(run) and not (run / ".greentune.lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["phase:load", "write:merged", "write:report.html"])
def test_kill_at_a_phase_then_resume_is_bit_identical(recipe, reference, tmp_path, fault):
    run = tmp_path / "run"
    r = _train(recipe, run, fault=fault)
    assert r.returncode == -signal.SIGKILL
    if fault == "write:merged":  # the merge's temp folder is left, under greentune's own temp name
        assert any(n.startswith(".merged.greentune-") for n in _greentune_temps(run))
    r = _train(recipe, run, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(run, reference)
    assert not _greentune_temps(run)
    assert (run / "summary.json").is_file() and (run / "report.html").is_file()


@pytest.mark.slow
def test_kill_during_a_standalone_export_leaves_nothing_after_the_rerun(reference, tmp_path):
    import gguf

    out = tmp_path / "export"
    out.mkdir()
    mine = out / ".model-q8_0.gguf.mine.tmp"  # not greentune's name: must survive
    mine.write_text("the user's")
    r = _cli(
        "export",
        reference,
        "--format",
        "gguf",
        "--quant",
        "q8_0",
        "--out",
        out,
        fault="write:model-q8_0.gguf",
    )
    assert r.returncode == -signal.SIGKILL
    assert len(_greentune_temps(out)) == 1 and not (out / "model-q8_0.gguf").exists()
    r = _cli("export", reference, "--format", "gguf", "--quant", "q8_0", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not _greentune_temps(out) and mine.read_text() == "the user's"
    assert len(gguf.GGUFReader(out / "model-q8_0.gguf").tensors) > 0


# ---------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_finishes_the_step_checkpoints_and_resumes_bit_identically(
    recipe, reference, tmp_path, sig, code
):
    run = tmp_path / "run"
    r = _train(recipe, run, fault=f"step:3@{sig}")  # the signal arrives during step 3
    assert r.returncode == code, r.stderr[-3000:]
    assert f"stopped by {sig} after step 3" in _one_line(r.stderr)
    assert (run / "checkpoints" / "step-3").is_dir() and len(_losses(run)) == 3
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert any(row["phase"] == "train" for row in ledger)  # the last stretch's energy is recorded
    assert not (run / "merged").exists() and not (run / "summary.json").exists()
    r = _train(recipe, run, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(run, reference)


# ---------------------------------------------------------------- two trainers


@pytest.mark.slow
def test_a_second_trainer_on_the_run_dir_is_refused_naming_the_holder(recipe, reference, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "greentune", "train", str(recipe), "--run-dir", str(run), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env("step:2@SIGSTOP"),
    )  # frozen mid-run, holding the lock
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.1)
        for extra in ([], ["--resume"]):
            r = _train(recipe, run, *extra)
            assert r.returncode == 2
            assert f"in use by another greentune process (PID {first.pid})" in _one_line(r.stderr)
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    _assert_same_run(run, reference)  # nothing interleaved


# ---------------------------------------------------------------- damaged checkpoints


def _truncate_trainable(ck: Path):
    f = ck / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _remove_rng(ck: Path):
    (ck / "rng.safetensors").unlink()


def _remove_state(ck: Path):
    (ck / "state.json").unlink()


def _bad_state(ck: Path):
    (ck / "state.json").write_text('{"step": 4, "tokens": ')


DAMAGE = {
    "truncated-trainable": _truncate_trainable,
    "no-rng": _remove_rng,
    "no-state": _remove_state,
    "bad-state-json": _bad_state,
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated-trainable", "bad-state-json"])
def test_resume_falls_back_past_a_damaged_checkpoint_bit_identically(
    recipe, reference, killed_in_merge, tmp_path, damage
):
    run = tmp_path / "run"
    shutil.copytree(killed_in_merge, run)
    DAMAGE[damage](run / "checkpoints" / "step-4")
    r = _train(recipe, run, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    line = _one_line(r.stderr)
    assert "step-4" in line and "resuming from step-2" in line
    _assert_same_run(run, reference)
    assert (run / "checkpoints" / "step-4.damaged").is_dir()  # kept for inspection, out of the listing


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_names_each_kind_of_damage(tmp_path, damage):
    from greentune.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    _write_checkpoints(root, steps=(2, 4))
    DAMAGE[damage](root / "step-4")
    reason = ckpt.verify_checkpoint(root / "step-4")
    assert (
        reason
        and {
            "truncated-trainable": "trainable.safetensors",
            "no-rng": "rng.safetensors",
            "no-state": "state.json",
            "bad-state-json": "state.json",
        }[damage]
        in reason
    )
    found, skipped = ckpt.newest_valid(root)
    assert found == root / "step-2" and [p.name for p, _ in skipped] == ["step-4"]
    assert ckpt.list_checkpoints(root) == [root / "step-2"]


def test_no_whole_checkpoint_means_none(tmp_path):
    from greentune.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    _write_checkpoints(root, steps=(2,))
    (root / "step-2" / "optimizer.safetensors").write_bytes(b"\0" * 10)
    assert ckpt.newest_valid(root)[0] is None


def _write_checkpoints(root: Path, steps):
    from greentune.train import checkpoint as ckpt

    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=1e-3)
    for step in steps:
        w.grad = torch.ones_like(w)
        opt.step()
        ckpt.save_checkpoint(root, step, {"w": w}, opt, {"tokens": step, "seconds": 1.0, "data": {}})


# ---------------------------------------------------------------- NaN


def _assert_nothing_downstream(run: Path, cache: Path):
    for name in ("adapter", "merged", "export", "summary.json", "calibration.json", "report.html"):
        assert not (run / name).exists(), name
    assert not (cache / "calibration.json").exists()


@pytest.mark.slow
def test_a_diverging_run_stops_with_its_last_finite_state(tmp_path, tiny_llama_dir, text_jsonl):
    recipe = _recipe(tmp_path / "r.yaml", tiny_llama_dir, text_jsonl, lr=1e30)
    run, cache = tmp_path / "run", tmp_path / "cache"
    r = _train(recipe, run, env=_env(GREENTUNE_CACHE=str(cache)))
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert "non-finite loss" in line and "last finite state is" in line
    saved = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1
    assert all(
        torch.isfinite(t).all()
        for t in load_file(str(run / "checkpoints" / saved[0] / "trainable.safetensors")).values()
    )
    _assert_nothing_downstream(run, cache)


@pytest.mark.slow
def test_nan_base_weights_stop_at_the_first_step(tmp_path, tiny_llama_dir, text_jsonl):
    base = tmp_path / "nan-model"
    shutil.copytree(tiny_llama_dir, base)
    weights = load_file(str(base / "model.safetensors"))
    name = next(k for k in weights if "layers.0.mlp" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    recipe = _recipe(tmp_path / "r.yaml", base, text_jsonl)
    run, cache = tmp_path / "run", tmp_path / "cache"
    r = _train(recipe, run, env=_env(GREENTUNE_CACHE=str(cache)))
    assert r.returncode == 2
    assert "non-finite loss nan at step 1. No checkpoint was written" in _one_line(r.stderr)
    assert not list((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else True
    _assert_nothing_downstream(run, cache)


# ---------------------------------------------------------------- optional bookkeeping


@pytest.mark.slow
@pytest.mark.parametrize("var", ["GREENTUNE_CACHE", "HOME"])
def test_an_unwritable_cache_is_one_warning_not_a_failed_run(recipe, tmp_path, var):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = _env(**{var: str(blocker / "cache")})
    if var == "HOME":
        env.pop("GREENTUNE_CACHE", None)
    run = tmp_path / "run"
    r = _train(recipe, run, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.strip()]  # one warning per cache, no traceback
    assert len(warnings) == 2 and "Traceback" not in r.stderr, r.stderr
    assert "token cache" in warnings[0] and "not recorded as a planner calibration" in warnings[1], warnings
    assert (run / "summary.json").is_file() and (run / "report.html").is_file()


# ---------------------------------------------------------------- the run dir: lock, temps, data


def test_run_dir_lock_is_exclusive_and_names_the_holder(tmp_path):
    from greentune.runlock import LOCK_NAME, RunLock

    run = tmp_path / "run"
    lock = RunLock.acquire(run)
    with pytest.raises(UserError, match=f"in use by another greentune process \\(PID {os.getpid()}\\)"):
        RunLock.acquire(run)
    lock.release()
    assert not run.exists()  # created only for the lock, left empty: removed
    run.mkdir()
    (run / "mine.txt").write_text("x")
    RunLock.acquire(run).release()
    assert sorted(p.name for p in run.iterdir()) == ["mine.txt"] and LOCK_NAME != "mine.txt"


def test_a_lock_dies_with_its_process(tmp_path):
    from greentune.runlock import RunLock

    run = tmp_path / "run"
    code = f"from greentune.runlock import RunLock; RunLock.acquire({str(run)!r}); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    RunLock.acquire(run).release()  # the holder exited without releasing: the lock is free


def test_only_a_dead_greentune_writers_temps_are_removed(tmp_path):
    from greentune.fsutil import remove_stale_temps, temp_prefix

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    stale_dir = tmp_path / f".merged.greentune-{dead}-abc.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x")
    stale_file = tmp_path / f".model-q8_0.gguf.greentune-{dead}-k2.tmp"
    stale_file.write_bytes(b"x")
    alive = tmp_path / (temp_prefix(tmp_path / "summary.json") + "z.tmp")  # this process's: in use
    keep = [tmp_path / ".merged.abc.tmp", tmp_path / "notes.tmp", tmp_path / f"greentune-{dead}-x.tmp", alive]
    for p in keep:
        p.write_text("mine")
    assert sorted(remove_stale_temps(tmp_path)) == sorted([stale_dir, stale_file])
    assert all(p.exists() for p in keep) and not stale_dir.exists() and not stale_file.exists()


def test_resume_on_changed_data_is_refused(tmp_path, tiny_llama_dir, text_jsonl):
    from greentune.recipe import load_recipe
    from greentune.train.claim import claim_run_dir as _claim_run_dir
    from greentune.train.distributed import SINGLE

    data = tmp_path / "train.jsonl"
    shutil.copy(text_jsonl, data)
    recipe = load_recipe(_recipe(tmp_path / "r.yaml", tiny_llama_dir, data))
    run = tmp_path / "run"
    _claim_run_dir(run, recipe, False, SINGLE).release()
    _claim_run_dir(run, recipe, True, SINGLE).release()  # unchanged: accepted
    text = data.read_text()
    data.write_text(text[:100] + ("X" if text[100] != "X" else "Y") + text[101:])  # same size, in place
    with pytest.raises(UserError, match="changed since this run started"):
        _claim_run_dir(run, recipe, True, SINGLE)
    assert not (run / ".greentune.lock").exists()


def test_a_plain_rerun_is_refused_only_with_progress_to_lose(tmp_path, tiny_llama_dir, text_jsonl):
    from greentune.recipe import load_recipe
    from greentune.train.claim import prepare_run_dir

    recipe = load_recipe(_recipe(tmp_path / "r.yaml", tiny_llama_dir, text_jsonl))
    run = tmp_path / "run"
    prepare_run_dir(run, recipe, False)
    (run / "checkpoints" / ".step-2.greentune-1-x.tmp").mkdir(parents=True)  # a first checkpoint, killed
    prepare_run_dir(run, recipe, False)
    _write_checkpoints(run / "checkpoints", steps=(2,))
    with pytest.raises(UserError, match="already holds a run"):
        prepare_run_dir(run, recipe, False)


def test_a_signal_is_a_stop_request_and_a_second_one_stops_at_once():
    from greentune.train.signals import StopSignals

    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # only noted: the step in flight goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous
