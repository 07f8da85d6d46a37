"""The cost model: memory, FLOPs, time, energy, carbon and water of one technique on one machine.

Everything here is arithmetic on `ArchFacts` (greentune.models.facts); the maths:

**Weights** (bytes): each matmul weight of the frozen base in its storage format —
bits per weight `BPW`: bf16 16, fp32 32, q8_0 8.5 (32 int8 + one f16 scale), q4_0 / q4_k
4.5, nf4 4.127 (4 + 8/64 for the double-quantised absmax + 32/(64·256) for its scales,
QLoRA). A quantised base quantises its token embedding in the same format and its LM head
in Q6_K (6.5625 bpw; Q8_0 for a q8_0 base), as llama.cpp's Q4_K_M does (a tied pair is one
table, in the head's format); norms and biases stay in the compute dtype (bf16 on
GPU/Apple, fp32 on CPU), as does everything of an unquantised base.

**Trainable state** (bytes per trainable parameter): full fine-tuning in mixed precision
keeps working weights and grads in the compute dtype, an fp32 master copy (bf16 only) and
AdamW's two fp32 moments: 2+2+4+8 = 16 B (bf16) or 4+4+0+8 = 16 B (fp32). LoRA adapters
are fp32: 4 (weight) + 4 (grad) + 8 (moments) = 16 B. LoRA rank r on a (d_out × d_in)
matrix adds r·(d_in + d_out) parameters.

**Activations** (elements per token, × compute-dtype bytes), a block with memory-efficient
attention (no T² scores kept) and SwiGLU:
  per layer: 4·H (two norm inputs and outputs) + q + k + v + o (heads·d_qk + kv·d_qk +
  kv·d_v + heads·d_v) + MLP: dense 4·I (gate, up, act(gate), product), MoE k·(H + 4·I_e) + E
  (dispatched copies, router logits) + 4·I_shared;
  once: logits V·(b + 8) bytes (compute-dtype logits, their fp32 upcast and fp32 gradient).
With activation checkpointing per layer only the layer inputs (H per layer) stay, plus one
layer's activations during its recompute. Tokens resident = micro-batch × sequence length.
Overhead: 1 GB (CUDA context / runtime) + 5 % of the rest (allocator fragmentation); a
quantised base in plain torch also materialises its largest weight tensor (all experts of
one layer for fused MoE) in the compute dtype while it multiplies.

**FLOPs per token** (N = active matmul params incl. LM head, A = attention score+value
FLOPs of a forward, `ArchFacts.forward_flops_per_token`): a linear layer costs 2N in the
forward, 2N for the gradient w.r.t. its input and 2N for the gradient w.r.t. its weight.
  full fine-tune   6·N + 3·A
  LoRA (frozen W)  4·N + 3·A + 6·P_a   (no weight-gradient for frozen W; the input-gradient
                   still flows through every frozen layer; P_a = active LoRA parameters,
                   each of which costs 2+2+2 like any trainable weight); a trained router
                   (upcycling) adds its own 2·N_router weight-gradient.
  checkpointing    + 2·(N − V·H) + A + 2·P_a  (one extra forward of the blocks)
  ReLoRA merges    + 2·r·N_targeted per merge (B·A products), every `merge_every` steps.
**Time** = FLOPs / (devices × peak × utilisation) + dequantisation time, where a quantised
base in plain torch is dequantised once per pass (forward, backward, recompute) per
micro-step: N_q weights, each at the format's measured seconds per weight when `plan
--calibrate` timed it, else N_q · (bpw/8 + 2·b) bytes at the hardware's bandwidth.
Utilisation depends on the model's width and on dense vs MoE; see `calibrate.py`.
**Energy**: average IT power = devices × board power × load + host power; kWh = W·s/3.6e6;
facility kWh = IT × PUE; kgCO2e = facility kWh × grid g/kWh / 1000; litres = IT kWh ×
WUE_onsite + facility kWh × off-site L/kWh (Li et al., arXiv 2304.03271).
Multi-GPU: FSDP-style sharding of weights and optimiser state over the devices;
communication time is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from greentune import recipe as defaults
from greentune.errors import UserError
from greentune.formats import BASE_BPW, DEFAULT_BASE_FORMAT, NON_EXPERT_BPW
from greentune.models.facts import ArchFacts
from greentune.plan.hardware import GB, Hardware
from greentune.recipe import Recipe

BPW = BASE_BPW  # bits per weight of each base format (greentune.formats)
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# the lm_head of a quantised base: Q6_K (6.5625 bpw), Q8_0 for a q8_0 or mxfp4 base
HEAD_BPW = {"q8_0": 8.5, "mxfp4": 8.5}
TARGET_KINDS = {"attn": ("attn",), "mlp": ("mlp",), "experts": ("experts",)}
DEFAULT_UTILISATION = {"gpu": 0.35, "apple": 0.25, "cpu": 0.30}
DEFAULT_LOAD = {"gpu": 0.8, "apple": 0.8, "cpu": 1.0}
OVERHEAD_BYTES = 1.0 * GB
#: CPU-seconds per weight of greentune's native quantisers, one core (2-core AMD EPYC, 2026-12-02,
#: `fmt.quantize` of a 2048×4096 fp32 weight, process time): Q4_K 57 M weights per CPU-second
#: (its scale search), Q8_0 960 M, Q4_0 610 M, NF4 740 M. A ReLoRA merge into a quantised base
#: re-quantises every adapted weight, which the 2·r·N merge FLOPs had put at nothing.
QUANTISE_CPU_S_PER_WEIGHT = {"q4_k": 1 / 57e6, "q8_0": 1 / 960e6, "q4_0": 1 / 610e6, "nf4": 1 / 740e6}
#: The rest of a merge, per weight and CPU-second: dequantise, build each expert's B·A, add
#: (`benchmarks/rehearsal.py`, 2026-12-02, quiet: one merge of 14.51 B Q4_K weights of a
#: Mixtral-8x7B-shaped model took 285.5 s on 2 cores, 3.93e-8 CPU-s a weight, minus the quantiser's).
MERGE_CPU_S_PER_WEIGHT = 2 * 285.5 / 14.512e9 - QUANTISE_CPU_S_PER_WEIGHT["q4_k"]
CPU_DEQUANT_CHUNK_WEIGHTS = 1 << 20  # greentune.quant.linear.CHUNK_WEIGHTS (plan/ imports no torch)
FRAGMENTATION = 0.05
SECONDS_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Technique:
    """One combination of the four techniques.

    method: ``full`` | ``lora`` | ``relora``; quant_base: ``none`` | ``q8_0`` | ``q4_0`` |
    ``q4_k`` | ``nf4`` (frozen base storage; ``none`` = compute dtype); upcycle:
    (experts, top_k) for a dense base, trained with the router and expert adapters.
    """

    name: str
    method: str = "lora"
    quant_base: str = DEFAULT_BASE_FORMAT
    rank: int = defaults.LORA_RANK
    targets: tuple[str, ...] = defaults.LORA_TARGETS
    upcycle: tuple[int, int] | None = None
    merge_every: int = defaults.MERGE_EVERY

    @classmethod
    def from_recipe(cls, recipe: Recipe, name: str | None = None) -> Technique:
        """The technique a recipe trains; `name` defaults to `recipe: [upcycle-](re)lora[-FORMAT]`."""
        method, moe = recipe.method, recipe.moe
        kind = "relora" if method.relora else "lora"
        upcycle = (moe.upcycle.experts, moe.upcycle.top_k) if moe and moe.upcycle else None
        if name is None:
            fmt = f"-{method.quant_base}" if method.quant_base != DEFAULT_BASE_FORMAT else ""
            name = f"recipe: {'upcycle-' if upcycle else ''}{kind}{fmt}"
        return cls(
            name,
            kind,
            method.quant_base,
            method.lora.rank,
            tuple(method.lora.targets),
            upcycle,
            method.relora.merge_every if method.relora else defaults.MERGE_EVERY,
        )

    def __post_init__(self):
        if self.method not in ("full", "lora", "relora"):
            raise UserError(f"unknown method {self.method!r}: full | lora | relora")
        if self.quant_base not in BPW:
            raise UserError(
                f"unknown quant_base {self.quant_base!r}: {' | '.join(k for k in BPW if k != 'fp16')}"
            )
        if self.method == "full" and self.quant_base not in ("none", "bf16", "fp32"):
            raise UserError("full fine-tuning trains every weight; it cannot keep a quantised base")
        bad = [t for t in self.targets if t not in TARGET_KINDS]
        if bad:
            raise UserError(f"unknown LoRA target(s) {bad}: attn | mlp | experts")
        if self.rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {self.rank}")


@dataclass(frozen=True)
class Workload:
    """What is trained: `tokens` in total, as sequences of `seq_len` in micro-batches of
    `micro_batch` sequences, `grad_accum` micro-batches per optimiser step."""

    tokens: int
    seq_len: int = defaults.SEQ_LEN
    micro_batch: int = defaults.BATCH_SIZE
    grad_accum: int = defaults.GRAD_ACCUM

    def __post_init__(self):
        for k in ("tokens", "seq_len", "micro_batch", "grad_accum"):
            if int(getattr(self, k)) < 1:
                raise UserError(f"{k} must be >= 1, got {getattr(self, k)}")

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Workload:
        """The tokens a recipe trains on: steps × batch × accumulation × sequence length."""
        t = recipe.train
        return cls(
            t.steps * t.batch_size * t.grad_accum * recipe.data.max_seq_len,
            recipe.data.max_seq_len,
            t.batch_size,
            t.grad_accum,
        )

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch * self.grad_accum

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    @property
    def micro_steps(self) -> int:
        return self.steps * self.grad_accum


@dataclass(frozen=True)
class Site:
    """Energy factors: PUE, on-site WUE (L/IT kWh), grid gCO2e/kWh, off-site L/kWh; with sources."""

    region: str
    grid_g_per_kwh: float
    offsite_l_per_kwh: float
    pue: float
    wue_onsite: float
    sources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SiteSpec:
    """What the user says about where a run happens (recipe `energy:` or `plan --region/--pue/--wue`);
    None: the region's (or the machine kind's) default. `recommend.site_factors` resolves it to a `Site`."""

    region: str | None = None
    pue: float | None = None
    wue_onsite: float | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> SiteSpec:
        e = recipe.energy
        return cls(e.region, e.pue, e.wue_onsite)


@dataclass
class Estimate:
    """The planner's prediction for one technique; bytes, FLOPs, seconds, W, kWh, kg, L."""

    technique: Technique
    devices: int
    total_params: int
    trainable_params: int
    memory: dict  # bytes per device by part; see module docstring
    checkpointing: bool
    memory_bytes: float  # per device, with the chosen checkpointing
    memory_available_bytes: float
    flops_per_token: float
    total_flops: float
    utilisation: float
    compute_seconds: float
    dequant_seconds: float
    seconds: float
    power_w: float  # average IT power while training
    peak_power_w: float  # all boards at full power + host, for a power cap
    it_kwh: float
    facility_kwh: float
    kg_co2e: float
    water_l: float
    reasons: list[str] = field(default_factory=list)  # why it does not fit (empty: fits)
    requant_seconds: float = 0.0  # ReLoRA merges re-quantising a quantised base (in `seconds`)

    @property
    def fits(self) -> bool:
        return not self.reasons

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    @property
    def tokens_per_second(self) -> float:
        return self.total_flops / self.flops_per_token / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["technique"] = asdict(self.technique)
        d["fits"] = self.fits
        d["hours"] = self.hours
        d["tokens_per_second"] = self.tokens_per_second
        return d


# ---------------------------------------------------------------- pieces


def _target_kinds(t: Technique) -> set[str]:
    kinds = {k for name in t.targets for k in TARGET_KINDS[name]}
    if t.upcycle:
        kinds.add("experts")  # identical expert copies only diverge through their adapters
    return kinds


def lora_params(facts: ArchFacts, t: Technique) -> tuple[int, int, int]:
    """(trainable LoRA params, active per token, weights they adapt): r·(d_in+d_out) per matrix."""
    kinds = _target_kinds(t)
    groups = [g for g in facts.linears if g.kind in kinds]
    total = sum(t.rank * (g.d_in + g.d_out) * g.count for g in groups)
    active = sum(t.rank * (g.d_in + g.d_out) * g.active for g in groups)
    return total, active, sum(g.params for g in groups)


def router_params(facts: ArchFacts) -> int:
    return sum(g.params for g in facts.linears if g.kind == "router")


def trainable_params(facts: ArchFacts, t: Technique) -> int:
    if t.method == "full":
        return facts.total_params
    return lora_params(facts, t)[0] + (router_params(facts) if t.upcycle else 0)


def activation_elements(facts: ArchFacts) -> tuple[float, float]:
    """(all layers, the largest single layer) activation elements per token, excluding logits."""
    kv = facts.heads if facts.attention == "mla" else facts.kv_heads
    attn = (facts.heads + kv) * facts.head_dim + (kv + facts.heads) * facts.v_head_dim
    base = 4 * facts.hidden + attn
    dense = base + 4 * facts.intermediate
    moe = (
        base
        + facts.top_k * (facts.hidden + 4 * facts.moe_intermediate)
        + facts.experts
        + 4 * facts.shared_intermediate
    )
    n_moe = facts.moe_layers
    total = (facts.layers - n_moe) * dense + n_moe * moe + facts.hidden
    largest = max(dense if facts.layers > n_moe else 0, moe if n_moe else 0)
    return float(total), float(largest)


def memory_breakdown(facts: ArchFacts, t: Technique, w: Workload, hw: Hardware, devices: int = 1) -> dict:
    """Bytes per device by part, and the totals with and without activation checkpointing."""
    b = DTYPE_BYTES[hw.compute_dtype]
    matmul = sum(g.params for g in facts.linears if g.kind not in ("head",))
    rest = facts.total_params - matmul  # embeddings, head, norms, biases
    if t.method == "full":
        master = 4 if b == 2 else 0
        weights = facts.total_params * b
        grads = facts.total_params * b
        optim = facts.total_params * (8 + master)
        trainable = 0.0
    else:
        bpw = BPW[t.quant_base] or 8 * b
        weights = matmul * bpw / 8 + rest * b
        if BPW[t.quant_base] is not None:  # embedding and head quantised too (as Q4_K_M)
            vh = facts.vocab * facts.hidden
            head_bpw = HEAD_BPW.get(t.quant_base, 6.5625)
            other = NON_EXPERT_BPW.get(t.quant_base, bpw)
            table = vh * head_bpw / 8 if facts.tied_embeddings else vh * (other + head_bpw) / 8
            mm_bits = sum(
                g.params * (bpw if g.kind == "experts" else other) for g in facts.linears if g.kind != "head"
            )
            weights = mm_bits / 8 + table + (rest - facts.embedding_params) * b
        n_train = trainable_params(facts, t)
        trainable, grads, optim = n_train * 4, n_train * 4, n_train * 8
    shard = float(devices)
    per_tok, largest = activation_elements(facts)
    micro = math.ceil(w.micro_batch / devices)
    toks = micro * w.seq_len
    logits = toks * facts.vocab * (b + 8)
    act = toks * per_tok * b + logits
    act_ckpt = toks * (facts.layers * facts.hidden + largest) * b + logits
    transient = 0.0
    if t.method != "full" and BPW[t.quant_base] is not None and hw.kind == "cpu":
        # a CPU rebuilds a quantised weight a block of rows at a time into one buffer per thread
        # (greentune.quant.linear.CHUNK_WEIGHTS fp32 values), never a whole matrix: modelling a
        # whole layer's fused experts here overstated a Mixtral-shaped run by 3.76 GB
        transient = CPU_DEQUANT_CHUNK_WEIGHTS * 4.0  # 4 MB a thread: within the overhead
    elif t.method != "full" and BPW[t.quant_base] is not None:
        per_tensor = [
            g.d_in * g.d_out * (2 * g.count // max(1, facts.moe_layers) if g.kind == "experts" else 1)
            for g in facts.linears
            if g.kind not in ("head",)
        ]
        transient = max(per_tensor, default=0) * b
    states = (weights + trainable + grads + optim) / shard
    sub = states + transient
    total = OVERHEAD_BYTES + (sub + act) * (1 + FRAGMENTATION)
    total_ckpt = OVERHEAD_BYTES + (sub + act_ckpt) * (1 + FRAGMENTATION)
    return {
        "weights": weights / shard,
        "trainable": trainable / shard,
        "grads": grads / shard,
        "optimizer": optim / shard,
        "activations": act,
        "activations_checkpointed": act_ckpt,
        "logits": logits,
        "dequant_transient": transient,
        "overhead": OVERHEAD_BYTES,
        "total": total,
        "total_checkpointed": total_ckpt,
    }


def choose_checkpointing(mem: dict, available_bytes: float, setting: bool | None = None) -> bool:
    """Activation checkpointing on or off: the recipe's `setting` when it gives one (True /
    False), else (auto, None) on exactly when the run would not fit in `available_bytes`
    without it. `mem` is `memory_breakdown`'s dict. The trainer and the planner both decide here."""
    if setting is not None:
        return bool(setting)
    return mem["total"] > available_bytes


def flops_per_token(facts: ArchFacts, t: Technique, seq_len: int, checkpointing: bool) -> float:
    """Training FLOPs per token (module docstring), causal attention over `seq_len`."""
    n = facts.active_matmul_params
    a = facts.attention_flops_per_token(seq_len)
    if t.method == "full":
        f = 6.0 * n + 3.0 * a
        p_a = 0
    else:
        _, p_a, _ = lora_params(facts, t)
        f = 4.0 * n + 3.0 * a + 6.0 * p_a
        if t.upcycle:
            f += 2.0 * router_params(facts)  # the new router is trained: its weight-gradient
    if checkpointing:
        f += 2.0 * (n - facts.vocab * facts.hidden) + a + 2.0 * p_a
    return f


def relora_merges(w: Workload, t: Technique) -> int:
    """Merges in a run of `w.steps` steps: after every `merge_every`-th step but the last (the
    trainer's own rule, `adapters.relora.ReLoRA.after_step`; the final merge is the export's)."""
    return max(0, (w.steps - 1) // t.merge_every)


def merge_flops(facts: ArchFacts, t: Technique, w: Workload) -> float:
    """ReLoRA: 2·r·N_targeted FLOPs per merge (W += B·A for every adapted matrix), `relora_merges` merges."""
    if t.method != "relora":
        return 0.0
    _, _, n_targeted = lora_params(facts, t)
    return 2.0 * t.rank * n_targeted * relora_merges(w, t)


def dequant_weights(facts: ArchFacts, t: Technique, w: Workload, checkpointing: bool) -> float:
    """How many base weights a quantised-base run dequantises: passes × N_q per micro-step
    (+ per ReLoRA merge: each adapted weight dequantised and re-quantised, counted twice)."""
    if t.method == "full" or BPW[t.quant_base] is None:
        return 0.0
    n_q = sum(g.params for g in facts.linears)  # the (quantised) head included
    passes = 3 if checkpointing else 2
    total = w.micro_steps * passes * n_q
    if t.method == "relora":
        _, _, n_targeted = lora_params(facts, t)
        total += relora_merges(w, t) * 2 * n_targeted
    return float(total)


def dequant_bytes(facts: ArchFacts, t: Technique, w: Workload, hw: Hardware, checkpointing: bool) -> float:
    """Memory traffic of dequantising a quantised base: every dequantised weight reads its
    packed bits and writes (then reads) one compute-dtype value: bpw/8 + 2·b bytes."""
    if t.method == "full" or BPW[t.quant_base] is None:
        return 0.0
    return dequant_weights(facts, t, w, checkpointing) * (
        BPW[t.quant_base] / 8 + 2 * DTYPE_BYTES[hw.compute_dtype]
    )


def requant_seconds(facts: ArchFacts, t: Technique, w: Workload, hw: Hardware) -> float:
    """ReLoRA into a quantised base: each merge re-quantises every adapted weight (dequantise →
    add → quantise); the quantiser's CPU-seconds per weight (`QUANTISE_CPU_S_PER_WEIGHT`) plus
    the rest of the merge (`MERGE_CPU_S_PER_WEIGHT`), over the CPU's cores. Not modelled on GPUs
    (the batched K-quant search there is not measured)."""
    if t.method != "relora" or BPW[t.quant_base] is None or hw.kind != "cpu":
        return 0.0
    rate = QUANTISE_CPU_S_PER_WEIGHT.get(t.quant_base)
    if rate is None:
        return 0.0
    rate += MERGE_CPU_S_PER_WEIGHT
    _, _, n_targeted = lora_params(facts, t)
    return relora_merges(w, t) * n_targeted * rate / max(1, hw.cores or 1)


def dequant_seconds(
    facts: ArchFacts,
    t: Technique,
    w: Workload,
    hw: Hardware,
    checkpointing: bool,
    s_per_weight: dict[str, float] | None = None,
) -> float:
    """Time spent dequantising: the measured seconds per weight of this format when the
    calibration timed it, else the memory traffic at the hardware's bandwidth."""
    rate = (s_per_weight or {}).get(t.quant_base)
    if rate is not None:
        return dequant_weights(facts, t, w, checkpointing) * rate
    return dequant_bytes(facts, t, w, hw, checkpointing) / (hw.bandwidth_gbs * GB)


def estimate(
    facts: ArchFacts,
    t: Technique,
    w: Workload,
    hw: Hardware,
    site: Site,
    devices: int = 1,
    utilisation: float | None = None,
    measured_power_w: float | None = None,
    power_cap_w: float | None = None,
    deadline_h: float | None = None,
    dequant_s_per_weight: dict[str, float] | None = None,
    checkpointing: bool | None = None,
) -> Estimate:
    """Predict one technique's cost on `devices` × `hw`, and whether it fits.

    checkpointing: True / False as a recipe's `train.activation_checkpointing` says; None
    (auto) turns it on only when the run would not fit without it (`choose_checkpointing`).
    utilisation: achieved / peak FLOP/s (calibrated, else `DEFAULT_UTILISATION[kind]`).
    measured_power_w: a calibrated average IT power for the whole machine (replaces the
    board × load + host model; single device only).
    dequant_s_per_weight: calibrated dequantisation time per weight, by format.
    """
    if devices < 1:
        raise UserError(f"--gpus must be >= 1, got {devices}")
    if devices > 1 and hw.kind != "gpu":
        raise UserError(f"--gpus {devices} needs GPUs; {hw.name} is a {hw.kind}")
    if t.upcycle:
        facts = facts.upcycled(*t.upcycle)
    mem = memory_breakdown(facts, t, w, hw, devices)
    available = hw.memory_gb * GB * hw.usable_fraction
    ckpt = choose_checkpointing(mem, available, checkpointing)
    need = mem["total_checkpointed"] if ckpt else mem["total"]
    u = utilisation if utilisation is not None else DEFAULT_UTILISATION[hw.kind]
    fpt = flops_per_token(facts, t, w.seq_len, ckpt)
    total_flops = fpt * w.tokens + merge_flops(facts, t, w)
    compute_s = total_flops / (devices * hw.peak_flops * u)
    dq_s = dequant_seconds(facts, t, w, hw, ckpt, dequant_s_per_weight) / devices
    rq_s = requant_seconds(facts, t, w, hw) / devices
    seconds = compute_s + dq_s + rq_s
    if measured_power_w is not None and devices == 1:
        power = float(measured_power_w)
    else:
        power = devices * hw.power_w * DEFAULT_LOAD[hw.kind] + hw.host_w
    peak_power = devices * hw.power_w + hw.host_w
    it_kwh = power * seconds / SECONDS_PER_KWH
    facility = it_kwh * site.pue
    kg = facility * site.grid_g_per_kwh / 1000
    water = it_kwh * site.wue_onsite + facility * site.offsite_l_per_kwh
    reasons = []
    if need > available:
        reasons.append(f"memory {need / GB:,.1f} GB > {available / GB:,.1f} GB usable per device")
    if power_cap_w is not None and peak_power > power_cap_w:
        reasons.append(f"power {peak_power:,.0f} W > cap {power_cap_w:,.0f} W")
    if deadline_h is not None and seconds / 3600 > deadline_h:
        h = seconds / 3600
        reasons.append(f"time {h:,.{1 if h - deadline_h > 0.05 else 3}f} h > deadline {deadline_h:g} h")
    return Estimate(
        technique=t,
        devices=devices,
        total_params=facts.total_params,
        trainable_params=trainable_params(facts, t),
        memory=mem,
        checkpointing=ckpt,
        memory_bytes=need,
        memory_available_bytes=available,
        flops_per_token=fpt,
        total_flops=total_flops,
        utilisation=u,
        compute_seconds=compute_s,
        dequant_seconds=dq_s,
        requant_seconds=rq_s,
        seconds=seconds,
        power_w=power,
        peak_power_w=peak_power,
        it_kwh=it_kwh,
        facility_kwh=facility,
        kg_co2e=kg,
        water_l=water,
        reasons=reasons,
    )
