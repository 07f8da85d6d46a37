"""The headline GPU measurements of a quantised base (issue 20), in three parts (gpu_headline.sh runs them).

    python benchmarks/gpu_headline.py dequant   [--smoke]     # 1. s/weight per format, torch vs Triton
    python benchmarks/gpu_headline.py models    [--smoke]     # 2. 4 Mixtral-8x7B-shaped layers, 6 contestants
    python benchmarks/gpu_headline.py reference [--smoke]     # 3. the reference job at full depth

1. Dequantise seconds per weight for Q4_K, Q6_K, Q8_0, Q4_0 and NF4 at 8192×4096 and Mixtral 8x7B's
   expert shapes (14336×4096, 4096×14336), plain torch (``fmt.dequantize(q).to(bf16)``, what CUDA ran
   before) vs `triton_dequant` into a kept buffer, with a bit-exactness check on the device; then
   Q4_K GEMMs of an expert's shape at growing row counts, fused vs dequantise + cuBLAS vs bf16, for
   the `triton_dispatch.FUSED_MAX_ROWS` crossover.
2. A 4-layer model with Mixtral 8x7B's layer shapes (hidden 4096, intermediate 14336, 8 experts
   top-2, 32/8 heads, vocab 32000), random weights, batch 1 × seq 2048, LoRA r16 (alpha 32) on
   attention and experts, bf16 compute, AdamW; one step = forward + backward + optimiser step.
   Contestants timed round-robin in one process: greentune q4_k, nf4 and bf16; HF+PEFT bf16
   (grouped_mm experts, `target_parameters`); HF+PEFT with bitsandbytes 4-bit NF4 on the layers'
   nn.Linear modules (what bitsandbytes quantises: attention; transformers-v5 fused experts stay
   bf16, bnb #1849) if bitsandbytes imports; Unsloth (4-bit, its own LoRA on attention) if it
   imports. Peak memory per contestant: its own tensors (parameters, buffers, optimiser state,
   greentune's kept dequantise buffer) plus the largest rise of `torch.cuda.max_memory_allocated`
   over a step, i.e. its peak as if it ran alone (the others' memory is constant meanwhile).
3. The reference job: all 32 layers of Mixtral 8x7B's shapes, each layer's weights drawn at random
   on the device and quantised to Q4_K there (no checkpoint on disk), LoRA r16 on attention and
   experts, seq 2048, activation checkpointing around each decoder layer (transformers'
   `gradient_checkpointing_enable`, non-reentrant: the trainer has no switch for it on this
   branch), 20 steps: peak memory, tokens/s, NVML joules per token, and the projection for a
   10-hour run under a 1 kW cap (tokens, kWh IT and facility) beside `greentune plan`'s
   prediction for the same recipe, with the measured utilisation (model FLOPs / peak bf16).

``--smoke`` runs each part on the CPU with tiny sizes (fp32, the Triton kernels under the
interpreter) to prove the script runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RANK, ALPHA = 16, 32
FULL = dict(hidden=4096, intermediate=14336, experts=8, top_k=2, heads=32, kv_heads=8, vocab_size=32000)
SMOKE = dict(hidden=256, intermediate=256, experts=4, top_k=2, heads=4, kv_heads=2, vocab_size=512)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def mixtral_config(layers: int, seq: int, smoke: bool):
    from greentune.models.tiny import tiny_config

    return tiny_config("mixtral", layers=layers, max_positions=max(seq, 1024), **(SMOKE if smoke else FULL))


def header(device):
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke: numbers mean nothing)"
    )
    import transformers

    print(
        f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC",
        flush=True,
    )


# ---- 1. dequantise and GEMM kernels ----------------------------------------------------------


def packed_weight(fmt, shape, device) -> torch.Tensor:
    """Packed bytes of a random ``shape`` weight: 512 rows quantised on the device, repeated (the
    K-quant searches would take most of the step's time on full-size weights; speed does not
    depend on the values)."""
    torch.manual_seed(0)
    rows = min(512, shape[0])
    q = fmt.quantize(torch.randn(rows, shape[1], device=device) * 0.02)
    return q.repeat(-(-shape[0] // rows), 1)[: shape[0]].contiguous()


def part_dequant(device, smoke: bool) -> None:
    from greentune.quant import triton_dequant, triton_dispatch, triton_matmul
    from greentune.quant.formats import get_format

    dtype = torch.float32 if smoke else torch.bfloat16
    reps = 2 if smoke else 10
    shapes = [(64, 512), (64, 256)] if smoke else [(8192, 4096), (14336, 4096), (4096, 14336)]
    print(f"dequantise to {dtype}, median of {reps}: s/weight plain torch -> Triton (speed-up), bit-exact")
    for name in ("q4_k", "q6_k", "q8_0", "q4_0", "nf4"):
        fmt = get_format(name)
        for shape in shapes:
            q = packed_weight(fmt, shape, device)
            n = shape[0] * shape[1]
            buf = torch.empty(n, dtype=dtype, device=device)
            t_torch = timed(
                lambda fmt=fmt, q=q, shape=shape: fmt.dequantize(q, shape).to(dtype), device, reps
            )
            t_tri = timed(
                lambda fmt=fmt, q=q, shape=shape, buf=buf: triton_dequant.dequantize(
                    fmt, q, shape, dtype, out=buf
                ),
                device,
                reps,
            )
            exact = torch.equal(
                triton_dequant.dequantize(fmt, q, shape, dtype), fmt.dequantize(q, shape).to(dtype)
            )
            gbs = (q.numel() + n * buf.element_size()) / t_tri / 1e9
            print(
                f"  {name:5} {shape[0]:>5}x{shape[1]:<5} {t_torch / n:.2e} -> {t_tri / n:.2e} s/weight "
                f"({t_torch / t_tri:5.1f}x, {gbs:6.0f} GB/s)  bit-exact {exact}",
                flush=True,
            )
    fmt = get_format("q4_k")
    N, K = (64, 256) if smoke else (14336, 4096)
    q = packed_weight(fmt, (N, K), device)
    w = fmt.dequantize(q, (N, K)).to(dtype)
    buf = torch.empty(N * K, dtype=dtype, device=device)
    print(f"q4_k GEMM, weight {N}x{K}, ms: fused | dequantise + cuBLAS | bf16 weight (forward; input grad)")
    best = []
    for M in (4, 32) if smoke else (16, 64, 256, 1024, 4096):
        x, g = torch.randn(M, K, device=device, dtype=dtype), torch.randn(M, N, device=device, dtype=dtype)
        f = timed(lambda x=x: triton_matmul.linear_forward(x, fmt, q, N, K), device, reps)
        d = timed(lambda x=x: x @ triton_dequant.dequantize(fmt, q, (N, K), dtype, out=buf).T, device, reps)
        b = timed(lambda x=x: x @ w.T, device, reps)
        fg = timed(lambda g=g: triton_matmul.linear_input_grad(g, fmt, q, N, K), device, reps)
        dg = timed(lambda g=g: g @ triton_dequant.dequantize(fmt, q, (N, K), dtype, out=buf), device, reps)
        bg = timed(lambda g=g: g @ w, device, reps)
        best.append((M, "fused" if f + fg <= d + dg else "dequant"))
        print(
            f"  M={M:>5}: {f * 1e3:7.3f} | {d * 1e3:7.3f} | {b * 1e3:7.3f}   ;  "
            f"{fg * 1e3:7.3f} | {dg * 1e3:7.3f} | {bg * 1e3:7.3f}",
            flush=True,
        )
    fused = [m for m, c in best if c == "fused"]
    print(
        f"fused wins (forward + input grad) up to M = {max(fused) if fused else 'none'}; "
        f"triton_dispatch.FUSED_MAX_ROWS = {triton_dispatch.FUSED_MAX_ROWS}"
    )
    E = 2 if smoke else 8
    qe = packed_weight(fmt, (E * N, K), device).view(E, N, -1)
    we = fmt.dequantize(qe.reshape(E * N, -1), (E * N, K)).to(dtype).view(E, N, K)
    buf = torch.empty(E * N * K, dtype=dtype, device=device)
    print(
        f"q4_k grouped expert GEMM forward, {E} experts of {N}x{K}, rows split evenly, ms: "
        f"fused | dequantise all + grouped_mm | bf16 grouped_mm"
    )
    for S in (8, 64) if smoke else (256, 1024, 4096):
        x = torch.randn(S, K, device=device, dtype=dtype)
        offs = (torch.arange(1, E + 1, device=device) * (S // E)).to(torch.int32)
        f = timed(lambda x=x, offs=offs: triton_matmul.grouped_forward(x, fmt, qe, offs, N, K), device, reps)
        d = timed(
            lambda x=x, offs=offs: F.grouped_mm(
                x,
                triton_dequant.dequantize(fmt, qe.reshape(E * N, -1), (E * N, K), dtype, out=buf)
                .view(E, N, K)
                .transpose(-2, -1),
                offs=offs,
            ),
            device,
            reps,
        )
        b = timed(lambda x=x, offs=offs: F.grouped_mm(x, we.transpose(-2, -1), offs=offs), device, reps)
        print(
            f"  {S:>5} rows ({S // E} per expert): {f * 1e3:7.3f} | {d * 1e3:7.3f} | {b * 1e3:7.3f}",
            flush=True,
        )


# ---- shared by 2 and 3 -----------------------------------------------------------------------


def greentune_adapt(model, fmt: str):
    """Quantise (unless bf16), LoRA on attention, SparseExperts with expert LoRA: the pipeline's order."""
    from greentune.adapters.expert_lora import add_expert_lora_
    from greentune.adapters.lora import apply_lora
    from greentune.moe import prepare_moe_
    from greentune.quant import quantize_model_

    if fmt != "bf16":
        quantize_model_(model, fmt)
    apply_lora(model, ["attn"], rank=RANK, alpha=ALPHA)
    prepare_moe_(model, lora_on_experts=True)
    add_expert_lora_(model, r=RANK, alpha=ALPHA)
    return model


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct tensors held by modules (parameters, buffers) and optimisers (state)."""
    seen, total = set(), 0
    for obj in objs:
        if isinstance(obj, nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            tensors = [v for s in obj.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        else:
            tensors = list(obj)
        for t in tensors:
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen and t.device.type != "meta":
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def make_step(model, ids, objective: bool):
    """(one optimiser step, its AdamW) on the trainable parameters. `objective`: the loss from
    greentune's `CausalLMLoss` (its training loop's objective), else the model's own `.loss`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if objective:
        from greentune.train.loss import CausalLMLoss, count_targets

        wrapped, mask = CausalLMLoss(model), torch.ones_like(ids)
        n_items = torch.tensor(float(count_targets(ids)))

        def loss_of():
            return wrapped(ids, mask, ids, n_items)
    else:

        def loss_of():
            return model(input_ids=ids, labels=ids).loss

    def step():
        loss_of().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def peft_wrap(model, impl: str = "grouped_mm"):
    from peft import LoraConfig, get_peft_model

    model.set_experts_implementation(impl)
    cfg = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    return get_peft_model(model, cfg)


def hf_bnb(base):
    """HF + PEFT with bitsandbytes NF4 (bf16 compute) on the decoder layers' nn.Linear modules, as
    transformers' BitsAndBytesConfig converts them (the lm_head kept); fused experts stay bf16."""
    import bitsandbytes as bnb

    model = copy.deepcopy(base)
    for name, mod in list(model.model.layers.named_modules()):
        if type(mod) is nn.Linear:
            q = bnb.nn.Linear4bit(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
                device="cpu",
            )
            q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            parent, leaf = model.model.layers.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(parent, leaf, q.to(mod.weight.device))
    return peft_wrap(model)


def unsloth_model(base, seq: int):
    """Unsloth's 4-bit loader and LoRA (attention) on the same weights, saved to a temporary folder."""
    from unsloth import FastLanguageModel

    print(
        "  (unsloth imported: it patches transformers' classes process-wide, which may also move the "
        "HF+PEFT numbers of this run)"
    )
    path = Path("/tmp/gt-headline-unsloth")
    base.save_pretrained(path)
    model, _ = FastLanguageModel.from_pretrained(
        str(path), max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    return FastLanguageModel.get_peft_model(
        model,
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_gradient_checkpointing=False,
    )


# ---- 2. the 4-layer comparison ---------------------------------------------------------------


def part_models(device, smoke: bool, steps: int, seq: int, batch: int) -> None:
    import transformers as tf

    from greentune.quant import triton_dispatch

    dtype = torch.float32 if smoke else torch.bfloat16
    cfg = mixtral_config(4 if not smoke else 2, seq, smoke)
    torch.manual_seed(0)
    with torch.device(device):
        base = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    print(
        f"{cfg.num_hidden_layers} layers of {'tiny' if smoke else 'Mixtral 8x7B'} shapes, "
        f"{sum(p.numel() for p in base.parameters()) / 1e9:.2f} B parameters, batch {batch}x{seq}, {dtype}, "
        f"LoRA r{RANK} attention + experts",
        flush=True,
    )
    builders = {
        "greentune q4_k": lambda: greentune_adapt(copy.deepcopy(base), "q4_k"),
        "greentune nf4": lambda: greentune_adapt(copy.deepcopy(base), "nf4"),
        "HF+PEFT bf16": lambda: peft_wrap(copy.deepcopy(base)),
        "HF+PEFT+bnb 4-bit": lambda: hf_bnb(base),
        "unsloth 4-bit": lambda: unsloth_model(base, seq),  # before greentune bf16 changes `base`
        "greentune bf16": lambda: greentune_adapt(base, "bf16"),  # last: adapts `base` itself
    }
    variants = {}
    for name, build in builders.items():
        t = time.perf_counter()
        try:
            model = build()
        except Exception as exc:  # noqa: BLE001 - a missing or failing peer is reported, not fatal
            print(
                f"  {name}: skipped ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
            )
            continue
        model.train()
        step, opt = make_step(model, ids, objective=name.startswith("greentune"))
        variants[name] = (model, step, opt)
        print(f"  {name}: built in {time.perf_counter() - t:.1f} s", flush=True)
    base = None  # free it (the builders' closures share this binding)
    for _name, (_, step, _) in variants.items():  # warm-up: Triton compiles, optimiser state
        step()
    times = {n: [] for n in variants}
    rise = {n: 0 for n in variants}
    for _ in range(steps):
        for name, (_, step, _) in variants.items():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t)
            if device.type == "cuda":
                rise[name] = max(rise[name], torch.cuda.max_memory_allocated(device) - before)
    kept = sum(b.numel() * b.element_size() for b in triton_dispatch._buffers.values())
    tps = {n: batch * seq / statistics.median(t) for n, t in times.items()}
    peak = {
        n: tensor_bytes(m, o) + rise[n] + (kept if n in ("greentune q4_k", "greentune nf4") else 0)
        for n, (m, _, o) in variants.items()
    }
    print(f"tokens/s (median of {steps}, round-robin) and peak memory as if alone:")
    for n in variants:
        mem = f"{peak[n] / 2**30:6.2f} GiB" if device.type == "cuda" else "  (cpu)"
        print(f"  {n:>18}: {tps[n]:9.0f} tokens/s   step {statistics.median(times[n]):.3f} s   peak {mem}")
    ratios = [
        ("greentune q4_k", "greentune bf16"),
        ("greentune nf4", "greentune bf16"),
        ("greentune q4_k", "HF+PEFT+bnb 4-bit"),
        ("greentune q4_k", "HF+PEFT bf16"),
        ("greentune bf16", "HF+PEFT bf16"),
        ("greentune q4_k", "unsloth 4-bit"),
    ]
    for a, b in ratios:
        if a in tps and b in tps:
            print(
                f"ratio {a} / {b}: step time {tps[b] / tps[a]:.2f}x, tokens/s {tps[a] / tps[b]:.2f}x, "
                f"peak memory {peak[a] / max(1, peak[b]):.2f}x"
            )


# ---- 3. the reference job at full depth ------------------------------------------------------


def build_reference(device, cfg, fmt: str, budget_s: float):
    """All layers on `device`, each drawn at random there and quantised before the next is drawn.
    If the projected quantise time passes `budget_s`, the remaining layers are copies of the last
    drawn one (the same bytes, so the same memory and compute; said in the output)."""
    import transformers as tf

    from greentune.quant import quantize_model_

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
        )
    std = cfg.initializer_range

    def draw(module):
        module.to_empty(device=device, recurse=True)
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.fill_(1.0) if "norm" in n else p.normal_(0.0, std)

    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        draw(part)
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    t0, drawn = time.perf_counter(), 0
    layers = model.model.layers
    for i in range(len(layers)):
        elapsed = time.perf_counter() - t0
        if drawn and elapsed / drawn * len(layers) > budget_s:
            layers[i] = copy.deepcopy(layers[drawn - 1])
            layers[i].self_attn.layer_idx = i
            continue
        draw(layers[i])
        quantize_model_(layers[i], fmt)
        drawn += 1
    quantize_model_(model, fmt)  # the embedding and lm_head
    took = time.perf_counter() - t0
    print(
        f"built {len(layers)} layers on {device}: {drawn} drawn and quantised to {fmt} ({took:.0f} s)"
        + (
            f", {len(layers) - drawn} copies of the last drawn layer (quantise budget {budget_s:.0f} s)"
            if drawn < len(layers)
            else ""
        ),
        flush=True,
    )
    return model


def plan_prediction(smoke: bool, seq: int, batch: int) -> dict | None:
    """`greentune plan --json` for the reference recipe on this GPU (smoke: the catalogue's H200)."""
    cmd = [
        sys.executable,
        "-m",
        "greentune",
        "plan",
        "--model",
        "mixtral-8x7b",
        "--hardware",
        "H200" if smoke else "this",
        "--power-cap-w",
        "1000",
        "--deadline-h",
        "10",
        "--seq-len",
        str(seq),
        "--batch-size",
        str(batch),
        "--rank",
        str(RANK),
        "--json",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        print(f"greentune plan gave no JSON (rc {r.returncode}): {r.stderr.strip()[-300:]}")
        return None


def part_reference(device, smoke: bool, steps: int, seq: int, batch: int, budget_s: float) -> None:
    from greentune.energy.meter import Meter

    cfg = mixtral_config(2 if smoke else 32, seq, smoke)
    torch.manual_seed(0)
    model = build_reference(device, cfg, "q4_k", budget_s)
    greentune_adapt(model, "bf16")  # already quantised: LoRA and SparseExperts only
    model.config.use_cache = False
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    on = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    print(f"  activation checkpointing: {'on' if on and all(on) else 'OFF'}")
    if device.type == "cuda":
        build_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    step, opt = make_step(model, ids, objective=True)
    step()  # warm-up (Triton compiles)
    meter = Meter.auto(scope="self", gpus=device.type == "cuda", poll_interval_s=0.5)
    sync(device)
    window = meter.start("train")
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t
    m = window.end()
    meter.close()
    tokens = steps * batch * seq
    tps = tokens / seconds
    gpu_j = sum(v for k, v in m.joules.items() if k.startswith("gpu"))
    print(
        f"reference job: {cfg.num_hidden_layers} layers, q4_k, LoRA r{RANK} attention + experts, "
        f"batch {batch}x{seq}, activation checkpointing, {steps} steps in {seconds:.1f} s"
    )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        print(
            f"  peak memory (torch.cuda.max_memory_allocated) training {peak / 1e9:.2f} GB, "
            f"building {build_peak / 1e9:.2f} GB; reserved "
            f"{torch.cuda.max_memory_reserved(device) / 1e9:.2f} GB"
        )
    it_w = m.total_joules / m.seconds if m.seconds else 0.0
    parts = ", ".join(f"{k}={v:.0f} J ({m.source.get(k)})" for k, v in m.joules.items())
    print(
        f"  {tps:.0f} tokens/s; energy {m.total_joules:.0f} J ({parts}): {m.total_joules / tokens:.3f} "
        "J/token IT, "
        f"{gpu_j / tokens:.3f} J/token GPU; mean IT power {it_w:.0f} W"
    )
    plan = plan_prediction(smoke, seq, batch)
    pue = plan["site"]["pue"] if plan else 1.58
    cap = 1000.0
    scale = min(1.0, cap / it_w) if it_w else 1.0  # throttled to the cap if it draws more
    hours = 10.0
    print(
        f"  projection, {hours:.0f} h under a {cap:.0f} W cap: {tps * scale * hours * 3600 / 1e6:.1f} M "
        "tokens, "
        f"{min(it_w, cap) * hours / 1e3:.2f} kWh IT, {min(it_w, cap) * hours / 1e3 * pue:.2f} kWh facility "
        f"(PUE {pue})"
    )
    if plan:
        est = next((e for e in plan["estimates"] if e["technique"]["name"] == "qlora-q4_k"), None)
        if est:
            flops = est["flops_per_token"] * tps
            util = (
                flops / (plan["hardware"]["bf16_tflops"] * 1e12)
                if plan["hardware"].get("bf16_tflops")
                else float("nan")
            )
            print(
                f"  greentune plan (qlora-q4_k, {plan['hardware']['name']}): {est['tokens_per_second']:.0f} "
                "tokens/s, "
                f"{est['memory_bytes'] / 1e9:.1f} GB, {est['power_w']:.0f} W, utilisation "
                f"{est['utilisation']}; "
                f"10 h: {est['tokens_per_second'] * hours * 3600 / 1e6:.1f} M tokens, "
                f"{est['power_w'] * hours / 1e3:.2f} kWh IT"
            )
            print(
                f"  measured utilisation (plan's model FLOPs/token {est['flops_per_token']:.3g} x tokens/s / "
                "peak bf16; "
                f"checkpointing's recompute not counted): {util:.3f}"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["dequant", "models", "reference"])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: proves the script runs")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 5 for models, 20 for reference)"
    )
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; smoke 32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--quantise-budget-s",
        type=float,
        default=150.0,
        help="reference: seconds for drawing and quantising the 32 layers (then copies)",
    )
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_headline: error: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    seq = args.seq or (32 if args.smoke else 2048)
    header(device)
    if args.part == "dequant":
        part_dequant(device, args.smoke)
    elif args.part == "models":
        part_models(device, args.smoke, args.steps or (2 if args.smoke else 5), seq, args.batch)
    else:
        part_reference(
            device,
            args.smoke,
            args.steps or (2 if args.smoke else 20),
            seq,
            args.batch,
            args.quantise_budget_s,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
