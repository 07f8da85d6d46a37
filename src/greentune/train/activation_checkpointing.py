"""Activation checkpointing: every decoder layer keeps only its input and is recomputed in the
backward, so a step holds one layer's activations instead of all of them.

`train.activation_checkpointing`: ``true`` | ``false`` | ``auto`` (default). ``auto`` turns it
on exactly when the planner's memory model (`plan.cost.memory_breakdown`, decided by
`plan.cost.choose_checkpointing`, the same rule `greentune plan` uses) says the run would
not fit in this device's memory without it (`plan.hardware.run_memory_bytes`); the decision,
with both predicted totals and the memory it was compared with, is logged and written to
``summary.json``.

How: transformers' own `activation_checkpointing_enable` with ``use_reentrant=False``,
rather than a wrapper of our own around `torch.utils.checkpoint`, because it

* wraps exactly the repeated decoder blocks (`GradientCheckpointingLayer`) of every
  architecture transformers ships, their keyword inputs (position embeddings, masks) closed over;
* checkpoints the layer's `forward`, not its `__call__`: FSDP2's unshard/reshard hooks on a
  sharded layer stay outside the recompute (they do not run twice), and of FSDP2's
  `FSDP<Layer>` subclass wrappers only the outermost checkpoints;
* is off in `eval()` and under `no_grad`, so evaluation and generation are untouched.

Non-reentrant checkpointing is what makes everything a layer holds work unchanged: the
gradients reach parameters the layer closes over (LoRA factors, expert LoRA, a trained
router) without the inputs requiring grad; custom autograd functions (`SparseExperts`',
the quantised bases' `_DequantMatmul`) are recomputed through saved-tensor hooks like any
op; the CPU and CUDA RNG states are stashed before the forward and restored for the
recompute, so dropout draws the same masks, and the global RNG stream is left as it was
(resume stays bit-identical); DDP sees the same graph. The input-embedding grad hook that
transformers adds for the reentrant variant is removed again (not needed, extra work).
Forward hooks that record statistics must ignore the recompute: `moe.router.RouterMonitor`
does (`_in_backward`), so expert use and the aux loss are counted once.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from greentune.errors import UserError
from greentune.recipe import Recipe
from greentune.train.distributed import SINGLE, DistContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointingDecision:
    """What was decided and why; bytes are the planner's predictions per device."""

    setting: str  # the recipe's: "auto" | "true" | "false"
    enabled: bool
    reason: str
    memory_bytes: float | None = None  # predicted peak without checkpointing
    memory_checkpointed_bytes: float | None = None
    available_bytes: float | None = None
    available_source: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def recipe_technique(recipe: Recipe):
    """The recipe's technique as the planner names it (method, base format, rank, targets, upcycling)."""
    from greentune.plan.cost import Technique

    return Technique.from_recipe(recipe, "recipe")


def predicted_memory(recipe: Recipe, device, ctx: DistContext = SINGLE) -> dict:
    """The planner's memory breakdown (bytes per device) of this recipe's run on `device`:
    its micro-batch per rank (DDP), or the base sharded over the ranks (FSDP)."""
    from greentune.models.facts import arch_facts
    from greentune.plan.cost import Workload, memory_breakdown
    from greentune.plan.hardware import this_hardware_for

    t = recipe_technique(recipe)
    facts = arch_facts(Path(recipe.base_model))
    if t.upcycle:
        facts = facts.upcycled(*t.upcycle)
    cfg = recipe.train
    micro = max(1, cfg.batch_size // cfg.grad_accum)
    sharded = ctx.world > 1 and cfg.parallel == "fsdp"
    devices = ctx.world if sharded else 1
    if ctx.world > 1 and not sharded:
        micro = max(1, micro // ctx.world)
    hw = this_hardware_for(device)
    w = Workload(tokens=recipe.data.max_seq_len * micro, seq_len=recipe.data.max_seq_len, micro_batch=micro)
    return memory_breakdown(facts, t, w, hw, devices)


def decide(recipe: Recipe, device, ctx: DistContext = SINGLE) -> CheckpointingDecision:
    """On or off for this run: the recipe's true/false, else the planner's memory model."""
    from greentune.plan.cost import choose_checkpointing
    from greentune.plan.hardware import GB, run_memory_bytes

    setting = recipe.train.activation_checkpointing
    if setting is not True and setting is not False:
        setting = None
    name = "auto" if setting is None else str(setting).lower()
    try:
        mem = predicted_memory(recipe, device, ctx)
    except UserError as e:  # an architecture the planner cannot model
        if setting is None:
            return CheckpointingDecision(name, False, f"auto: off, the planner cannot model this model ({e})")
        return CheckpointingDecision(name, setting, f"the recipe sets it {name}")
    available, source = run_memory_bytes(device)
    enabled = choose_checkpointing(mem, available, setting)
    need, need_ckpt = mem["total"], mem["total_checkpointed"]
    if setting is not None:
        reason = f"the recipe sets it {name}"
    elif enabled:
        reason = (
            f"auto: on, the planner predicts {need / GB:,.2f} GB without it > {available / GB:,.2f} GB "
            f"({source}); {need_ckpt / GB:,.2f} GB with it"
            + ("" if need_ckpt <= available else ", which does not fit either")
        )
    else:
        reason = (
            f"auto: off, the planner predicts {need / GB:,.2f} GB without it <= {available / GB:,.2f} GB "
            f"({source})"
        )
    return CheckpointingDecision(name, enabled, reason, need, need_ckpt, available, source)


def enable_(model: nn.Module) -> None:
    """Recompute every decoder layer of a transformers causal LM in the backward (non-reentrant)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(
            f"train.activation_checkpointing: {type(model).__name__} does not support activation "
            "checkpointing; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()  # only the reentrant variant needs inputs that require grad


def apply_activation_checkpointing(
    model: nn.Module, recipe: Recipe, device, ctx: DistContext = SINGLE
) -> CheckpointingDecision:
    """Decide (`decide`), log the decision, and enable checkpointing on `model` when it is on.
    Call after the adapters are attached and before training; returns the decision. In a job
    rank 0 decides for all (each rank's free memory differs a little from moment to moment)."""
    decision = None
    if ctx.is_main:
        try:
            decision = decide(recipe, device, ctx)
        except UserError as e:  # raised on every rank, so that none waits for the others
            decision = str(e)
    decision = ctx.from_main(decision)
    if isinstance(decision, str):
        raise UserError(decision)
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if decision.enabled and decision.setting == "auto" and not supported:
        decision = CheckpointingDecision(
            **{
                **decision.to_dict(),
                "enabled": False,
                "reason": decision.reason + f"; but {type(model).__name__} cannot",
            }
        )
        log.warning("activation checkpointing: %s", decision.reason)
        return decision
    if decision.enabled:
        enable_(model)
    if ctx.is_main:
        log.info("activation checkpointing %s: %s", "on" if decision.enabled else "off", decision.reason)
    return decision
