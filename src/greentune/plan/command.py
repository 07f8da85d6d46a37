"""`greentune plan`: arguments, recipe reading and printing (the CLI wires these in).

    greentune plan RECIPE.yaml | --model MODEL_DIR_OR_CONFIG_OR_NAME_OR_HUB_ID [--tokens N]
        [--hardware NAME|this] [--gpus N] [--power-cap-w W] [--deadline-h H] [--json] [--write-recipe FILE]
    greentune plan --list-models
    greentune plan --calibrate [--hardware this]

Wiring::

    p = sub.add_parser("plan", help=...)
    add_plan_arguments(p)
    p.set_defaults(func=run_plan)

`run_plan` prints and returns 0; a user mistake, or constraints nothing can meet (after
the table is printed), raises `UserError` (one line, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from greentune import recipe as defaults
from greentune.cli_types import OneLineParser, count, real
from greentune.errors import UserError
from greentune.plan.cost import SiteSpec, Technique, Workload
from greentune.plan.hardware import GB
from greentune.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

MAX_TOKENS = 10**15  # ~50x the largest pretraining runs; beyond it the table's columns overflow


def add_plan_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "recipe", nargs="?", default=None, help="recipe YAML (its model, data and training settings)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="catalogue name (see --list-models), config.json, model folder or Hub id ORG/NAME[@REVISION]",
    )
    p.add_argument(
        "--tokens",
        type=count(1, MAX_TOKENS),
        default=None,
        help="training tokens (default: the recipe's, else 10M)",
    )
    p.add_argument("--hardware", default="this", help="catalogue name (H100, 4090, 'M2 Max', ...) or 'this'")
    p.add_argument("--gpus", type=count(1, 100_000), default=1, help="devices in the machine (default 1)")
    p.add_argument(
        "--memory-gb",
        type=real(0, 1e6, low_open=True),
        default=None,
        help="override the device memory (e.g. a 64 GB M2 Max)",
    )
    p.add_argument(
        "--power-cap-w", type=real(0, 1e8, low_open=True), default=None, help="the machine's power limit, W"
    )
    p.add_argument(
        "--deadline-h", type=real(0, 1e6, low_open=True), default=None, help="wall-clock limit, hours"
    )
    p.add_argument(
        "--seq-len",
        type=count(1, 10**7),
        default=None,
        help=f"tokens per sequence (default: recipe, else {defaults.SEQ_LEN})",
    )
    p.add_argument(
        "--batch-size",
        type=count(1, 10**6),
        default=None,
        help=f"sequences per micro-batch (default: recipe, else {defaults.BATCH_SIZE})",
    )
    p.add_argument(
        "--rank",
        type=count(1, 65536),
        default=None,
        help=f"LoRA rank (default: recipe, else {defaults.LORA_RANK})",
    )
    p.add_argument("--region", default=None, help="grid region, ISO code (default: recipe, else world)")
    p.add_argument(
        "--pue", type=real(1, 10), default=None, help="facility / IT energy (default: recipe, else by site)"
    )
    p.add_argument(
        "--wue",
        type=real(0, 100),
        default=None,
        help="on-site litres per IT kWh (default: recipe, else by site)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--write-recipe",
        default=None,
        metavar="FILE",
        help="also write the recommended technique as a recipe (fill in its data, then greentune train)",
    )
    p.add_argument("--list-models", action="store_true", help="show the model catalogue and exit")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="measure utilisation and power with a short fine-tune on this machine and store them",
    )
    p.add_argument(
        "--calibrate-seconds",
        type=real(0, 86400, low_open=True),
        default=20.0,
        help="length of the measured run (default 20)",
    )
    return p


# ---------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class RecipeInputs:
    """The planner's view of a validated `Recipe` (read by `read_recipe`): its workload,
    technique and site, and the few fields `plan` prints or passes on."""

    recipe: Recipe

    @property
    def base_model(self) -> str:
        return self.recipe.base_model

    @property
    def seq_len(self) -> int:
        return self.recipe.data.max_seq_len

    @property
    def batch_size(self) -> int:
        return self.recipe.train.batch_size

    @property
    def grad_accum(self) -> int:
        return self.recipe.train.grad_accum

    @property
    def steps(self) -> int:
        return self.recipe.train.steps

    @property
    def rank(self) -> int:
        return self.recipe.method.lora.rank

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.recipe.method.lora.targets)

    @property
    def quant_base(self) -> str:
        return self.recipe.method.quant_base

    @property
    def relora_merge_every(self) -> int | None:
        relora = self.recipe.method.relora
        return relora.merge_every if relora else None

    @property
    def upcycle(self) -> tuple[int, int] | None:
        return self.technique().upcycle

    @property
    def region(self) -> str:
        return self.recipe.energy.region

    @property
    def pue(self) -> float | None:
        return self.recipe.energy.pue

    @property
    def wue_onsite(self) -> float | None:
        return self.recipe.energy.wue_onsite

    @property
    def activation_checkpointing(self) -> bool | None:
        """The recipe's setting; None: auto (the planner decides)."""
        setting = self.recipe.train.activation_checkpointing
        return None if setting == "auto" else setting

    @property
    def tokens(self) -> int:
        return self.workload().tokens

    def workload(self) -> Workload:
        return Workload.from_recipe(self.recipe)

    def technique(self) -> Technique:
        return Technique.from_recipe(self.recipe)

    def site(self) -> SiteSpec:
        return SiteSpec.from_recipe(self.recipe)


def read_recipe(path: str | Path) -> RecipeInputs:
    """The planner's inputs from a recipe YAML, validated by `load_recipe` without needing its data."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no recipe file {p}")
    return RecipeInputs(load_recipe(p, need_data=False))


# ---------------------------------------------------------------- printing


def _fmt_h(h: float) -> str:
    return f"{h * 60:.1f} min" if h < 1 else f"{h:,.1f} h"


def _num(x: float) -> str:
    """Three significant figures at most, without scientific notation: 1,234 | 56.7 | 8.90 | 0.0123."""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _cell(text: str, width: int) -> str:
    """Right-aligned in `width`, and never touching its left neighbour when a number outgrows it."""
    return f" {text}" if len(text) >= width else f"{text:>{width}}"


def format_table(result) -> str:
    """A fixed-width table of every candidate, then the recommendation and the assumptions."""
    r = result
    f = r.facts
    moe = f", {f.experts} experts top-{f.top_k}, {f.active_params / 1e9:.2f} B active" if f.is_moe else ""
    head = [
        f"plan: {r.model} ({f.model_type}, {f.total_params / 1e9:.2f} B parameters{moe})",
        f"on {r.devices}× {r.hardware.name}; {r.workload.tokens:,} tokens"
        + (f"; power cap {r.power_cap_w:,.0f} W" if r.power_cap_w else "")
        + (f"; deadline {r.deadline_h:g} h" if r.deadline_h else ""),
        "",
    ]
    cols = (
        f"{'technique':<26}{'memory GB':>10}{'(ckpt)':>8}{'trainable':>11}{'GFLOP/tok':>10}{'time':>11}"
        f"{'IT kWh':>9}{'fac kWh':>9}{'kgCO2e':>8}{'litres':>9}  fits"
    )
    lines = head + [cols, "-" * len(cols)]
    for e in r.estimates:
        m = e.memory
        mark = "*" if e.technique.name == r.recommended else " "
        tr = e.trainable_params
        tr_s = f"{tr / 1e9:.2f}B" if tr >= 1e9 else f"{tr / 1e6:.1f}M"
        cells = [
            (f"{m['total'] / GB:,.1f}", 10),
            (f"{m['total_checkpointed'] / GB:,.1f}", 8),
            (tr_s, 11),
            (f"{e.flops_per_token / 1e9:,.1f}", 10),
            (_fmt_h(e.hours), 11),
            (_num(e.it_kwh), 9),
            (_num(e.facility_kwh), 9),
            (_num(e.kg_co2e), 8),
            (_num(e.water_l), 9),
        ]
        lines.append(
            f"{mark}{e.technique.name:<25}"
            + "".join(_cell(text, width) for text, width in cells)
            + f"  {'yes' if e.fits else 'no: ' + '; '.join(e.reasons)}"
        )
    lines.append("")
    if r.recommended:
        e = r.get(r.recommended)
        lines.append(
            f"recommended: {r.recommended} — {_fmt_h(e.hours)}, {_num(e.facility_kwh)} kWh, "
            f"{_num(e.kg_co2e)} kgCO2e, {_num(e.water_l)} L, {e.memory_bytes / GB:,.1f} GB"
            + (" with activation checkpointing" if e.checkpointing else "")
        )
        for name, why in r.why_not.items():
            lines.append(f"  not {name}: {why}")
    else:
        lines.append(r.what_would_have_to_change())
    lines += ["", "assumptions:"] + [f"  - {a}" for a in r.assumptions]
    return "\n".join(lines)


# ---------------------------------------------------------------- the model


def facts_for(spec: str):
    """(facts, label) as `catalogue.model_facts`, plus Hub ids: `ORG/NAME[@REVISION]` that is
    not a catalogue row's own id is planned from its `config.json`, fetched alone (HF cache first)."""
    from greentune.models.hub import parse_hub_id, resolve_model
    from greentune.plan.catalogue import model_facts, models

    parsed = parse_hub_id(str(spec))
    if parsed is None or (parsed[1] is None and any(m.hf.lower() == parsed[0].lower() for m in models())):
        return model_facts(spec)
    resolved = resolve_model(spec, config_only=True)
    facts, _ = model_facts(resolved.path)
    return facts, resolved.describe()


# ---------------------------------------------------------------- the command


def run_plan(ns: argparse.Namespace) -> int:
    """Entry point for `greentune plan` (see module docstring)."""
    from greentune.plan.catalogue import list_models_table
    from greentune.plan.hardware import find_hardware
    from greentune.plan.recommend import DEFAULT_TARGETS, DEFAULT_TOKENS, plan

    if ns.list_models:
        print(list_models_table())
        return 0
    if ns.calibrate:
        from greentune.plan.calibrate import run_calibration, store_calibration

        hw = find_hardware(ns.hardware)
        if not hw.name.startswith("this"):
            raise UserError("--calibrate measures this machine; leave --hardware unset or use 'this'")
        cal = run_calibration(hw, seconds=ns.calibrate_seconds)
        path = store_calibration(cal)
        if hw.catalogue_name:  # plans that name the catalogue row (--hardware H100) use it too
            store_calibration(replace(cal, hardware_key=find_hardware(hw.catalogue_name).key))
        print(
            f"calibrated {hw.name}: utilisation {cal.utilisation:.3f} of {cal.peak_flops / 1e12:.3g} "
            "TFLOP/s, "
            f"{cal.tokens_per_second:,.0f} tokens/s, power {cal.power_w:.1f} W ({cal.power_source}); saved "
            f"to {path}"
        )
        return 0
    if ns.recipe and ns.model:
        raise UserError("give a recipe or --model, not both")
    if not ns.recipe and not ns.model:
        raise UserError("give a recipe YAML or --model (a catalogue name, config.json or model folder)")
    rec = read_recipe(ns.recipe) if ns.recipe else None
    facts, label = facts_for(rec.base_model if rec else ns.model)

    def pick(cli, attr, default):
        return cli if cli is not None else (getattr(rec, attr) if rec else default)

    seq_len, micro_batch = (
        pick(ns.seq_len, "seq_len", defaults.SEQ_LEN),
        pick(ns.batch_size, "batch_size", defaults.BATCH_SIZE),
    )
    grad_accum = rec.grad_accum if rec else defaults.GRAD_ACCUM
    tokens = ns.tokens or (rec.tokens if rec else DEFAULT_TOKENS)
    result = plan(
        facts,
        label,
        workload=Workload(tokens, seq_len, micro_batch, grad_accum),
        hardware=ns.hardware,
        gpus=ns.gpus,
        site=SiteSpec(
            pick(ns.region, "region", None), pick(ns.pue, "pue", None), pick(ns.wue, "wue_onsite", None)
        ),
        like=Technique(
            "candidate",
            rank=pick(ns.rank, "rank", defaults.LORA_RANK),
            targets=rec.targets if rec else DEFAULT_TARGETS,
            merge_every=(rec.relora_merge_every or defaults.MERGE_EVERY) if rec else defaults.MERGE_EVERY,
        ),
        extra=[rec.technique()] if rec else None,
        extra_checkpointing=rec.activation_checkpointing if rec else None,
        power_cap_w=ns.power_cap_w,
        deadline_h=ns.deadline_h,
        memory_gb=ns.memory_gb,
    )
    _print_plan(ns, rec, facts, result)
    if result.recommended is None:
        raise UserError(result.what_would_have_to_change())
    if ns.write_recipe:
        write_planned_recipe(ns, result, rec.base_model if rec else ns.model)
    return 0


def write_planned_recipe(ns: argparse.Namespace, result, model: str) -> None:
    """`--write-recipe FILE`: the recommendation as a recipe whose base_model training can load."""
    import shlex
    import sys

    from greentune.models.hub import is_hub_id
    from greentune.plan.catalogue import find_model
    from greentune.plan.write_recipe import recipe_technique, recipe_text, write_recipe_file

    local = Path(model).expanduser()
    if local.exists():
        base = str(local.resolve().parent if local.is_file() else local.resolve())
    elif is_hub_id(model) and find_model(model) is None:
        base = model
    else:
        base = find_model(model).hf  # a catalogue name: its Hub id
    estimate, note = recipe_technique(result)
    command = (
        "greentune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if sys.argv[1:2] == ["plan"]
        else "greentune plan"
    )
    text = recipe_text(result, base, estimate, note, command, region=ns.region, pue=ns.pue, wue_onsite=ns.wue)
    path = write_recipe_file(ns.write_recipe, text)
    print(
        f"wrote {path} ({estimate.technique.name}); fill in data.train, then: greentune train {path}",
        file=sys.stderr if ns.json else sys.stdout,
    )


def _print_plan(ns, rec, facts, result) -> None:
    """The training plan, then the modelled serving cost of the exported model (plan/inference.py)."""
    from greentune.plan.inference import serving_plan

    serving = serving_plan(facts, result.hardware, rec.recipe if rec else None, rec.upcycle if rec else None)
    if ns.json:
        print(
            json.dumps(
                {**result.to_dict(), "serving": {k: v for k, v in serving.items() if k != "text"}},
                indent=2,
                default=str,
            )
        )
    else:
        print(format_table(result) + "\n\n" + serving["text"])


def plan_command(argv: list[str]) -> int:
    """`greentune plan ARGS...` as a function: parse `argv` and run (raises UserError on bad input)."""
    parser = OneLineParser(prog="greentune plan", description="predict cost and fit of each technique")
    return run_plan(add_plan_arguments(parser).parse_args(argv))
