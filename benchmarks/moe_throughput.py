"""MoE training throughput: greentune vs transformers + PEFT (not a test; run on a quiet machine).

    python benchmarks/moe_throughput.py                 # 2 rounds of 3 timed steps per variant (+1 untimed)
    python benchmarks/moe_throughput.py --steps 2 --profile

Model: Mixtral architecture, 4 layers, hidden 512, intermediate 1024, 8 experts top-2, 8 heads,
vocab 8192 (62.9 M parameters), random init (seed 0); batch 4 × 256 random tokens; fp32 on CPU
(bf16 on a GPU); LoRA rank 16, alpha 32 on q/k/v/o and on the experts; AdamW; one step =
forward + backward + optimiser step. Variants, all in this one process and timed round-robin
(so load from other processes hits each alike):

- ``hf_eager``:      transformers experts_implementation="eager" + PEFT (target_modules q,k,v,o;
                     target_parameters mlp.experts.gate_up_proj / down_proj)
- ``hf_grouped_mm``: the same with experts_implementation="grouped_mm"
- ``greentune``:     SparseExperts + expert LoRA on activations + greentune LoRA on q,k,v,o, the
                     loss through `CausalLMLoss` as greentune's training loop computes it
                     (HF+PEFT use the model's own `.loss`, as a transformers loop would): the bare step
- ``greentune train``: the same model through `run_training` itself, with the hooks `greentune
                     train` gives it (energy meter + ledger, router monitor, clipping, metrics.jsonl,
                     progress bar; `product_loop.py`), per-step wall clock between step starts

HF+PEFT's steps are a minimal transformers-style loop: `.loss`, backward, clipping at 1.0
(greentune's default), AdamW. The host heap is set as `greentune train` sets it before
anything is timed (`product_loop.heap_as_the_product_sets_it`).

Then one layer alone (forward + backward on the same 1024 tokens, frozen base): the MoE block
(router + 8 experts, top-2) with expert LoRA as greentune and as transformers+PEFT run it, and
the active-compute ratio: greentune's MoE block over a dense SwiGLU MLP with intermediate
2 × 1024 (the same FLOPs per token), without LoRA and with rank-16 LoRA on both.
Prints tokens/s per variant, the ratios, and the median step times (wall clock), or with
``--cpu-time`` the fastest step in process CPU seconds, which a busy shared machine distorts less
(with ``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE``, so spinning OpenMP workers are not counted).

What bounds the whole-step ratio: a LoRA step needs forward + input-gradient GEMMs, ≈ 92 GFLOP
here (experts 51.5, attention projections + SDPA ≈ 23.6, lm_head 17.2); PEFT's ParamWrapper
also computes the full expert weight gradient (+25.8 GFLOP) and rebuilds W + B·A each forward.
Measured single-thread, the MoE layers are ~50 % of greentune's step, attention ~29 %, lm_head
and the loss ~17 %, so even free experts would leave about half of the step. The FLOPs alone
(profiler, one step) are 89 GFLOP for greentune against 118 for HF+PEFT grouped_mm, 1.33×; the
rest of greentune's lead is GEMM speed: on AMD CPUs its frozen GEMMs (experts, LoRA bases,
lm_head) run through oneDNN (`greentune.cpu_gemm`), 1.2–1.7× MKL's sgemm, which HF calls.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from greentune.recipe import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from product_loop import StepTimes, heap_as_the_product_sets_it, run_training_step_times  # noqa: E402

H, FF, E, K, LAYERS, HEADS, VOCAB, BATCH, SEQ, RANK, ALPHA = 512, 1024, 8, 2, 4, 8, 8192, 4, 256, 16, 32


def config():
    import transformers as tf

    return tf.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        num_local_experts=E,
        num_experts_per_tok=K,
        max_position_embeddings=SEQ,
        sliding_window=None,
        tie_word_embeddings=False,
    )


def base_model(device, dtype):
    import transformers as tf

    torch.manual_seed(0)
    return tf.MixtralForCausalLM(config()).to(device, dtype)


def hf_peft(base, impl):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    model.config._experts_implementation = impl
    for layer in model.model.layers:
        layer.mlp.experts.config._experts_implementation = impl
    cfg = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    return get_peft_model(model, cfg)


class _LoRALinear(nn.Module):
    """Fallback minimal LoRA (used only when greentune.adapters.lora is missing)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base, self.scale = base, ALPHA / RANK
        self.A = nn.Parameter(
            torch.empty(RANK, base.in_features, device=base.weight.device).uniform_(-0.04, 0.04)
        )
        self.B = nn.Parameter(torch.zeros(base.out_features, RANK, device=base.weight.device))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scale


def greentune_model(base):
    from greentune.adapters.expert_lora import add_expert_lora_
    from greentune.moe import replace_experts_

    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    replace_experts_(model)
    try:  # apply_lora freezes the whole model, so it goes before the expert LoRA
        from greentune.adapters.lora import apply_lora

        apply_lora(model, ["attn"], rank=RANK, alpha=ALPHA)
    except ImportError:
        for layer in model.model.layers:
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, n, _LoRALinear(getattr(layer.self_attn, n)))
    add_expert_lora_(model, r=RANK, alpha=ALPHA)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_step(model, ids, objective: bool = False):
    """One optimiser step. With `objective`, greentune's bare step: the loss from `CausalLMLoss`
    (the objective its training loop uses: fused lm_head + cross-entropy), no clipping;
    otherwise a minimal transformers-style loop's step: the model's own `.loss`, clipping at
    the same 1.0 as greentune's default, AdamW."""
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    if objective:
        from greentune.train.loss import CausalLMLoss, count_targets

        wrapped, mask = CausalLMLoss(model), torch.ones_like(ids)
        n_items = torch.tensor(float(count_targets(ids)))

        def loss_of():
            return wrapped(ids, mask, ids, n_items)
    else:

        def loss_of():
            return model(input_ids=ids, labels=ids).loss

    clip = 0.0 if objective else TrainConfig().max_grad_norm  # a transformers loop clips (Trainer's 1.0)
    params = trainable(model)

    def step():
        loss = loss_of()
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --cpu-time switches to process CPU seconds (a shared machine)


def time_round_robin(fns: dict, steps: int, device) -> dict[str, list[float]]:
    times = {n: [] for n in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(steps):
        for n, f in fns.items():
            sync(device)
            t = CLOCK()
            f()
            sync(device)
            times[n].append(CLOCK() - t)
    return times


def layer_times(device, dtype, steps):
    """Forward+backward seconds of one layer's MLP on 1024 tokens, frozen base: the MoE block
    (router + 8 experts, top-2) as greentune runs it and as transformers+PEFT run it, and a
    dense SwiGLU MLP of intermediate 2I (the same FLOPs per token)."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from greentune.adapters.expert_lora import add_expert_lora_
    from greentune.moe import replace_experts_

    torch.manual_seed(0)

    def block(impl):
        cfg = config()
        cfg._experts_implementation = impl
        torch.manual_seed(0)
        m = MixtralSparseMoeBlock(cfg)
        for p in m.parameters():
            nn.init.normal_(p, std=0.02)
        return m.to(device, dtype).requires_grad_(False)

    moe = block("eager")
    replace_experts_(moe)
    moe_lora = copy.deepcopy(moe)
    add_expert_lora_(moe_lora, r=RANK, alpha=ALPHA)
    peft_cfg = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    hf = {impl: inject_adapter_in_model(peft_cfg, block(impl)) for impl in ("eager", "grouped_mm")}
    dense = nn.ModuleDict(
        {"gate_up": nn.Linear(H, 4 * FF, bias=False), "down": nn.Linear(2 * FF, H, bias=False)}
    )
    dense = dense.to(device, dtype).requires_grad_(False)
    dense_lora = {
        n: (
            torch.randn(RANK, m.in_features, device=device, dtype=dtype, requires_grad=True),
            torch.randn(m.out_features, RANK, device=device, dtype=dtype, requires_grad=True),
        )
        for n, m in dense.items()
    }
    x = torch.randn(BATCH, SEQ, H, device=device, dtype=dtype, requires_grad=True)

    def dense_fwd(lora):
        def lin(n, v):
            y = dense[n](v)
            if lora:  # the same formulation as ExpertLoRA: base + s · (v A^T) B^T in one addmm
                a, b = dense_lora[n]
                y = torch.addmm(
                    y.view(-1, y.shape[-1]), (v @ a.t()).view(-1, RANK), b.t(), alpha=ALPHA / RANK
                ).view(y.shape)
            return y

        g, u = lin("gate_up", x).chunk(2, -1)
        return lin("down", F.silu(g) * u)

    def run(f):
        return lambda: f().backward(torch.ones(BATCH, SEQ, H, device=device, dtype=dtype))

    fns = {
        "moe": run(lambda: moe(x)),
        "dense": run(lambda: dense_fwd(False)),
        "moe_lora": run(lambda: moe_lora(x)),
        "dense_lora": run(lambda: dense_fwd(True)),
        "hf_eager_lora": run(lambda: hf["eager"](x)),
        "hf_grouped_mm_lora": run(lambda: hf["grouped_mm"](x)),
    }
    return time_round_robin(fns, steps, device)


def main():
    global CLOCK, BATCH, SEQ
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-layers", action="store_true", help="skip the one-layer comparison")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="hf_eager,hf_grouped_mm,greentune")
    ap.add_argument("--batch", type=int, default=BATCH, help="sequences per step")
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens per sequence")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one greentune step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU seconds and report the fastest step (for a shared CPU machine; "
        "tokens/s are then per CPU-second of all threads). Use --threads 1 or "
        "OMP_WAIT_POLICY=PASSIVE: OpenMP workers spin between parallel regions, which "
        "counts as CPU time and penalises code with more small ops",
    )
    args = ap.parse_args()
    BATCH, SEQ = args.batch, args.seq
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    pick = min if args.cpu_time else statistics.median
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    base = base_model(device, dtype)
    print(
        f"device {device} ({torch.get_num_threads()} threads), {dtype}, torch {torch.__version__}; "
        f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters; batch {BATCH}x{SEQ}"
    )
    builders = {
        "hf_eager": lambda: hf_peft(base, "eager"),
        "hf_grouped_mm": lambda: hf_peft(base, "grouped_mm"),
        "greentune": lambda: greentune_model(base),
    }
    models = {n: builders[n]() for n in args.variants.split(",") if n}
    for n, m in models.items():
        print(f"  {n}: {sum(p.numel() for p in trainable(m)) / 1e6:.3f} M trainable")
    steps = {n: make_step(m, ids, objective=n == "greentune") for n, m in models.items()}
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    if "greentune" in models and not args.cpu_time:
        print(heap_as_the_product_sets_it(copy.deepcopy(models["greentune"]), batch, device))
    times = {n: [] for n in steps}
    product = "greentune" in models and not args.cpu_time
    paired = StepTimes()
    if product:
        times["greentune train"] = []
    # Each round: every contestant `--steps` steps, in turn. Round 0 is not timed: a process's
    # first steps (the heap growing to its working size, allocator and thread-pool caches) are
    # slower than the rest, and whichever contestant ran first would pay for them.
    for r in range(args.rounds + 1):
        for n, t in time_round_robin(steps, args.steps, device).items():
            times[n] += t if r else []
        if product:  # `run_training` with its default hooks (energy, router monitor, clipping, metrics)
            t = run_training_step_times(models["greentune"], batch, args.steps, device=device)
            times["greentune train"] += t.total if r else []
            if r:
                paired.extend(t)
    tps = {n: BATCH * SEQ / pick(t) for n, t in times.items() if t}
    for n, t in times.items():
        print(
            f"{n:>16}: {tps[n]:8.0f} tokens/s   step {pick(t):.3f} s   ({', '.join(f'{x:.2f}' for x in t)})"
        )
    if "greentune" in tps:
        for n in tps:
            if n.startswith("hf"):
                print(f"greentune bare step / {n}: {tps['greentune'] / tps[n]:.2f}x")
                if product:
                    print(f"greentune train / {n}: {tps['greentune train'] / tps[n]:.2f}x")
        hf = [n for n in tps if n.startswith("hf")]
        if product and hf:
            best = max(hf, key=tps.get)
            print(f"greentune train / best HF+PEFT ({best}): {tps['greentune train'] / tps[best]:.2f}x")
            over = tps["greentune"] / tps["greentune train"] - 1
            print(f"loop overhead (greentune train / bare step - 1): {100 * over:+.1f} %")
            print(
                f"loop overhead paired within greentune train's steps (step / its forward + backward + "
                f"optimiser step - 1, median of {len(paired.total)}): {100 * paired.loop_overhead:+.1f} %"
            )
    if args.profile and "greentune" in models:
        step = make_step(models["greentune"], ids, objective=True)
        with torch.profiler.profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    del models
    if args.no_layers:
        return
    t = layer_times(device, dtype, args.steps)
    med = {n: pick(v) for n, v in t.items()}
    ms = {n: f"{v * 1e3:.0f} ms" for n, v in med.items()}
    print(
        f"one MoE layer, fwd+bwd, {BATCH * SEQ} tokens, LoRA r{RANK} on experts: greentune {ms['moe_lora']}, "
        f"HF+PEFT eager {ms['hf_eager_lora']} ({med['hf_eager_lora'] / med['moe_lora']:.2f}x), "
        f"grouped_mm {ms['hf_grouped_mm_lora']} ({med['hf_grouped_mm_lora'] / med['moe_lora']:.2f}x)"
    )
    print(
        f"active-compute ratio (MoE block top-{K} of {E} / dense MLP intermediate {K * FF}), fwd+bwd: "
        f"{med['moe'] / med['dense']:.2f}x without LoRA ({ms['moe']} / {ms['dense']}), "
        f"{med['moe_lora'] / med['dense_lora']:.2f}x with LoRA r{RANK} "
        f"({ms['moe_lora']} / {ms['dense_lora']})"
    )


if __name__ == "__main__":
    main()
