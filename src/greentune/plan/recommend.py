"""Plan every candidate technique for a model on a machine, and recommend the cheapest that fits.

Candidates (a dense base also gets sparse upcycling to 8 experts, top-2):

    full            full fine-tune, AdamW, mixed precision
    lora            LoRA on a bf16 base (fp32 on CPU)
    qlora-nf4       LoRA on an NF4 base (QLoRA)
    qlora-q4_k      LoRA on a Q4_K base (the GGUF format shipped)
    relora          ReLoRA on a bf16 base
    relora-q4_k     ReLoRA on a Q4_K base (merge = dequantise, add, requantise)
    upcycle-qlora-q4_k / upcycle-relora-q4_k   dense → MoE, then (Re)LoRA on experts + router

"Cheapest" is the least facility energy (so also the least carbon and water at one site);
ties go to the faster. Candidates differ in quality as well as cost (full > ReLoRA > LoRA
≳ QLoRA at equal tokens, in the published comparisons); the plan does not model quality.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

from greentune import recipe as defaults
from greentune.errors import UserError
from greentune.models.facts import ArchFacts
from greentune.plan.calibrate import load_calibration, utilisation_for
from greentune.plan.cost import (
    BPW,
    DEFAULT_LOAD,
    DEFAULT_UTILISATION,
    Estimate,
    Site,
    SiteSpec,
    Technique,
    Workload,
    estimate,
)
from greentune.plan.hardware import GB, Hardware, find_hardware

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 10_000_000
DEFAULT_TARGETS = (*defaults.LORA_TARGETS, "experts")
UPCYCLE = (defaults.UPCYCLE_EXPERTS, defaults.UPCYCLE_TOP_K)
#: The adapter shape every candidate takes unless told otherwise: rank, targets and ReLoRA period.
CANDIDATE = Technique("candidate", targets=DEFAULT_TARGETS)


def candidates(facts: ArchFacts, like: Technique = CANDIDATE) -> list[Technique]:
    """The techniques worth comparing for `facts` (see module docstring), each with `like`'s
    LoRA rank, targets and ReLoRA `merge_every`."""
    kw = dict(rank=like.rank, targets=tuple(like.targets), merge_every=like.merge_every)
    out = [
        Technique("full", "full", **kw),
        Technique("lora", "lora", **kw),
        Technique("qlora-nf4", "lora", "nf4", **kw),
        Technique("qlora-q4_k", "lora", "q4_k", **kw),
        Technique("relora", "relora", **kw),
        Technique("relora-q4_k", "relora", "q4_k", **kw),
    ]
    if not facts.is_moe:
        out += [
            Technique("upcycle-qlora-q4_k", "lora", "q4_k", upcycle=UPCYCLE, **kw),
            Technique("upcycle-relora-q4_k", "relora", "q4_k", upcycle=UPCYCLE, **kw),
        ]
    return out


def site_factors(
    hw: Hardware, region: str | None = None, pue: float | None = None, wue_onsite: float | None = None
) -> Site:
    """Carbon/water factors for `region` from greentune.energy.factors; a desk machine
    defaults to PUE 1.0 and no on-site water, a data centre to the industry averages."""
    desk = hw.site == "desk"
    pue_eff = pue if pue is not None else (1.0 if desk else None)
    wue_eff = wue_onsite if wue_onsite is not None else (0.0 if desk else None)
    try:
        from greentune.energy.factors import Factors
    except ImportError:  # the energy package is absent: plain, labelled world-average numbers
        return Site(
            (region or "WORLD").upper(),
            481.0,
            0.82,
            pue_eff if pue_eff is not None else 1.58,
            wue_eff if wue_eff is not None else 1.8,
            {"all": "built-in fallback (greentune.energy.factors unavailable)"},
        )
    f = Factors.for_region(region, pue=pue_eff, wue_onsite=wue_eff)
    src = {
        "grid": f.grid_source,
        "offsite_water": f.offsite_source,
        "pue": f.pue_source,
        "wue_onsite": f.wue_source,
    }
    if desk and pue is None:
        src["pue"] = "desk machine: no facility overhead (assumed)"
    if desk and wue_onsite is None:
        src["wue_onsite"] = "desk machine: no on-site cooling water (assumed)"
    return Site(f.region, f.grid_g_per_kwh, f.offsite_l_per_kwh, f.pue, f.wue_onsite_l_per_kwh, src)


@dataclass
class PlanResult:
    """Every candidate's estimate, the recommendation and the assumptions behind them."""

    model: str
    facts: ArchFacts
    hardware: Hardware
    devices: int
    workload: Workload
    site: Site
    estimates: list[Estimate]
    recommended: str | None
    why_not: dict[str, str]
    assumptions: list[str]
    power_cap_w: float | None = None
    deadline_h: float | None = None
    recipe_technique: str | None = None
    calibrated: bool = False

    def get(self, name: str) -> Estimate:
        for e in self.estimates:
            if e.technique.name == name:
                return e
        raise KeyError(name)

    def what_would_have_to_change(self) -> str:
        """One line: the smallest change to hardware, power cap, deadline or tokens that lets something
        fit."""
        es = self.estimates
        hw = f"{self.devices}× {self.hardware.name}" if self.devices > 1 else self.hardware.name
        parts = []
        mem_ok = [e for e in es if e.memory_bytes <= e.memory_available_bytes]
        if not mem_ok:
            e = min(es, key=lambda e: e.memory_bytes)
            parts.append(
                f"the smallest option ({e.technique.name}) needs {e.memory_bytes / GB:,.1f} GB per device, "
                f"{hw} has {e.memory_available_bytes / GB:,.1f} GB usable: use more memory or more --gpus"
            )
            mem_ok = [e]
        pow_ok = [e for e in mem_ok if self.power_cap_w is None or e.peak_power_w <= self.power_cap_w]
        if not pow_ok:
            e = min(mem_ok, key=lambda e: e.peak_power_w)
            parts.append(
                f"{hw} draws up to {e.peak_power_w:,.0f} W, over the {self.power_cap_w:,.0f} W cap: "
                f"raise the cap or use fewer/lower-power devices"
            )
            pow_ok = [e]
        if self.deadline_h is not None:
            e = min(pow_ok, key=lambda e: e.seconds)
            if e.hours > self.deadline_h:
                tokens = int(self.workload.tokens * self.deadline_h / e.hours)
                parts.append(
                    f"the fastest option ({e.technique.name}) needs {e.hours:,.1f} h > {self.deadline_h:g} "
                    "h: "
                    f"extend --deadline-h to {math.ceil(e.hours * 10) / 10:g}, cut --tokens to {tokens:,}, "
                    f"or use faster or more hardware"
                )
        return f"nothing fits {self.model} on {hw}: " + "; ".join(parts or ["no candidate fits"])

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "facts": self.facts.to_dict(),
            "hardware": self.hardware.to_dict(),
            "devices": self.devices,
            "workload": {**self.workload.__dict__, "steps": self.workload.steps},
            "site": self.site.__dict__,
            "power_cap_w": self.power_cap_w,
            "deadline_h": self.deadline_h,
            "estimates": [e.to_dict() for e in self.estimates],
            "recommended": self.recommended,
            "why_not": self.why_not,
            "recipe_technique": self.recipe_technique,
            "calibrated": self.calibrated,
            "assumptions": self.assumptions,
        }


def plan(
    facts: ArchFacts,
    model: str = "model",
    workload: Workload | None = None,
    hardware: str | Hardware = "this",
    gpus: int = 1,
    site: SiteSpec | None = None,
    like: Technique = CANDIDATE,
    extra: list[Technique] | None = None,
    extra_checkpointing: bool | None = None,
    power_cap_w: float | None = None,
    deadline_h: float | None = None,
    memory_gb: float | None = None,
    calibration_file: Path | None = None,
    use_calibration: bool = True,
    utilisation: float | None = None,
) -> PlanResult:
    """Estimate every candidate (plus `extra`, e.g. the recipe's own) and pick the cheapest that fits.

    `workload` None: `DEFAULT_TOKENS` in the default shapes (the assumptions say so whenever the
    tokens are `DEFAULT_TOKENS`); `site` None: the world average with the machine kind's PUE/WUE; `like`:
    the LoRA rank, targets and ReLoRA period of every candidate (see `candidates`).
    `utilisation` overrides both the calibration and the default (for what-if plans and tests).
    `extra_checkpointing`: the recipe's `train.activation_checkpointing` (True / False), used
    for the `extra` techniques instead of deciding; None (auto) decides as for every candidate.
    """
    hw = hardware if isinstance(hardware, Hardware) else find_hardware(hardware)
    if memory_gb is not None:
        if memory_gb <= 0:
            raise UserError(f"--memory-gb must be positive, got {memory_gb}")
        hw = replace(hw, memory_gb=float(memory_gb))
    if power_cap_w is not None and power_cap_w <= 0:
        raise UserError(f"--power-cap-w must be positive, got {power_cap_w}")
    if deadline_h is not None and deadline_h <= 0:
        raise UserError(f"--deadline-h must be positive, got {deadline_h}")
    w = workload or Workload(DEFAULT_TOKENS)
    spec = site or SiteSpec()
    rank, targets = like.rank, like.targets
    site = site_factors(hw, spec.region, spec.pue, spec.wue_onsite)
    cal = load_calibration(hw, calibration_file) if use_calibration else None
    util = utilisation if utilisation is not None else (cal.utilisation if cal else None)
    power = cal.power_w if cal else None
    rates = cal.dequant_s_per_weight if cal and utilisation is None else None
    techs = list(extra or []) + candidates(facts, like)
    notes = {}

    def util_of(t: Technique) -> float | None:
        """The given utilisation, else the calibration's for this model's family and width."""
        if utilisation is not None or not use_calibration:
            return util
        found = utilisation_for(hw, facts, t, calibration_file)
        if found is None:
            return util
        notes[t.name] = found
        return found[0]

    extra_ids = {id(t) for t in extra or []}
    ests = [
        estimate(
            facts,
            t,
            w,
            hw,
            site,
            gpus,
            util_of(t),
            power,
            power_cap_w,
            deadline_h,
            rates,
            checkpointing=extra_checkpointing if id(t) in extra_ids else None,
        )
        for t in techs
    ]
    fitting = sorted((e for e in ests if e.fits), key=lambda e: (e.facility_kwh, e.seconds))
    best = fitting[0] if fitting else None
    why = {}
    for e in ests:
        if e is best:
            continue
        if not e.fits:
            why[e.technique.name] = "; ".join(e.reasons)
        else:
            ratio = e.facility_kwh / best.facility_kwh if best.facility_kwh > 0 else 1.0
            why[e.technique.name] = f"fits, but uses {ratio:.{2 if ratio >= 1.01 else 4}f}× the energy"
    u = util if util is not None else DEFAULT_UTILISATION[hw.kind]
    assumptions = [
        f"tokens {w.tokens:,} = {w.steps:,} steps × {w.micro_batch} sequences × {w.seq_len} tokens × "
        f"{w.grad_accum} accumulation" + ("" if w.tokens != DEFAULT_TOKENS else " (default; set --tokens)"),
        f"hardware {gpus}× {hw.name}: {hw.memory_gb:g} GB ({hw.usable_fraction:.0%} usable), "
        f"{hw.peak_flops / 1e12:,.3g} TFLOP/s {hw.compute_dtype} peak, {hw.bandwidth_gbs:g} GB/s; source: "
        f"{hw.source}",
        (
            f"utilisation {u:.3f} (given)"
            if utilisation is not None
            else "utilisation calibrated on this hardware per technique: "
            + "; ".join(f"{name} {v:.3f} ({how})" for name, (v, how) in notes.items())
            if notes
            else f"utilisation {u:.3f} calibrated on this hardware ({cal.method})"
            if cal
            else (
                f"utilisation {u:.2f} (default for a {hw.kind}; run `greentune plan --calibrate` "
                "on the machine to measure it)"
            )
        ),
        (
            f"power {power:,.1f} W measured ({cal.power_source})"
            if power is not None and gpus == 1
            else f"power = {gpus} × {hw.power_w:g} W × load {DEFAULT_LOAD[hw.kind]} + {hw.host_w:g} W host "
            f"(peak for the cap: {gpus} × {hw.power_w:g} + {hw.host_w:g} W)"
        ),
        f"grid {site.grid_g_per_kwh:g} gCO2e/kWh ({site.region}; {site.sources.get('grid', '')})",
        f"PUE {site.pue:g} ({site.sources.get('pue', '')}); on-site WUE {site.wue_onsite:g} L/kWh "
        f"({site.sources.get('wue_onsite', '')}); off-site water {site.offsite_l_per_kwh:g} L/kWh "
        f"({site.sources.get('offsite_water', '')})",
        f"LoRA rank {rank} on {', '.join(targets)}; AdamW; adapters and optimiser state fp32; upcycling "
        f"{UPCYCLE[0]} experts top-{UPCYCLE[1]} adds LoRA on experts and trains the router",
        "base formats (bits/weight): "
        + ", ".join(f"{k} {v:g}" for k, v in BPW.items() if v and k != "fp16")
        + "; a quantised base also quantises its embedding (same format) and LM head (Q6_K; Q8_0 for q8_0), "
        "norms stay in the compute dtype; mxfp4 is for experts only (other weights Q8_0)",
        (
            "dequantisation timed per format on this hardware"
            if rates
            else "dequantisation modelled as memory traffic at the hardware's bandwidth"
        ),
        "memory-efficient attention (no T² scores stored); activation checkpointing only when needed to fit"
        + (
            ""
            if extra_checkpointing is None
            else (
                f" (the recipe's row: {'on' if extra_checkpointing else 'off'}, "
                "as its train.activation_checkpointing says)"
            )
        )
        + "; 1 GB runtime overhead + 5 % fragmentation",
        "multi-GPU: FSDP-style sharding, communication time not modelled; data loading and evaluation not "
        "modelled",
    ]
    return PlanResult(
        model=model,
        facts=facts,
        hardware=hw,
        devices=gpus,
        workload=w,
        site=site,
        estimates=ests,
        recommended=best.technique.name if best else None,
        why_not=why,
        assumptions=assumptions,
        power_cap_w=power_cap_w,
        deadline_h=deadline_h,
        recipe_technique=extra[0].name if extra else None,
        calibrated=cal is not None,
    )
