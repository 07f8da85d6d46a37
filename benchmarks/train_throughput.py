"""Training throughput: `greentune train`'s loop vs its bare step vs HF transformers + PEFT,
same model and batch, one process.

Cases (``--cases``, default all three):

- ``attn``: Mixtral architecture, 4 layers, hidden 512, intermediate 1024, 8 experts top-2,
  8 heads, vocab 8192 (62.9 M parameters, 25.2 M active); batch 4 × 256 tokens; LoRA r16 on
  attention (q, k, v, o). Contestants: HF+PEFT (eager / grouped_mm experts) in a minimal
  transformers-style loop (model `.loss`, backward, clipping at 1.0, AdamW), greentune's bare
  step (`CausalLMLoss`, backward, AdamW) and greentune's product path: `run_training` itself
  with the hooks `greentune train` gives it (energy meter + ledger, router monitor, clipping,
  metrics.jsonl, progress bar; see `product_loop.py`).
- ``q4k``: the same model with a Q4_K base (loaded through `load_quantized` from a saved
  checkpoint), LoRA r16 on attention: bare step vs `run_training`.
- ``dense``: a matmul-dominated dense llama (hidden 2048, intermediate 5632, 4 layers, 16 heads,
  vocab 8192), LoRA r16 on attention + MLP, batch 2 × 256: bare step vs `run_training`, and
  the achieved model FLOP/s (`train.metrics.training_flops_per_token`) against this machine's
  fp32 matmul rate measured in the same run (2048² square matmuls, the faster of torch's
  and oneDNN's, which greentune's frozen GEMMs use on AMD CPUs: `greentune.cpu_gemm`).

    python benchmarks/train_throughput.py [--cases attn,q4k,dense] [--steps 4] [--rounds 3]

AdamW, fp32 on CPU (bf16 on a GPU). Timed rounds alternate between the contestants so that
drift in machine load hits all alike, after one untimed round; per-step medians. Each case
also prints the loop's overhead paired within `run_training`'s own steps (a step against its
forward + backward + optimiser step: `product_loop.StepTimes`), which separate runs cannot
resolve below the few per cent a shared VM drifts between rounds. The host heap is set as
`greentune train` sets it (the loaders' fixed 1 MB mmap threshold, then `train.heap_policy`
after the first step), once, before anything is timed: every contestant runs under it.
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from greentune.adapters.lora import apply_lora
from greentune.models.facts import arch_facts
from greentune.models.tiny import tiny_config
from greentune.train.loss import CausalLMLoss, count_targets
from greentune.train.metrics import training_flops_per_token

sys.path.insert(0, str(Path(__file__).resolve().parent))
from product_loop import (  # noqa: E402 - benchmarks/ is not a package
    StepTimes,
    heap_as_the_product_sets_it,
    hf_loop_step,
    median,
    run_training_step_times,
)

B, T, RANK, ALPHA = 4, 256, 16, 32


def make_config(max_positions: int = 1024):
    return tiny_config(
        "mixtral",
        vocab_size=8192,
        hidden=512,
        layers=4,
        heads=8,
        kv_heads=8,
        intermediate=1024,
        experts=8,
        top_k=2,
        max_positions=max(1024, max_positions),
    )


def hf_peft(base, implementation: str):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    model.set_experts_implementation(implementation)
    cfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    return get_peft_model(model, cfg)


def greentune_model(base):
    from greentune.moe import replace_experts_

    model = copy.deepcopy(base)
    apply_lora(model, ["attn"], RANK, ALPHA)
    replace_experts_(model)
    return CausalLMLoss(model)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, batch, steps: int) -> list[float]:
    """Seconds of each of `steps` optimiser steps (forward, backward, AdamW), after one
    untimed warm-up step (allocator, AdamW state).

    greentune's step runs through `CausalLMLoss`, the objective its training loop uses; HF+PEFT's
    through the model's own `.loss`, as a transformers training loop would."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    model.train()
    if isinstance(model, CausalLMLoss):
        num_items = torch.tensor(float(count_targets(batch["labels"])))

        def loss_of():
            return model(batch["input_ids"], batch["attention_mask"], batch["labels"], num_items)
    else:

        def loss_of():
            return model(**batch).loss

    def step():
        loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    device = batch["input_ids"].device
    times = []
    for _ in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def matmul_gflops(device, dtype, n: int = 2048, reps: int = 10) -> float:
    """This machine's fp32 (GPU: bf16) square-matmul rate, GFLOP/s: the faster of torch's own
    `a @ b` and, on the CPU, oneDNN's (`greentune.cpu_gemm`, which greentune's frozen GEMMs use),
    so the achieved-compute ratio is against the best GEMM this machine offers."""
    from greentune import cpu_gemm

    if device.type == "cuda":
        n, reps = 8192, 20
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    rates = {}
    gemms = {"torch": lambda: a @ b}
    if device.type == "cpu" and dtype == torch.float32 and cpu_gemm._onednn_linear() is not None:
        gemms["oneDNN"] = lambda: cpu_gemm._onednn_linear()(a, b.t(), None, "none", [], "")
    for name, mm in gemms.items():
        mm()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            mm()
        sync(device)
        rates[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    print("  matmul " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()))
    return max(rates.values())


def greentune_flops_per_token(model, seq: int) -> float:
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return training_flops_per_token(arch_facts(model.config), params, seq)


def product_vs_bare(name, model, batch, steps, rounds, device, extra: dict | None = None):
    """Median seconds per step of `run_training` and of the bare step over `rounds` alternating
    rounds of `steps` each (plus the `extra` contestants: name -> step function), after one
    untimed round of every contestant: the first steps of a process (the heap growing to its
    working size, allocator and thread-pool caches) are slower than the rest, and whichever
    contestant ran first would pay for them. Also returns `run_training`'s `StepTimes` (its
    paired loop overhead)."""
    objective = CausalLMLoss(model)
    times = {"greentune train": [], "greentune bare step": []}
    for n in extra or {}:
        times[n] = []
    paired = StepTimes()
    for r in range(rounds + 1):
        keep = r > 0
        for n, f in (extra or {}).items():
            f()  # warm-up
            sync(device)
            for _ in range(steps):
                t0 = time.perf_counter()
                f()
                sync(device)
                if keep:
                    times[n].append(time.perf_counter() - t0)
        bare = time_steps(objective, batch, steps)
        product = run_training_step_times(model, batch, steps, device=device)
        if keep:
            times["greentune bare step"].extend(bare)
            times["greentune train"].extend(product.total)
            paired.extend(product)
    return {n: median(t) for n, t in times.items()}, paired


def report(title, sec: dict, tokens: int, paired: StepTimes) -> None:
    print(title)
    for n, s in sec.items():
        print(f"  {n:<24} {tokens / s:8.0f} tokens/s   (step {s * 1000:.0f} ms)")
    over = sec["greentune train"] / sec["greentune bare step"] - 1
    print(f"  loop overhead (greentune train / bare step - 1): {100 * over:+.1f} %")
    print(
        f"  loop overhead paired within greentune train's steps (step / its forward + backward + "
        f"optimiser step - 1, median of {len(paired.total)}): {100 * paired.loop_overhead:+.1f} %"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="attn,q4k,dense")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per contestant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    ap.add_argument("--batch", type=int, default=B, help="sequences per step (attn, q4k)")
    ap.add_argument("--seq", type=int, default=T, help="tokens per sequence")
    ap.add_argument(
        "--profile", action="store_true", help="print the top ops of one step of greentune and of HF"
    )
    args = ap.parse_args()
    cases = args.cases.split(",")
    from transformers import AutoModelForCausalLM

    from greentune.models.loader import compute_dtype

    device = torch.device(args.device)
    dtype = compute_dtype(device)
    b, t = args.batch, args.seq
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"torch {torch.__version__}, {where}, {dtype}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    torch.manual_seed(0)
    config = make_config(t)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    ids = torch.randint(0, config.vocab_size, (b, t), device=device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    gt = greentune_model(base).model
    print(heap_as_the_product_sets_it(copy.deepcopy(gt), batch, device))
    mm = matmul_gflops(device, dtype)
    print(f"{str(dtype)[6:]} matmul on this machine (2048² square): {mm:.1f} GFLOP/s")
    if "attn" in cases:
        hf = {"HF+PEFT (grouped_mm)": hf_peft(base, "grouped_mm"), "HF+PEFT (eager)": hf_peft(base, "eager")}
        with torch.no_grad():
            ref = hf["HF+PEFT (eager)"](**batch).loss.item()
            ours = CausalLMLoss(gt)(
                ids, batch["attention_mask"], ids, torch.tensor(float(count_targets(batch["labels"])))
            ).item()
        tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16: the two compute in a different order
        assert abs(ref - ours) < tol, f"models disagree before training: {ref} vs {ours}"
        facts = arch_facts(config)
        sec, paired = product_vs_bare(
            "attn",
            gt,
            batch,
            args.steps,
            args.rounds,
            device,
            {n: hf_loop_step(m, batch) for n, m in hf.items()},
        )
        report(
            f"attention LoRA r{RANK}, bench Mixtral ({facts.total_params / 1e6:.1f} M parameters, "
            f"{facts.active_params / 1e6:.1f} M active), batch {b}x{t}:",
            sec,
            b * t,
            paired,
        )
        best = min((n for n in sec if n.startswith("HF")), key=sec.get)
        print(f"  ratio greentune train / best HF+PEFT ({best}): {sec[best] / sec['greentune train']:.2f}x")
        print(f"  ratio greentune bare step / best HF+PEFT: {sec[best] / sec['greentune bare step']:.2f}x")
        fpt = greentune_flops_per_token(gt, t)
        print(f"  greentune train achieved {fpt * b * t / sec['greentune train'] / 1e9:.1f} GFLOP/s")
        if args.profile:
            profile_top(device, {"greentune": CausalLMLoss(gt), best: hf[best]}, batch)
        del hf
    if "q4k" in cases:
        from greentune.quant.loading import load_quantized

        with tempfile.TemporaryDirectory(prefix="gt-q4k-") as d:
            base.save_pretrained(d, safe_serialization=True)
            q = load_quantized(d, "q4_k").to(device)
        apply_lora(q, ["attn"], RANK, ALPHA)
        from greentune.moe import replace_experts_

        replace_experts_(q)
        sec, paired = product_vs_bare("q4k", q, batch, args.steps, args.rounds, device)
        report(f"q4_k base, attention LoRA r{RANK}, bench Mixtral, batch {b}x{t}:", sec, b * t, paired)
        del q
    if "dense" in cases:
        torch.manual_seed(0)
        dcfg = tiny_config(
            "llama", vocab_size=8192, hidden=2048, layers=4, heads=16, kv_heads=16, intermediate=5632
        )
        dense = AutoModelForCausalLM.from_config(dcfg, dtype=dtype).to(device)
        apply_lora(dense, ["attn", "mlp"], RANK, ALPHA)
        db = 2
        dids = torch.randint(0, dcfg.vocab_size, (db, t), device=device)
        dbatch = {"input_ids": dids, "labels": dids, "attention_mask": torch.ones_like(dids)}
        sec, paired = product_vs_bare("dense", dense, dbatch, max(2, args.steps - 1), args.rounds, device)
        facts = arch_facts(dcfg)
        report(
            f"dense llama h2048 ff5632 x4 ({facts.total_params / 1e6:.0f} M parameters), LoRA r{RANK} "
            f"attention + mlp, batch {db}x{t}:",
            sec,
            db * t,
            paired,
        )
        fpt = greentune_flops_per_token(dense, t)
        achieved = fpt * db * t / sec["greentune train"] / 1e9
        mm2 = matmul_gflops(device, dtype)
        print(
            f"  greentune train achieved {achieved:.1f} GFLOP/s ({fpt / 1e9:.3f} GFLOP/token); fp32 matmul "
            f"{mm:.1f} / {mm2:.1f} GFLOP/s (before / after): {achieved / max(mm, mm2):.2f}x of the higher"
        )


def profile_top(device, models: dict, batch) -> None:
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    for name, m in models.items():
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
            time_steps(m, batch, 1)
        print(f"--- {name}: top ops of two steps by {'device' if on_gpu else 'CPU'} time")
        print(
            prof.key_averages().table(
                sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total",
                row_limit=14,
                max_name_column_width=40,
            )
        )


if __name__ == "__main__":
    main()
