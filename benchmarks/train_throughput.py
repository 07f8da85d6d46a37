"""Training throughput: greentune vs HF transformers + PEFT, same model and batch, one process.

Model: Mixtral architecture, 4 layers, hidden 512, intermediate 1024, 8 experts top-2,
8 heads, vocab 8192 (62.9 M parameters, 25.2 M active); batch 4 × 256 tokens; LoRA r16 on
attention (q, k, v, o); AdamW; fp32 on CPU. Both sides start from the same weights.

    python benchmarks/train_throughput.py [--steps 6] [--rounds 3]

Timed rounds alternate between the contestants so that drift in machine load hits both.
Prints tokens/s of each, the ratio, greentune's achieved GFLOP/s and this machine's
measured fp32 matmul GFLOP/s. Run it on a quiet machine.
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


def make_config():
    return tiny_config("mixtral", vocab_size=8192, hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1024,
                       experts=8, top_k=2, max_positions=1024)


def hf_peft(base, implementation: str):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    model.set_experts_implementation(implementation)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, cfg)


def greentune_model(base):
    from greentune.moe import replace_experts_

    model = copy.deepcopy(base)
    apply_lora(model, ["attn"], RANK, ALPHA)
    replace_experts_(model)
    return CausalLMLoss(model)


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

    step()  # warm-up: allocator, AdamW state
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = make_config()
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (B, T))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    contestants = {
        "HF+PEFT (grouped_mm)": hf_peft(base, "grouped_mm"),
        "HF+PEFT (eager)": hf_peft(base, "eager"),
        "greentune": greentune_model(base),
    }
    with torch.no_grad():
        ref = contestants["HF+PEFT (eager)"](**batch).loss.item()
        ours = contestants["greentune"](batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        torch.tensor(float(count_targets(batch["labels"])))).item()
    assert abs(ref - ours) < 1e-4, f"models disagree before training: {ref} vs {ours}"

    times = {name: [] for name in contestants}
    for _ in range(args.rounds):
        for name, model in contestants.items():
            times[name].append(time_steps(model, batch, args.steps))
    tokens = B * T
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    facts = arch_facts(config)
    lora_params = sum(p.numel() for p in contestants["greentune"].parameters() if p.requires_grad)
    # forward + activation-gradient backward of the frozen base (no weight gradients), + LoRA's 6 FLOPs/param
    flops_per_token = 2 * facts.forward_flops_per_token(T) + 6 * lora_params
    mm = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B}x{T}; LoRA r{RANK} on attention")
    print(f"model: {facts.total_params / 1e6:.1f} M parameters, {facts.active_params / 1e6:.1f} M active")
    for name, v in tps.items():
        print(f"  {name:<22} {v:8.0f} tokens/s   (step {tokens / v * 1000:.0f} ms)")
    best_hf = max(v for n, v in tps.items() if n.startswith("HF"))
    print(f"ratio greentune / best HF+PEFT: {tps['greentune'] / best_hf:.2f}x")
    print(f"greentune achieved {flops_per_token * tps['greentune'] / 1e9:.1f} GFLOP/s "
          f"({flops_per_token / 1e6:.1f} MFLOP/token); fp32 matmul 2048^3 on this machine: {mm:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
