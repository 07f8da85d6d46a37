"""Data-parallel training through torchrun on CPU (gloo), as a user runs it: `greentune
train --nproc 2`, in spawned processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _recipe(path, base, data, method=None, **train):
    recipe = {
        "base_model": str(base),
        "data": {"train": str(data), "max_seq_len": 64},
        "method": {
            "lora": {"rank": 4, "alpha": 8, "targets": ["attn", "mlp"], "dropout": 0.0},
            **(method or {}),
        },
        "train": {"steps": 6, "batch_size": 4, "lr": 2e-3, "warmup": 1, "checkpoint_every": 3, **train},
        "energy": {"measure_savings": False},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train(recipe, run_dir, nproc=None, *extra, fault=None, check=True):
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
    if nproc:
        cmd += ["--nproc", str(nproc)]
    env = dict(os.environ)
    env.pop("GREENTUNE_FAULT", None)
    if fault:
        env["GREENTUNE_FAULT"] = fault
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_adapters_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_llama_dir, text_jsonl):
    """The same recipe on 1 rank (batch 4) and on 2 ranks (2 rows each, in 2 micro-batches)."""
    d = tmp_path_factory.mktemp("ddp")
    one = _recipe(d / "one.yaml", tiny_llama_dir, text_jsonl)
    two = _recipe(d / "two.yaml", tiny_llama_dir, text_jsonl, grad_accum=2)
    _train(one, d / "one")
    _train(two, d / "two", 2)
    return d


def test_two_ranks_match_one_rank(ddp_runs):
    one, two = _metrics(ddp_runs / "one"), _metrics(ddp_runs / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["tokens"] == a["tokens"]  # the global batch, summed over ranks
    _assert_adapters_close(_adapter(ddp_runs / "one"), _adapter(ddp_runs / "two"))
    summary = json.loads((ddp_runs / "two" / "summary.json").read_text())
    digests = summary["outputs"]["adapter_digest_by_rank"]
    assert summary["ranks"] == 2 and len(digests) == 2 and digests[0] == digests[1]


def test_ledger_has_one_row_per_window_with_every_rank(ddp_runs):
    rows = [json.loads(line) for line in (ddp_runs / "two" / "ledger.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    assert train and all(any(k.startswith("rank1/") for k in r["joules"]) for r in train)
    assert all("cpu" in r["joules"] for r in train)
    # after training rank 0 works alone: its later rows carry only its own components
    merge = next(r for r in rows if r["phase"] == "merge")
    assert not any(k.startswith("rank1/") for k in merge["joules"])


def test_killed_rank_stops_the_job_and_resume_continues(ddp_runs):
    run = ddp_runs / "killed"
    proc = _train(ddp_runs / "two.yaml", run, 2, fault="checkpoint-write:6", check=False)
    assert proc.returncode != 0
    assert "rank 0 of 2 failed (signal 9)" in proc.stderr
    assert (run / "checkpoints" / "step-3").is_dir() and not (run / "checkpoints" / "step-6").exists()
    _train(ddp_runs / "two.yaml", run, 2, "--resume")
    assert _adapter(run).keys() == _adapter(ddp_runs / "two").keys()
    for k, v in _adapter(run).items():
        assert torch.equal(v, _adapter(ddp_runs / "two")[k]), k


def test_relora_under_ddp_keeps_the_ranks_identical(tmp_path, tiny_llama_dir, text_jsonl):
    """Dropout differs per rank; ReLoRA's re-initialised factors must not."""
    recipe = _recipe(
        tmp_path / "relora.yaml",
        tiny_llama_dir,
        text_jsonl,
        method={
            "lora": {"rank": 4, "alpha": 8, "targets": ["attn", "mlp"], "dropout": 0.1},
            "relora": {"merge_every": 2, "restart_warmup": 1},
        },
    )
    _train(recipe, tmp_path / "run", 2)
    digests = json.loads((tmp_path / "run" / "summary.json").read_text())["outputs"]["adapter_digest_by_rank"]
    assert digests[0] == digests[1]
    phases = [
        json.loads(line)["phase"] for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()
    ]
    assert phases.count("merge") >= 3  # 2 ReLoRA merges during training + the final merge


def test_ddp_checkpoint_resumes_on_another_number_of_ranks(ddp_runs):
    run = ddp_runs / "one-then-two"
    proc = _train(ddp_runs / "one.yaml", run, fault="checkpoint-write:6", check=False)
    assert proc.returncode != 0 and (run / "checkpoints" / "step-3").is_dir()
    _train(ddp_runs / "one.yaml", run, 2, "--resume")
    _assert_adapters_close(_adapter(run), _adapter(ddp_runs / "one"))


def test_fsdp_trains_a_quantised_moe_and_resumes(tmp_path, tiny_mixtral_dir, text_jsonl):
    recipe = _recipe(
        tmp_path / "fsdp.yaml",
        tiny_mixtral_dir,
        text_jsonl,
        parallel="fsdp",
        steps=8,
        checkpoint_every=4,
        lr=5e-3,
        method={
            "quant_base": "q4_0",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["attn", "experts"]},
        },
    )
    _train(recipe, tmp_path / "run", 2)
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    ckpt = tmp_path / "run" / "checkpoints" / "step-8"
    shards = sorted(p.name for p in (ckpt / "sharded").iterdir() if p.suffix == ".safetensors")
    assert len(shards) == 2, shards  # one file of shards per rank, safetensors
    assert json.loads((ckpt / "state.json").read_text())["world"] == 2

    # resume from step 4 (as if killed after it): bit-identical to the uninterrupted run
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-8")
    _train(recipe, resumed, 2, "--resume")
    for k, v in _adapter(resumed).items():
        assert torch.equal(v, _adapter(tmp_path / "run")[k]), k
    proc = _train(recipe, resumed, None, "--resume", check=False)  # FSDP shards need the same world
    assert proc.returncode == 2 and "holds FSDP shards of 2 ranks" in proc.stderr


def test_ranks_with_different_recipes_are_refused(tmp_path, tiny_llama_dir, text_jsonl):
    for rank, lr in ((0, 1e-3), (1, 2e-3)):
        _recipe(tmp_path / f"recipe{rank}.yaml", tiny_llama_dir, text_jsonl, lr=lr)
    script = tmp_path / "per_rank.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys
        from greentune.cli import main
        rank = os.environ["RANK"]
        recipe = r"{tmp_path}/recipe" + rank + ".yaml"
        sys.exit(main(["train", recipe, "--run-dir", r"{tmp_path}/run", "--quiet"]))
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "ranks [1] were given a different recipe than rank 0" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nproc_must_be_positive(tmp_path, tiny_llama_dir, text_jsonl):
    proc = _train(
        _recipe(tmp_path / "r.yaml", tiny_llama_dir, text_jsonl),
        tmp_path / "run",
        None,
        "--nproc",
        "0",
        check=False,
    )
    assert (
        proc.returncode == 2 and proc.stderr.strip() == "greentune: error: --nproc must be at least 1, got 0"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 3}, "must divide evenly over 2 ranks"),
        ({"parallel": "fsdp", "method": {"relora": {"merge_every": 2}}}, "use train.parallel ddp for ReLoRA"),
    ],
)
def test_bad_distributed_recipes_get_one_line(tmp_path, tiny_llama_dir, text_jsonl, change, message):
    recipe = _recipe(tmp_path / "bad.yaml", tiny_llama_dir, text_jsonl, **change)
    proc = _train(recipe, tmp_path / "run", 2, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr.split("greentune: error")[-1]


LEDGER_SCRIPT = '''
import json, sys
from pathlib import Path
from greentune.energy import Factors, Ledger, Meter
from greentune.energy.components import Component
from greentune.train.energy_hook import EnergyHook
from greentune.train import distributed

class Counter(Component):
    """A meter whose joules this script sets: rank r draws (r + 1) x 10 J per step on 'cpu'
    and, on rank 1 only, 7 J per step on 'gpu:1'."""
    def __init__(self, name, per_step):
        self.name, self.source, self.per_step, self.value = name, "nvml", per_step, 0.0
    def read(self):
        return self.value

ctx = distributed.init_from_env()
comps = [Counter("cpu", 10.0 * (ctx.rank + 1))] + ([Counter("gpu:1", 7.0)] if ctx.rank == 1 else [])
meter = Meter(comps, poll_interval_s=0, sync=None)
ledger = Ledger(sys.argv[1], Factors.for_region("FR"), ctx=ctx)
hook = EnergyHook(meter, ledger, interval_steps=2, ctx=ctx)
hook.on_start(0)
metrics = []
for step in range(1, 6):
    for c in comps:
        c.value += c.per_step
    metrics.append(hook.after_step(step, None))
hook.on_end(5)
mine = {c.name: c.read() for c in comps}
every = ctx.gather(mine)
if ctx.is_main:
    Path(sys.argv[1], "meters.json").write_text(json.dumps({"meters": every, "metrics": metrics}))
distributed.close(ctx)
'''


def test_merged_ledger_totals_equal_the_sum_of_the_rank_meters(tmp_path):
    script = tmp_path / "ledger_ranks.py"
    script.write_text(LEDGER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from greentune.energy import Factors, Ledger

    totals = Ledger(tmp_path, Factors.for_region("FR")).totals()
    seen = json.loads((tmp_path / "meters.json").read_text())
    meters = seen["meters"]
    assert meters == [{"cpu": 50.0}, {"cpu": 100.0, "gpu:1": 35.0}]
    assert totals["joules"] == pytest.approx({"cpu": 50.0, "rank1/cpu": 100.0, "rank1/gpu:1": 35.0})
    assert totals["it_kwh"] == pytest.approx(185.0 / 3.6e6)
    assert totals["rows"] == 3  # one row per window (steps 1-2, 3-4, 5), not one per rank
    # the meter is read at the ledger interval (steps 2 and 4; step 5 at the end), and the joules
    # per step there are the whole job's: 10 + 20 + 7 J
    assert [m.get("step_joules") for m in seen["metrics"]] == [
        None,
        pytest.approx(37.0),
        None,
        pytest.approx(37.0),
        None,
    ]
    assert seen["metrics"][3]["joules"] == pytest.approx(4 * 37.0)


def test_rank_slices_cover_the_global_batch_once():
    from greentune.train.distributed import DistContext, rank_slice

    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(10).view(5, 2)}
    parts = [rank_slice(batch, DistContext(rank=r, world=2)) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert [len(p["labels"]) for p in parts] == [2, 3]


def test_every_rank_makes_grad_accum_forward_passes_even_in_a_short_batch():
    from greentune.train.distributed import DistContext
    from greentune.train.loop import _micro_batches

    batch = {"input_ids": torch.arange(3).view(3, 1)}  # the short last batch of an epoch
    parts = [_micro_batches(batch, DistContext(rank=r, world=2), 2) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    assert parts[0][0] is None and parts[0][1]["input_ids"].tolist() == [[0]]
    assert [mb["input_ids"].tolist() for mb in parts[1]] == [[[1]], [[2]]]


def test_quantised_weights_become_frozen_parameters_for_fsdp(tiny_llama_dir):
    from greentune.quant import load_quantized
    from greentune.train.distributed import frozen_buffers_to_params_

    model = load_quantized(str(tiny_llama_dir), "q8_0")
    ids = torch.randint(0, 100, (1, 8))
    before = model(input_ids=ids).logits
    keys = set(model.state_dict())
    n = frozen_buffers_to_params_(model)
    assert n > 0 and set(model.state_dict()) == keys
    frozen = [p for name, p in model.named_parameters() if name.endswith("qweight")]
    assert len(frozen) == n and all(p.dtype == torch.uint8 and not p.requires_grad for p in frozen)
    assert torch.equal(model(input_ids=ids).logits, before)
