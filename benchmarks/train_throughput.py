"""Training throughput: greentune vs HF transformers + PEFT, same model and batch, one process.

Model: Mixtral architecture, 4 layers, hidden 512, intermediate 1024, 8 experts top-2,
8 heads, vocab 8192 (62.9 M parameters, 25.2 M active); batch 4 × 256 tokens; LoRA r16 on
attention (q, k, v, o); AdamW; fp32 on CPU. Both sides start from the same weights.

    python benchmarks/train_throughput.py [--steps 6] [--rounds 3] [--device cuda] [--batch 4 --seq 256]

Timed rounds alternate between the contestants so that drift in machine load hits both.
Prints tokens/s of each, the ratio, greentune's achieved GFLOP/s and this machine's
measured matmul GFLOP/s (fp32 on CPU; on a GPU everything runs in bf16 and the matmul
rate is bf16's). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from greentune.adapters.lora import apply_lora
from greentune.models.facts import arch_facts
from greentune.models.tiny import tiny_config
from greentune.train.loss import CausalLMLoss, count_targets

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


def time_steps(model, batch, steps: int) -> float:
    """Seconds per optimiser step (forward, backward, AdamW).

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
    step()  # warm-up: allocator, AdamW state
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def matmul_gflops(device, dtype, n: int = 2048, reps: int = 10) -> float:
    if device.type == "cuda":
        n, reps = 8192, 20
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    ap.add_argument("--batch", type=int, default=B, help="sequences per step")
    ap.add_argument("--seq", type=int, default=T, help="tokens per sequence")
    ap.add_argument(
        "--also-plain-loss",
        action="store_true",
        help="add greentune with transformers' own loss (no fused lm_head + CE) as a contestant",
    )
    ap.add_argument(
        "--profile", action="store_true", help="print the top ops of one step of greentune and of HF"
    )
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from greentune.models.loader import compute_dtype

    device = torch.device(args.device)
    dtype = compute_dtype(device)
    b, t = args.batch, args.seq
    torch.manual_seed(0)
    config = make_config(t)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    ids = torch.randint(0, config.vocab_size, (b, t), device=device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    contestants = {
        "HF+PEFT (grouped_mm)": hf_peft(base, "grouped_mm"),
        "HF+PEFT (eager)": hf_peft(base, "eager"),
        "greentune": greentune_model(base),
    }
    if args.also_plain_loss:
        contestants["greentune (HF loss)"] = CausalLMLoss(contestants["greentune"].model, fused=False)
    with torch.no_grad():
        ref = contestants["HF+PEFT (eager)"](**batch).loss.item()
        ours = contestants["greentune"](
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            torch.tensor(float(count_targets(batch["labels"]))),
        ).item()
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16: the two compute in a different order
    assert abs(ref - ours) < tol, f"models disagree before training: {ref} vs {ours}"

    times = {name: [] for name in contestants}
    for _ in range(args.rounds):
        for name, model in contestants.items():
            times[name].append(time_steps(model, batch, args.steps))
    tokens = b * t
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    facts = arch_facts(config)
    lora_params = sum(p.numel() for p in contestants["greentune"].parameters() if p.requires_grad)
    # forward + activation-gradient backward of the frozen base (no weight gradients), + LoRA's 6 FLOPs/param
    flops_per_token = 2 * facts.forward_flops_per_token(t) + 6 * lora_params
    mm = matmul_gflops(device, dtype)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} CPU threads"
    )
    print(f"torch {torch.__version__}, {where}, {dtype}; batch {b}x{t}; LoRA r{RANK} on attention")
    print(f"model: {facts.total_params / 1e6:.1f} M parameters, {facts.active_params / 1e6:.1f} M active")
    for name, v in tps.items():
        print(f"  {name:<22} {v:8.0f} tokens/s   (step {tokens / v * 1000:.0f} ms)")
    best_hf_name = max((n for n in tps if n.startswith("HF")), key=tps.get)
    best_hf = tps[best_hf_name]
    print(f"ratio greentune / best HF+PEFT: {tps['greentune'] / best_hf:.2f}x")
    print(
        f"greentune achieved {flops_per_token * tps['greentune'] / 1e9:.1f} GFLOP/s "
        f"({flops_per_token / 1e6:.1f} MFLOP/token); {str(dtype)[6:]} matmul on this machine: {mm:.1f} GFLOP/s"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        on_gpu = device.type == "cuda"
        for name in ("greentune", best_hf_name):
            with profile(
                activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
            ) as prof:
                time_steps(contestants[name], batch, 1)
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
