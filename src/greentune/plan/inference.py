"""Modelled serving cost: tokens/s and J/token of an exported model on a catalogue device.

    prof = profile_from_gguf("runs/x/export/model-q4_k_m.gguf")     # or profile_from_facts(facts, "q4_k_m")
    p = project(prof, find_hardware("M2"), prompt_tokens=256, gen_tokens=128)
    p.decode_tokens_per_s, p.decode_j_per_token, p.prompt_tokens_per_s

The model (every number it gives is *modelled*, not measured):

* decode (one token at a time, batch 1) is memory-bound: each token reads the active
  weights once, plus the KV cache of the context so far. t_decode = max(B / BW, F / peak),
  B = active weight bytes + KV bytes per context token × mean context (prompt + gen/2),
  BW = the device's memory bandwidth, F = 2 × active matmul weights + attention FLOPs.
  Active weights: every tensor in full except the token embedding (one row per token) and
  routed experts (top_k / experts of them: a MoE token reads only its experts' weights).
* prompt processing is compute-bound: t_prompt = N × F(N) / (peak FLOP/s × u), u the
  utilisation (`PROMPT_UTILISATION` unless measured), and never faster than reading the
  weights once (B / BW).
* energy: J/token = t × P, P = the device's power figure from the catalogue (board TDP plus
  host for GPUs, whole-machine maximum for Apple, package power of the threads used for a
  CPU): an upper bound where the device idles part of its power budget while it waits on memory.

`profile_from_gguf` reads the file's own tensor sizes (bytes as stored, so each quant
mix is exact); `profile_from_facts` uses nominal bits per weight of a preset, for a plan
made before anything is exported. The KV cache is f16 (llama.cpp's default).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from greentune.errors import UserError
from greentune.formats import DEFAULT_GGUF_QUANT, GGUF_NOMINAL_BITS
from greentune.plan.hardware import Hardware
from greentune.recipe import Recipe

log = logging.getLogger(__name__)

#: Assumed share of peak FLOP/s that batched prompt processing reaches (llama.cpp-class runtime).
PROMPT_UTILISATION = 0.5
#: Bits per weight of each GGUF preset (most tensors) and of its output head (greentune.formats).
NOMINAL_BITS = GGUF_NOMINAL_BITS
KV_BYTES = 2  # f16 K and V
#: The laptop a client serves on, in the reference case (the report's "cost to serve").
TARGET_LAPTOP = "Apple M2"
SERVING_DEVICES = ("Apple M2", "Apple M3", "Apple M4")


@dataclass(frozen=True)
class InferenceProfile:
    """What one token of a model costs in bytes and FLOPs, device-independent.

    Attributes:
        weight_bytes_per_token: active weight bytes read per decoded token.
        kv_bytes_per_context_token: K+V bytes per token of context, read by each decoded token.
        matmul_params: active matmul weights per token (FLOPs = 2 × this).
        attn_flops_per_context_token: score + value FLOPs per token of context attended.
        file_bytes: the whole model's bytes (what must fit in memory).
    """

    name: str
    format: str
    weight_bytes_per_token: float
    kv_bytes_per_context_token: float
    matmul_params: float
    attn_flops_per_context_token: float
    file_bytes: float

    def flops_per_token(self, mean_context: float) -> float:
        return 2.0 * self.matmul_params + self.attn_flops_per_context_token * mean_context


@dataclass(frozen=True)
class Projection:
    """Modelled serving numbers of one profile on one device (all `modelled`)."""

    device: str
    format: str
    decode_tokens_per_s: float
    decode_j_per_token: float
    prompt_tokens_per_s: float
    prompt_j_per_token: float
    power_w: float
    bandwidth_gbs: float
    decode_bound: str  # "memory" | "compute"
    fits: bool
    basis: str = "modelled"

    @property
    def j_per_1k_generated(self) -> float:
        return 1000.0 * self.decode_j_per_token

    def to_dict(self) -> dict:
        return {**asdict(self), "j_per_1k_generated": self.j_per_1k_generated}


def _field(reader, key: str, default=None):
    f = reader.get_field(key)
    return f.contents() if f is not None else default


def profile_from_gguf(path: str | Path) -> InferenceProfile:
    """The profile of a GGUF file from its tensors and hyperparameters (see module docstring)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # not a GGUF, or a torn one
        raise UserError(f"cannot read {path} as GGUF: {err}") from None
    arch = _field(reader, "general.architecture", "llama")
    layers = int(_field(reader, f"{arch}.block_count", 0))
    heads = int(_field(reader, f"{arch}.attention.head_count", 1))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    hidden = int(_field(reader, f"{arch}.embedding_length", 0))
    d_k = int(_field(reader, f"{arch}.attention.key_length", hidden // max(heads, 1)))
    d_v = int(_field(reader, f"{arch}.attention.value_length", d_k))
    experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    top_k = int(_field(reader, f"{arch}.expert_used_count", 0) or 0)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    weight_bytes = matmul = 0.0
    for t in reader.tensors:
        nbytes, n = float(t.n_bytes), float(t.n_elements)
        frac = 1.0
        if t.name == "token_embd.weight" and not tied:
            rows = float(t.shape[-1]) if len(t.shape) > 1 else 1.0  # gguf shapes are (n_embd, n_vocab)
            weight_bytes += nbytes / max(rows, 1.0)
            continue
        if "_exps." in t.name and experts:
            frac = top_k / experts
        weight_bytes += nbytes * frac
        if len(t.shape) >= 2:  # matrices (and stacked experts, router included); not norms or biases
            matmul += n * frac
    from greentune.export.llamacpp import gguf_preset

    return InferenceProfile(
        name=path.name,
        format=gguf_preset(path),
        weight_bytes_per_token=weight_bytes,
        kv_bytes_per_context_token=float(KV_BYTES * layers * kv_heads * (d_k + d_v)),
        matmul_params=matmul,
        attn_flops_per_context_token=float(2 * layers * heads * (d_k + d_v)),
        file_bytes=float(path.stat().st_size),
    )


def profile_from_facts(facts, quant: str = DEFAULT_GGUF_QUANT, name: str = "model") -> InferenceProfile:
    """A nominal profile of a model (`models.facts.ArchFacts`) exported as `quant`."""
    if quant not in NOMINAL_BITS:
        raise UserError(f"no nominal size for GGUF preset {quant!r}; known: {', '.join(NOMINAL_BITS)}")
    bits, head_bits = NOMINAL_BITS[quant]
    vh = facts.vocab * facts.hidden
    head = vh  # the output head (the embedding itself when tied) is read in full
    body_active = facts.active_params - (vh if facts.tied_embeddings else 2 * vh)
    body_total = facts.total_params - (vh if facts.tied_embeddings else 2 * vh)
    weight_bytes = (
        body_active * bits / 8
        + head * head_bits / 8
        + (0 if facts.tied_embeddings else facts.hidden * bits / 8)
    )
    file_bytes = (
        body_total * bits / 8 + head * head_bits / 8 + (0 if facts.tied_embeddings else vh * bits / 8)
    )
    return InferenceProfile(
        name=name,
        format=quant,
        weight_bytes_per_token=float(weight_bytes),
        kv_bytes_per_context_token=float(
            KV_BYTES * facts.layers * facts.kv_heads * (facts.head_dim + facts.v_head_dim)
        ),
        matmul_params=float(facts.active_matmul_params),
        attn_flops_per_context_token=float(
            2 * facts.layers * facts.heads * (facts.head_dim + facts.v_head_dim)
        ),
        file_bytes=float(file_bytes),
    )


def decode_bytes_per_token(profile: InferenceProfile, prompt_tokens: int, gen_tokens: int) -> float:
    """Bytes one decoded token reads: active weights + KV cache at the mean context (prompt + gen/2)."""
    return profile.weight_bytes_per_token + profile.kv_bytes_per_context_token * (
        prompt_tokens + gen_tokens / 2.0
    )


def effective_bandwidth_gbs(
    profile: InferenceProfile, decode_tokens_per_s: float, prompt_tokens: int, gen_tokens: int
) -> float:
    """The weight-streaming rate a measured decode implies, GB/s: the inverse of `project`'s memory term.

    Measured on one model of a format on one machine, it calibrates the projection of other
    models in that format there (a CPU thread that dequantises and multiplies while it reads
    streams weights slower than its memory system could deliver them)."""
    return decode_bytes_per_token(profile, prompt_tokens, gen_tokens) * decode_tokens_per_s / 1e9


def device_power_w(hw: Hardware, threads: int | None = None) -> float:
    """Power while serving: GPU board + host, Apple whole machine, CPU package power of `threads` threads."""
    if hw.kind == "cpu" and threads is not None and hw.name.startswith("this"):
        from greentune.plan.hardware import _cpu_watts

        return _cpu_watts(int(threads))[0]
    return hw.power_w + hw.host_w


def project(
    profile: InferenceProfile,
    hw: Hardware,
    prompt_tokens: int = 256,
    gen_tokens: int = 128,
    *,
    bandwidth_gbs: float | None = None,
    power_w: float | None = None,
    prompt_utilisation: float = PROMPT_UTILISATION,
    peak_flops: float | None = None,
) -> Projection:
    """Modelled decode and prompt-processing speed and energy of `profile` on `hw` (module docstring).

    `bandwidth_gbs`, `power_w`, `peak_flops` replace the catalogue's figures (e.g. measured ones)."""
    if prompt_tokens < 1 or gen_tokens < 1:
        raise UserError("prompt and generated tokens must be at least 1")
    bw = float(bandwidth_gbs if bandwidth_gbs is not None else hw.bandwidth_gbs) * 1e9
    peak = float(peak_flops if peak_flops is not None else hw.peak_flops)
    power = float(power_w if power_w is not None else device_power_w(hw))
    ctx = prompt_tokens + gen_tokens / 2.0
    t_mem, t_flop = (
        decode_bytes_per_token(profile, prompt_tokens, gen_tokens) / bw,
        profile.flops_per_token(ctx) / peak,
    )
    t_decode = max(t_mem, t_flop)
    t_prompt = max(
        prompt_tokens * profile.flops_per_token((prompt_tokens + 1) / 2.0) / (peak * prompt_utilisation),
        profile.weight_bytes_per_token / bw,
    )
    pp_tps = prompt_tokens / t_prompt
    return Projection(
        device=hw.name,
        format=profile.format,
        decode_tokens_per_s=1.0 / t_decode,
        decode_j_per_token=power * t_decode,
        prompt_tokens_per_s=pp_tps,
        prompt_j_per_token=power / pp_tps,
        power_w=power,
        bandwidth_gbs=bw / 1e9,
        decode_bound="memory" if t_mem >= t_flop else "compute",
        fits=profile.file_bytes <= hw.memory_gb * 1e9 * hw.usable_fraction,
    )


def serving_devices(training: Hardware | None = None) -> list[Hardware]:
    """Apple M2 / M3 / M4 and, when given, the training device."""
    from greentune.plan.hardware import find_hardware

    out = [find_hardware(n) for n in SERVING_DEVICES]
    if training is not None and training.name not in SERVING_DEVICES:
        out.append(training)
    return out


def measure_bandwidth(threads: int = 1, megabytes: int = 512, repeats: int = 5, clock: str = "wall") -> float:
    """This machine's memory read bandwidth with `threads` threads, GB/s: the best of `repeats`
    sums over a `megabytes` fp32 buffer (far larger than any CPU cache).

    `clock="cpu"` times each sum in process CPU seconds ÷ threads: the bandwidth while the
    threads ran, for a machine where other jobs take turns on the cores."""
    import torch

    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    tick = time.perf_counter if clock == "wall" else (lambda: time.process_time() / max(int(threads), 1))
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        buf = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
        buf.sum()
        best = float("inf")
        for _ in range(repeats):
            t0 = tick()
            buf.sum()
            best = min(best, tick() - t0)
    finally:
        torch.set_num_threads(before)
    return buf.numel() * 4 / max(best, 1e-9) / 1e9


def export_quant_of(recipe: Recipe | None) -> str:
    """The first GGUF preset a recipe exports (`export:` entries), else the default GGUF export."""
    for item in recipe.export if recipe is not None else []:
        if item.format == "gguf":
            return item.quant or DEFAULT_GGUF_QUANT
    return DEFAULT_GGUF_QUANT


def format_serving(
    profile: InferenceProfile, projections: list[Projection], prompt_tokens: int, gen_tokens: int
) -> str:
    """The short table `greentune plan` prints after the training plan."""
    lines = [
        f"serving the exported model ({profile.format}, {profile.file_bytes / 1e9:.2f} GB; modelled: decode "
        "= "
        f"active weight bytes ÷ bandwidth, prompt = FLOPs ÷ ({PROMPT_UTILISATION:g} × peak); "
        f"{prompt_tokens}-token prompt, {gen_tokens} generated):",
        f"  {'device':<28}{'decode tok/s':>13}{'J/token':>10}{'prompt tok/s':>14}{'J/1k gen':>10}  fits",
    ]
    for p in projections:
        lines.append(
            f"  {p.device:<28}{p.decode_tokens_per_s:>13,.1f}{p.decode_j_per_token:>10.3g}"
            f"{p.prompt_tokens_per_s:>14,.0f}{p.j_per_1k_generated:>10.3g}  {'yes' if p.fits else 'no'}"
        )
    return "\n".join(lines)


def serving_plan(
    facts,
    training: Hardware | None,
    recipe: Recipe | None = None,
    upcycle: tuple[int, int] | None = None,
    prompt_tokens: int = 256,
    gen_tokens: int = 128,
) -> dict:
    """What `greentune plan` adds beside training: the served model's modelled cost per device.

    The served model is the base (upcycled if the recipe upcycles it) in the recipe's first
    GGUF preset. Returns {"profile", "projections", "text"} (JSON-ready but for `text`)."""
    if upcycle:
        facts = facts.upcycled(*upcycle)
    from greentune.plan.calibrate import load_streaming_rate

    prof = profile_from_facts(facts, export_quant_of(recipe))
    projections, calibrated = [], []
    for hw in serving_devices(training):
        rate = load_streaming_rate(hw, prof.format)  # a measured llama.cpp decode here, if any
        projections.append(
            project(prof, hw, prompt_tokens, gen_tokens, bandwidth_gbs=rate["gbs"] if rate else None)
        )
        if rate:
            calibrated.append(
                f"{hw.name}: {rate['gbs']:.1f} GB/s measured by llama.cpp at {rate['threads']} thread(s)"
            )
    text = format_serving(prof, projections, prompt_tokens, gen_tokens)
    if calibrated:
        text += "\n  streaming rate calibrated (greentune eval --engine llamacpp): " + "; ".join(calibrated)
    return {
        "profile": asdict(prof),
        "projections": [p.to_dict() for p in projections],
        "calibrated": calibrated,
        "text": text,
    }


def projections_for_file(
    path: str | Path, threads: int, prompt_tokens: int, gen_tokens: int, bandwidth_gbs: float | None = None
) -> dict:
    """The modelled serving cost of a GGUF file here and on the target laptop (what `greentune eval
    --engine llamacpp` prints beside its measurement).

    "this" is this machine as the planner sees it (`detect_this`), at the peak and power of
    `threads` threads on a CPU and at `bandwidth_gbs` (a probe's) when given."""
    import os

    from greentune.plan.hardware import detect_this, find_hardware

    prof = profile_from_gguf(path)
    this = detect_this()
    peak = None
    if this.kind == "cpu":
        cores = max(
            1,
            min(os.cpu_count() or 1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1),
        )
        peak = this.peak_flops * min(int(threads), cores) / cores
    here = project(
        prof,
        this,
        prompt_tokens,
        gen_tokens,
        bandwidth_gbs=bandwidth_gbs,
        power_w=device_power_w(this, threads),
        peak_flops=peak,
    )
    laptop = project(prof, find_hardware(TARGET_LAPTOP), prompt_tokens, gen_tokens)
    return {"this": here.to_dict(), TARGET_LAPTOP: laptop.to_dict()}
