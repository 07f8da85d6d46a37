"""The CUDA paths: bf16 compute with fp32 LoRA masters, the NVML energy meter, CUDA RNG state
in checkpoints, the quantised formats and the sparse experts on the GPU.

CI has no GPU, so these are skipped there; run them where an NVIDIA GPU is:

    python -m pytest tests/gpu -q -s          # benchmarks/gpu_check.sh does this

With ``GREENTUNE_GPU_TESTS_ON_CPU=1`` the same tests run on the CPU (fp32, estimated energy):
that checks the tests themselves on a machine without a GPU. ``GREENTUNE_GPU_FACTS=FILE``
appends what they observed beyond pass/fail (bit-identity on the GPU, errors) as JSON lines.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

ON_CPU = os.environ.get("GREENTUNE_GPU_TESTS_ON_CPU") == "1"
pytestmark = pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()), reason="needs a CUDA GPU")
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
DTYPE = torch.float32 if ON_CPU else torch.bfloat16
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": ""} if ON_CPU else {}


def _fact(name: str, value) -> None:
    line = json.dumps({"fact": name, "value": value, "device": str(DEVICE)})
    print(line)
    if os.environ.get("GREENTUNE_GPU_FACTS"):
        with open(os.environ["GREENTUNE_GPU_FACTS"], "a") as f:
            f.write(line + "\n")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def _recipe(tmp_path, base, data, *, method, train, energy=None, name="r.yaml"):
    path = tmp_path / name
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "data": {"train": str(data), "max_seq_len": 64},
                "method": method,
                "train": {"batch_size": 8, "warmup": 3, **train},
                "energy": {"measure_savings": False, **(energy or {})},
            }
        )
    )
    return path


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ledger(run):
    return [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]


def test_lora_trains_in_bf16_with_fp32_masters_and_nvml_energy(tmp_path, pretrained_llama_dir, code_jsonl):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from greentune.pipeline import train

    recipe = _recipe(
        tmp_path,
        pretrained_llama_dir,
        code_jsonl,
        method={"lora": {"rank": 8, "alpha": 16, "targets": ["attn", "mlp"]}},
        train={"steps": 30, "lr": 3e-3, "checkpoint_every": 30},
        energy={"measure_savings": True},
    )
    run = tmp_path / "run"
    train(recipe, run_dir=run, progress=False)
    losses = _losses(run)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    merged_cfg = json.loads((run / "merged" / "config.json").read_text())
    assert merged_cfg.get("dtype", merged_cfg.get("torch_dtype")) == str(DTYPE).removeprefix("torch.")

    rows = _ledger(run)
    train_rows = [r for r in rows if r["phase"] == "train"]
    if not ON_CPU:
        assert all(r["source"].get("gpu:0") in ("nvml", "nvml-power") for r in train_rows), train_rows[0]
        gpu_j = sum(r["joules"]["gpu:0"] for r in train_rows)
        assert gpu_j > 0
        _fact(
            "train_gpu_joules",
            {
                "gpu:0": gpu_j,
                "source": train_rows[0]["source"]["gpu:0"],
                "seconds": sum(r["seconds"] for r in train_rows),
            },
        )
        savings = json.loads((run / "savings.json").read_text())
        assert "torch.cuda.max_memory_allocated" in json.dumps(savings), savings
        _fact("savings", savings)

    # PEFT applies our adapter as we did: merged/ is close to base+adapter, far from the base
    ids = torch.randint(0, 500, (2, 48))
    base = AutoModelForCausalLM.from_pretrained(pretrained_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, run / "adapter")(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)(
            input_ids=ids
        ).logits
    _fact("merged_vs_peft_rel", {"merged_vs_peft": _rel(merged, peft), "base_vs_peft": _rel(plain, peft)})
    assert _rel(merged, peft) < 2e-2
    assert _rel(merged, peft) < 0.25 * _rel(plain, peft)


def test_sigkill_during_a_checkpoint_write_resumes_on_the_gpu(tmp_path, tiny_llama_dir, text_jsonl):
    """The CUDA RNG state (dropout) travels in the checkpoint: the resumed run matches."""
    recipe = _recipe(
        tmp_path,
        tiny_llama_dir,
        text_jsonl,
        method={"lora": {"rank": 4, "alpha": 8, "dropout": 0.1}},
        train={"steps": 12, "lr": 2e-3, "checkpoint_every": 5},
    )

    def run(run_dir, *extra, env=None):
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
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, **CPU_ONLY_ENV, **(env or {})},
        )

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run(ref).returncode == 0
    r = run(killed, env={"GREENTUNE_FAULT": "checkpoint-write:10"})
    assert r.returncode == -9, r.stderr
    r = run(killed, "--resume")
    assert r.returncode == 0, r.stderr
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(_rel(b[k], a[k]) for k in a if a[k].norm() > 0)
    identical = all(torch.equal(a[k], b[k]) for k in a)
    _fact(
        "resume_after_sigkill",
        {
            "bit_identical": identical,
            "worst_rel_diff": worst,
            "losses_equal": _losses(ref) == _losses(killed),
        },
    )
    assert worst < 1e-2


@pytest.mark.parametrize("fixture", ["tiny_mixtral_dir", "tiny_qwen2_moe_dir"])
def test_sparse_experts_match_transformers_eager(fixture, request):
    import transformers as tf

    from greentune.moe import replace_experts_

    ref = tf.AutoModelForCausalLM.from_pretrained(
        request.getfixturevalue(fixture), dtype=DTYPE, experts_implementation="eager"
    ).to(DEVICE)
    ours = copy.deepcopy(ref)
    assert replace_experts_(ours) == 2
    ids = torch.randint(0, ref.config.vocab_size, (4, 64), device=DEVICE)

    def fwd_bwd(model):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    logits_ref, grads_ref = fwd_bwd(ref)
    logits, grads = fwd_bwd(ours)
    tol = 1e-5 if DTYPE == torch.float32 else 2e-2
    assert _rel(logits, logits_ref) < tol
    worst = max(_rel(grads[n], grads_ref[n]) for n in grads_ref if grads_ref[n].norm() > 0)
    _fact(f"experts_vs_eager[{fixture}]", {"logits_rel": _rel(logits, logits_ref), "worst_grad_rel": worst})
    assert worst < (1e-4 if DTYPE == torch.float32 else 1e-1)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "nf4"])
def test_quantised_linear_on_the_gpu_matches_the_cpu(fmt):
    from torch import nn

    from greentune.quant.linear import QuantLinear

    lin = nn.Linear(512, 384, bias=False)
    cpu = QuantLinear.from_linear(lin, fmt)
    dev = copy.deepcopy(cpu).to(DEVICE)
    w_cpu, w_dev = cpu.dequantize(), dev.dequantize()
    assert w_dev.device.type == DEVICE.type and w_dev.dtype == torch.float32
    torch.testing.assert_close(w_dev.cpu(), w_cpu, rtol=1e-6, atol=1e-7)

    # quantising on the device: the same bytes, or the same error where float rounding differs
    on_dev = QuantLinear.from_linear(copy.deepcopy(lin).to(DEVICE), fmt)
    same = (on_dev.qweight.cpu() == cpu.qweight).float().mean().item()
    err_cpu = _rel(w_cpu, lin.weight)
    err_dev = _rel(on_dev.dequantize(), lin.weight)
    _fact(
        f"quantise_on_device[{fmt}]", {"same_bytes": same, "rel_err_cpu": err_cpu, "rel_err_device": err_dev}
    )
    assert err_dev <= 1.02 * err_cpu

    x = torch.randn(3, 7, 512, device=DEVICE, dtype=DTYPE, requires_grad=True)
    y = dev(x)
    assert y.dtype == DTYPE and y.device.type == DEVICE.type
    ref = x.detach().double().cpu() @ w_cpu.double().t()
    assert _rel(y, ref) < (1e-5 if DTYPE == torch.float32 else 1e-2)
    g = torch.randn_like(y)
    y.backward(g)
    assert _rel(x.grad, g.double().cpu() @ w_cpu.double()) < (1e-5 if DTYPE == torch.float32 else 1e-2)


def test_qlora_relora_on_an_moe_lowers_the_loss(tmp_path, tiny_mixtral_dir, code_jsonl):
    """q4_0 base incl. 3-D experts, LoRA on attention and experts, two ReLoRA merges, on the device."""
    from greentune.pipeline import train

    recipe = _recipe(
        tmp_path,
        tiny_mixtral_dir,
        code_jsonl,
        method={
            "quant_base": "q4_0",
            "lora": {"rank": 8, "alpha": 16, "targets": ["attn", "experts"]},
            "relora": {"merge_every": 6, "optimizer_prune": 0.9, "restart_warmup": 2},
        },
        train={"steps": 18, "lr": 1e-2, "checkpoint_every": 18},
    )
    run = tmp_path / "run"
    train(recipe, run_dir=run, progress=False)
    losses = _losses(run)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    phases = [r["phase"] for r in _ledger(run)]
    assert phases.count("merge") == 2 + 1 and "quantise" in phases
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    _fact("qlora_relora_moe_losses", {"first4": losses[:4], "last4": losses[-4:]})
