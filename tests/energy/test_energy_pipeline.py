"""The energy ledger through real runs: budget stop and resume, SIGKILL, phases, report."""

import json
import subprocess
import sys
import time

import yaml


def _train(recipe, run_dir, *extra):
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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _rows(run):
    return [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]


def _recipe(tmp_path, base, data, **energy):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "data": {"train": str(data), "max_seq_len": 64},
                "method": {"lora": {"rank": 4, "alpha": 8}},
                "train": {"steps": 12, "batch_size": 4, "lr": 1e-3, "warmup": 2, "checkpoint_every": 4},
                "energy": {
                    "region": "FR",
                    "pue": 1.2,
                    "interval_steps": 2,
                    "measure_savings": False,
                    **energy,
                },
            }
        )
    )
    return path


def test_budget_stops_with_a_checkpoint_and_resume_with_a_higher_budget_finishes(
    tmp_path, tiny_llama_dir, text_jsonl
):
    recipe = _recipe(tmp_path, tiny_llama_dir, text_jsonl, budget_kwh=1e-9)
    run = tmp_path / "run"
    r = _train(recipe, run)
    assert r.returncode == 0, r.stderr
    assert "stopped at step 1" in r.stdout and "budget" in r.stdout + r.stderr
    assert (run / "checkpoints" / "step-1").is_dir() and not (run / "adapter").exists()
    recipe.write_text(recipe.read_text().replace("budget_kwh: 1.0e-09", "budget_kwh: 1.0"))
    r = _train(recipe, run, "--resume")
    assert r.returncode == 0, r.stderr
    rows = _rows(run)
    assert {"load", "adapt", "train", "eval", "merge"} <= {row["phase"] for row in rows}
    for row in rows:  # the ledger's arithmetic, row by row
        assert abs(row["it_kwh"] * 3.6e6 - sum(row["joules"].values())) < 1e-9
        assert abs(row["facility_kwh"] - 1.2 * row["it_kwh"]) < 1e-15
        assert abs(row["kg_co2e"] - row["facility_kwh"] * row["grid_g_per_kwh"] / 1000) < 1e-15
        assert row["region"] == "FR" and set(row["source"].values()) <= {
            "estimate",
            "rapl",
            "nvml",
            "nvml-power",
            "apple",
        }
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    joules = [m["joules"] for m in metrics]
    assert all(b >= a for a, b in zip(joules, joules[1:])) and all("j_per_token" in m for m in metrics)
    report = json.loads((run / "report.json").read_text())
    assert report and (run / "report.html").read_text().count("<svg") >= 2


def test_sigkill_mid_training_keeps_the_ledger_readable_and_resume_carries_totals(
    tmp_path, tiny_llama_dir, text_jsonl
):
    recipe = _recipe(tmp_path, tiny_llama_dir, text_jsonl)
    run = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "greentune", "train", str(recipe), "--run-dir", str(run), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-4").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.kill()
    p.wait()
    before = [r for r in _rows(run) if r["phase"] == "train"]
    assert before  # intervals recorded before the kill survive it
    r = _train(recipe, run, "--resume")
    assert r.returncode == 0, r.stderr
    after = [r for r in _rows(run) if r["phase"] == "train"]
    assert after[: len(before)] == before and len(after) > len(before)
