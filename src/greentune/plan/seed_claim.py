"""The seed's claim, worked: Mixtral 8x7B, QLoRA 4-bit, one server under 1 kW, ~10 hours.

`seed_claim()` plans the job from Mixtral 8x7B's real config (32 layers, hidden 4096,
intermediate 14336, 8 experts top-2, 32 heads / 8 KV heads, vocab 32000; the catalogue
row) with the cost model of `greentune.plan.cost`:

1. for every GPU in the hardware catalogue, one per server: does the 4-bit base fit its
   memory, does the server (board power + host) stay under the cap, and how many tokens it
   trains in the time limit: tokens = hours × 3600 / (seconds per token), seconds per
   token being linear in tokens (FLOPs/(peak·u) plus dequantisation traffic per token);
2. on the GPU that trains the most tokens within the limits, every technique combination
   for that token count: which fit, which do not and why, and the energy, carbon and water
   of each.

`to_markdown()` writes the README section; every assumption comes from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from greentune import recipe as defaults
from greentune.plan.catalogue import find_model
from greentune.plan.cost import Estimate, SiteSpec, Technique, Workload, estimate
from greentune.plan.hardware import GB, Hardware, catalogue
from greentune.plan.recommend import CANDIDATE, DEFAULT_TARGETS, PlanResult, plan, site_factors

REFERENCE_TOKENS = 100_000_000  # the rate is linear in tokens; any large count gives it


@dataclass
class GpuRow:
    hardware: Hardware
    estimate: Estimate  # the technique on this GPU for `tokens`
    tokens: int  # tokens trained within the time limit (0 if it does not fit)
    fits_memory: bool
    fits_power: bool


@dataclass
class SeedClaim:
    technique: str
    hours: float
    power_cap_w: float
    gpus: list[GpuRow]
    best: GpuRow | None
    combinations: PlanResult | None
    assumptions: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        t = self.technique
        out = [
            "## The seed's claim, worked",
            "",
            f"*Mixtral 8x7B ({self._facts_line()}), {t}, one server under {self.power_cap_w:,.0f} W, "
            f"{self.hours:g} hours.* Computed by `greentune.plan.seed_claim.seed_claim()`; "
            "`tests/plan/test_seed_claim.py` recomputes it from the formulas.",
            "",
            f"### Which single-GPU server fits, and how many tokens in {self.hours:g} h",
            "",
            "| GPU | memory needed / usable GB | server peak W | fits | tokens/s | tokens in "
            f"{self.hours:g} h | IT kWh | facility kWh | kgCO2e | litres |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in self.gpus:
            e = g.estimate
            why = "yes" if g.fits_memory and g.fits_power else "no: " + "; ".join(e.reasons)
            mem = (
                f"{e.memory_bytes / GB:.1f}{' (ckpt)' if e.checkpointing else ''} / "
                f"{e.memory_available_bytes / GB:.1f}"
            )
            if g.tokens:
                out.append(
                    f"| {g.hardware.name} | {mem} | {e.peak_power_w:,.0f} | {why} | "
                    f"{e.tokens_per_second:,.0f} | {g.tokens / 1e6:,.0f} M | {e.it_kwh:.2f} | "
                    f"{e.facility_kwh:.2f} | {e.kg_co2e:.2f} | {e.water_l:.1f} |"
                )
            else:
                out.append(
                    f"| {g.hardware.name} | {mem} | {e.peak_power_w:,.0f} | {why} | – | – | – | – | – | – |"
                )
        out += [
            "",
            "(ckpt): fits only with activation checkpointing, which adds a forward pass of the blocks "
            "(≈ 1.5× the compute per token for a frozen base).",
        ]
        if self.best:
            b, e = self.best, self.best.estimate
            out += [
                "",
                f"**Answer:** on one {b.hardware.name} ({b.hardware.power_w:,.0f} W board + "
                f"{b.hardware.host_w:,.0f} W host = {e.peak_power_w:,.0f} W peak) the job fits in "
                f"{self.hours:g} h "
                f"up to **{b.tokens / 1e6:,.0f} M tokens** ({e.tokens_per_second:,.0f} tokens/s), using "
                f"{e.it_kwh:.1f} kWh IT / {e.facility_kwh:.1f} kWh facility, {e.kg_co2e:.2f} kgCO2e and "
                f"{e.water_l:.0f} L of water. Two such GPUs would draw up to "
                f"{2 * b.hardware.power_w + b.hardware.host_w:,.0f} W, over the cap; "
                + (
                    "the GPUs that fit, fastest first: "
                    + ", ".join(
                        f"{g.hardware.name} {g.tokens / 1e6:,.0f} M"
                        for g in sorted((g for g in self.gpus if g.tokens), key=lambda g: -g.tokens)
                    )
                    + "."
                ),
            ]
        if self.combinations:
            c = self.combinations
            out += [
                "",
                f"### Every technique combination on one {c.hardware.name}, "
                f"{c.workload.tokens / 1e6:,.0f} M tokens",
                "",
                "| technique | memory GB | time h | IT kWh | facility kWh | kgCO2e | litres | fits |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for e in c.estimates:
                fits = "yes" if e.fits else "no: " + "; ".join(e.reasons)
                out.append(
                    f"| {e.technique.name} | {e.memory_bytes / GB:.1f} | {e.hours:.1f} | {e.it_kwh:.2f} | "
                    f"{e.facility_kwh:.2f} | {e.kg_co2e:.2f} | {e.water_l:.1f} | {fits} |"
                )
            out += [
                "",
                f"Recommended (least energy that fits): **{c.recommended}**." if c.recommended else "",
                "",
                "### Assumptions",
                "",
            ] + [f"- {a}" for a in c.assumptions]
            best = self.best.hardware
            out += [
                "",
                "### How to read this, and what it does not say",
                "",
                f'- Reproduce a row with `greentune plan --model mixtral-8x7b --hardware "{best.aliases[0]}" '
                f"--power-cap-w {self.power_cap_w:g} --deadline-h {self.hours:g} --tokens "
                f"{self.best.tokens}`; "
                "`--json` gives every number.",
                f"- The GPU utilisation ({c.estimates[0].utilisation:.2f} of the dense bf16 peak) is an "
                "assumption "
                "unless `greentune plan --calibrate` was run on that server: tokens scale with it.",
                '- "Fits" is the memory model (weights by format, adapters, AdamW states, activations, '
                "overhead), not a run; a smaller micro-batch would avoid activation checkpointing.",
                f"- Server power is the board's rated power plus {best.host_w:g} W assumed for the rest of "
                "the "
                f"machine; two {best.name} would draw {2 * best.power_w + best.host_w:,.0f} W.",
                "- Quality is not modelled: the 4-bit base costs a little accuracy (Q4_K_M ≈ +0.05 "
                "perplexity "
                "on LLaMA-7B, llama.cpp); full fine-tuning and bf16 LoRA are the costlier alternatives "
                "above.",
            ]
        return "\n".join(out) + "\n"

    def _facts_line(self) -> str:
        f = find_model("mixtral-8x7b").facts()
        return (
            f"{f.total_params / 1e9:.1f} B parameters, {f.active_params / 1e9:.1f} B active: {f.layers} "
            "layers, "
            f"hidden {f.hidden}, intermediate {f.intermediate}, {f.experts} experts top-{f.top_k}, "
            f"{f.heads} heads / {f.kv_heads} KV heads, vocab {f.vocab}"
        )


def tokens_within(e_ref: Estimate, ref_tokens: int, hours: float, tokens_per_step: int) -> int:
    """Tokens trained in `hours` at the reference estimate's rate (seconds are linear in tokens),
    rounded down to whole optimiser steps."""
    tokens = hours * 3600 / (e_ref.seconds / ref_tokens)
    return int(tokens // tokens_per_step) * tokens_per_step


def seed_claim(
    hours: float = 10.0,
    power_cap_w: float = 1000.0,
    technique: str = "qlora-q4_k",
    seq_len: int = 512,
    micro_batch: int = 8,
    rank: int = defaults.LORA_RANK,
    region: str | None = None,
    utilisation: float | None = None,
) -> SeedClaim:
    """Plan the seed's case (module docstring). `utilisation` None: the default for a GPU."""
    facts = find_model("mixtral-8x7b").facts()
    quant = technique.rsplit("-", 1)[-1] if technique.startswith("qlora") else "none"
    tech = Technique(technique, "lora", quant, rank, DEFAULT_TARGETS)
    rows = []
    for hw in (h for h in catalogue() if h.kind == "gpu"):
        site = site_factors(hw, region)
        w = Workload(REFERENCE_TOKENS, seq_len, micro_batch)
        ref = estimate(facts, tech, w, hw, site, 1, utilisation, None, power_cap_w, None)
        fits_mem = ref.memory_bytes <= ref.memory_available_bytes
        fits_pow = ref.peak_power_w <= power_cap_w
        tokens = (
            tokens_within(ref, REFERENCE_TOKENS, hours, w.tokens_per_step) if fits_mem and fits_pow else 0
        )
        e = (
            estimate(
                facts,
                tech,
                Workload(tokens, seq_len, micro_batch),
                hw,
                site,
                1,
                utilisation,
                None,
                power_cap_w,
                hours,
            )
            if tokens
            else ref
        )
        rows.append(GpuRow(hw, e, tokens, fits_mem, fits_pow))
    fitting = [r for r in rows if r.tokens]
    best = max(fitting, key=lambda r: r.tokens) if fitting else None
    combos = None
    if best:
        combos = plan(
            facts,
            "mixtral-8x7b",
            workload=Workload(best.tokens, seq_len, micro_batch),
            hardware=best.hardware,
            site=SiteSpec(region),
            like=replace(CANDIDATE, rank=rank),
            power_cap_w=power_cap_w,
            deadline_h=hours,
            use_calibration=False,
            utilisation=utilisation,
        )
    return SeedClaim(technique, hours, power_cap_w, rows, best, combos)
