"""`greentune plan ... --write-recipe FILE`: the recommended technique as a runnable recipe.

The planner and the trainer then agree by construction: the recipe carries the planned
model, technique (quantised base, LoRA rank and targets, ReLoRA, upcycling), sequence
length, batch and steps. Only the data is left for the user, as a clearly marked
placeholder (training refuses it as a missing file until it is filled in). Full
fine-tuning is not something a recipe runs, so when the planner recommends it the best
fitting adapter technique is written instead, and the file says so.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from greentune.errors import UserError
from greentune.fsutil import atomic_write_text
from greentune.plan.hardware import GB

TRAIN_PLACEHOLDER = "FILL-IN/train.jsonl"


def recipe_technique(result):
    """The estimate a recipe can run: the recommendation, or the cheapest fitting adapter technique."""
    if result.recommended is None:
        raise UserError(
            f"no technique fits, so there is no recipe to write; {result.what_would_have_to_change()}"
        )
    best = result.get(result.recommended)
    if best.technique.method != "full":
        return best, None
    fitting = [e for e in result.estimates if e.fits and e.technique.method != "full"]
    if not fitting:
        raise UserError(
            "only full fine-tuning fits, which recipes do not run (they train adapters); "
            "plan with more memory or a smaller model"
        )
    chosen = min(fitting, key=lambda e: e.facility_kwh)
    return (
        chosen,
        f"the planner recommends full fine-tuning, which recipes do not run; this is the cheapest "
        f"fitting adapter technique, {chosen.technique.name}",
    )


def recipe_dict(
    result,
    base_model: str,
    estimate,
    region: str | None = None,
    pue: float | None = None,
    wue_onsite: float | None = None,
) -> dict:
    """The recipe mapping for `estimate` of `result` (data left as a placeholder)."""
    t, w = estimate.technique, result.workload
    # the planner's target list names experts for every model; only an MoE (or upcycled) one has them
    has_experts = result.facts.is_moe or t.upcycle is not None
    targets = [x for x in t.targets if x != "experts" or has_experts]
    method: dict = {
        "quant_base": t.quant_base,
        "lora": {"rank": t.rank, "alpha": float(2 * t.rank), "targets": targets},
    }
    if t.method == "relora":
        method["relora"] = {"merge_every": t.merge_every}
    recipe = {
        "base_model": base_model,
        "data": {"train": TRAIN_PLACEHOLDER, "max_seq_len": w.seq_len},
        "method": method,
    }
    if t.upcycle:
        recipe["moe"] = {"upcycle": {"experts": t.upcycle[0], "top_k": t.upcycle[1]}}
    recipe["train"] = {
        "steps": max(1, w.steps),
        "batch_size": w.micro_batch * w.grad_accum,
        "grad_accum": w.grad_accum,
    }
    energy = {
        k: v for k, v in (("region", region), ("pue", pue), ("wue_onsite", wue_onsite)) if v is not None
    }
    if energy:
        recipe["energy"] = energy
    return recipe


def recipe_text(result, base_model: str, estimate, note: str | None, command: str, **energy) -> str:
    """The recipe YAML with comments: where it came from, and what the user must fill in."""
    e = estimate
    body = yaml.safe_dump(recipe_dict(result, base_model, e, **energy), sort_keys=False)
    marker = f"  train: {TRAIN_PLACEHOLDER}\n"
    assert marker in body, body
    body = body.replace(
        marker,
        (
            "  # FILL IN: your training data, then run `greentune train THIS_FILE`. One of: a .jsonl / "
            ".parquet /\n"
            "  # .csv file (rows {text} | {prompt, completion} | {messages} | {conversations} | "
            "{instruction,\n"
            "  # output}), a .txt file, a folder of .txt, or {dataset: ORG/NAME or PATH, split: train}.\n"
            f"{marker}"
            "  # eval: FILL-IN/eval.jsonl   # optional held-out data; default: a seeded 5% of train\n"
        ),
    )
    head = [
        f"# Written by `{command}`.",
        f"# Technique: {e.technique.name}, planned at {e.memory_bytes / GB:,.1f} GB, "
        f"{e.hours * 60:,.1f} min, {e.facility_kwh:.3g} kWh on {result.devices}x {result.hardware.name} "
        f"for {result.workload.tokens:,} tokens.",
    ]
    if note:
        head.append(f"# Note: {note}.")
    return "\n".join(head) + "\n" + body


def write_recipe_file(path: str | Path, text: str) -> Path:
    """Write atomically; never over a file that is already there."""
    path = Path(path)
    if path.exists():
        raise UserError(f"--write-recipe {path}: already exists; choose another name or remove it first")
    atomic_write_text(path, text)
    return path
