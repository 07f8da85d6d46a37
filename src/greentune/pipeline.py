"""The pipeline, as the product describes itself:

reuse a pretrained model → (quantise its frozen base) → (upcycle it to experts) → attach
(Re)LoRA adapters → train them → merge → export → report, metering the energy of every
phase into the run's ledger on the way.

`train` reads as that paragraph, one function per step. What a distributed job changes
about a step is asked of its `Job` (train/distributed.py), never branched on here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from greentune.adapters.attach import Adapters, attach_adapters, fuse_adapters_
from greentune.adapters.lora import check_rank_fits
from greentune.adapters.peft_format import save_adapter
from greentune.adapters.relora import ReLoRA
from greentune.data import BatchStream, build_datasets
from greentune.energy import Factors
from greentune.energy.phases import Phases, measure_savings
from greentune.export.model import export_model
from greentune.export.trained_bytes import save_trained_bytes
from greentune.formats import DEFAULT_BASE_FORMAT, reuses_training_bytes
from greentune.fsutil import atomic_dir, read_jsonl
from greentune.models.loader import load_tokenizer
from greentune.models.recipe_base import check_base, pin_base_model
from greentune.moe import upcycle
from greentune.ownership import check_run_dir
from greentune.plan.observed import record_for_planner_optional
from greentune.quant.base import load_base
from greentune.quant.dequantize import dequantize_model_
from greentune.quant.save_merged import checkpoint_dtype, save_dequantized_
from greentune.recipe import Recipe, load_recipe
from greentune.report import write_report
from greentune.report.summary import RunResult
from greentune.run_dir import RunDir
from greentune.train import distributed
from greentune.train.activation_checkpointing import apply_activation_checkpointing
from greentune.train.claim import claimed
from greentune.train.distributed import Job
from greentune.train.energy_hook import EnergyHook
from greentune.train.loop import evaluate_loss, run_training
from greentune.train.metrics import run_compute
from greentune.train.moe_hook import MoEHook

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """What the phases of one run hand on to each other."""

    recipe: Recipe
    run: RunDir
    job: Job
    phases: Phases
    base: str  # the folder the model loads from: the recipe's, or the upcycled one
    device: torch.device
    adapters: Adapters | None = None
    checkpointing: object = None  # activation checkpointing as applied
    first_batch: dict | None = None  # what the savings counterfactual trains on
    progress: bool = True  # bars on the long phases (rank 0 only)


def train(
    recipe: Recipe | str | Path, run_dir=None, resume: bool = False, progress: bool = True
) -> RunResult:
    """Run a recipe end to end; returns where everything went and the final eval loss.

    Under torchrun every rank calls this: they train together, then rank 0 alone merges,
    exports and reports (the others return after the final evaluation)."""
    with distributed.joined() as ctx:
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        run_dir, job = Path(run_dir or Path("runs") / (recipe.name or "run")), Job(ctx, recipe.train.parallel)
        recipe, base = check_inputs(recipe, run_dir, resume, job)
        tokenizer, train_data, eval_data = load_data(recipe, base, progress)
        with claimed(run_dir, recipe, resume, ctx), Phases(run_dir, recipe, ctx) as phases:
            r = _Run(
                recipe, RunDir(run_dir), job, phases, base, job.device(), progress=progress and job.is_main
            )
            model = attach_to(r, load_frozen_base(r, upcycle_base(r)))
            out = fit(r, model, train_data, eval_data, resume, progress)
            if out.stopped:
                return out
            trained = job.gather_for_merge(model, out.outputs)  # the job's last collectives
            if not job.is_main:
                return out
            if trained is not None:  # FSDP sharded the model: rank 0 rebuilds its own copy
                del model
                model = rebuild_for_merge(r, trained)
            trained_bytes = merge(r, model, tokenizer, out)
            if trained_bytes:  # `merge` wrote it out layer by layer: the exports read merged/
                model = None
            export(r, model, tokenizer, trained_bytes, out)
            del model
            account(r, base, out)
            return out


def check_inputs(recipe: Recipe, run_dir: Path, resume: bool, job: Job) -> tuple[Recipe, str]:
    """Everything the user controls, before the run dir is touched. Returns the recipe with a
    Hub base pinned to its commit, and the local folder of the base."""
    recipe, base = pin_base_model(recipe)
    check_run_dir(run_dir)
    config = check_base(base, recipe)
    check_rank_fits(config, recipe.method.lora.rank, recipe.method.lora.targets, base)
    Factors.for_region(recipe.energy.region)  # an unknown region fails now, not after training
    job.check(recipe, run_dir, resume)
    return recipe, base


def load_data(recipe: Recipe, base: str, progress: bool):
    """The tokenizer, and the training and evaluation rows (through the token cache)."""
    tokenizer, d = load_tokenizer(base, recipe.trust_remote_code), recipe.data
    seed = recipe.train.seed
    rows = build_datasets(
        d.train, d.eval, tokenizer, d.max_seq_len, d.pack, seed, d.eval_fraction, progress=progress
    )
    return tokenizer, *rows


def upcycle_base(r: _Run) -> str:
    """The base as an MoE when the recipe upcycles it (once per run dir, by rank 0)."""
    up = r.recipe.moe.upcycle if r.recipe.moe else None
    if up is None:
        return r.base

    def once():
        if not (r.run.upcycled / "config.json").exists():
            upcycle(r.base, r.run.upcycled, experts=up.experts, top_k=up.top_k, seed=r.recipe.train.seed)

    with r.phases("upcycle"):
        r.job.main_then_all(once)
    return str(r.run.upcycled)


def load_frozen_base(r: _Run, base: str) -> torch.nn.Module:
    """The base to train, quantised as it streams in when the recipe trains a quantised base."""
    r.base, fmt = base, r.recipe.method.quant_base
    torch.manual_seed(r.recipe.train.seed)  # the same adapter initialisation on every rank
    with r.phases("quantise" if fmt != DEFAULT_BASE_FORMAT else "load"):
        return load_base(base, fmt, r.job.load_device(r.device), r.recipe.trust_remote_code, r.progress)


def attach_to(r: _Run, model: torch.nn.Module) -> torch.nn.Module:
    """The recipe's adapters on the frozen base (sharded afterwards, under FSDP)."""
    with r.phases("adapt"):
        r.adapters = attach_adapters(model, r.recipe.method.lora, r.recipe.moe)
        r.job.shard_(model)
    return model


def fit(r: _Run, model, train_data, eval_data, resume: bool, progress: bool) -> RunResult:
    """Train the adapters, then (unless training stopped early) the final evaluation."""
    tcfg, ctx, monitor = r.recipe.train, r.job.ctx, r.adapters.monitor
    r.checkpointing = apply_activation_checkpointing(model, r.recipe, r.device, ctx)
    r.job.seed_ranks(tcfg.seed)
    r.adapters.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA on %d modules, %d trainable parameters", len(r.adapters.wrapped), r.adapters.trainable)
    stream = BatchStream(train_data, tcfg.batch_size, tcfg.seed)
    r.first_batch = next(BatchStream(train_data, tcfg.batch_size, tcfg.seed))
    e = r.recipe.energy
    energy = EnergyHook(r.phases.meter, r.phases.ledger, e.interval_steps, e.budget_kwh, ctx=ctx)
    hooks = [energy] + ([MoEHook(monitor)] if monitor is not None else [])
    if r.recipe.method.relora is not None:
        relora = r.recipe.method.relora
        hooks.append(ReLoRA(model, relora, tcfg.steps, energy.separate_phase, tcfg.seed, progress=r.progress))
    result = run_training(
        model, stream, tcfg, r.run.path, hooks=hooks, eval_data=eval_data, device=r.device, ctx=ctx,
        resume=resume, progress=progress,
    )  # fmt: skip
    out = RunResult.of(r.run.path, result)
    if result.stopped:
        out.energy = r.phases.ledger.totals()
        return out
    with r.phases("eval"):
        out.eval_loss, _ = evaluate_loss(model, eval_data, tcfg.batch_size, device=r.device, ctx=ctx)
    if monitor is not None:
        monitor.close()
    return out


def rebuild_for_merge(r: _Run, trained: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rank 0's own unsharded copy of an FSDP-trained model, on the CPU: the base (in its
    training format) with the gathered adapter tensors loaded into freshly attached adapters."""
    r.device = torch.device("cpu")
    with r.phases("load"):
        model = load_base(r.base, r.recipe.method.quant_base, r.device, r.recipe.trust_remote_code)
        attach_adapters(model, r.recipe.method.lora, r.recipe.moe)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
    return model


def merge(r: _Run, model, tokenizer, out: RunResult) -> dict:
    """Save the PEFT adapter, fuse it into the base, save the merged model. Returns the base's
    block bytes as it trained in them (saved too; empty for an unquantised base)."""
    lora = r.recipe.method.lora
    adapter_dir = save_adapter(model, r.run.adapter, lora.rank, lora.alpha, lora.dropout, r.base)
    with r.phases("merge"):
        fuse_adapters_(model, progress=r.progress)  # into a quantised base: dequantise → add → re-quantise
        with atomic_dir(r.run.merged) as tmp:
            if r.recipe.method.quant_base != DEFAULT_BASE_FORMAT:  # one float layer at a time
                trained_bytes = save_dequantized_(model, tmp, checkpoint_dtype(r.base), progress=r.progress)
            else:
                trained_bytes = dequantize_model_(model)
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        if trained_bytes:  # the block bytes the base was trained in
            save_trained_bytes(r.run.trained_bytes, trained_bytes)
    out.outputs.update(adapter=str(adapter_dir), merged=str(r.run.merged))
    return trained_bytes


def export(r: _Run, model, tokenizer, trained_bytes: dict, out: RunResult) -> None:
    """Every `export:` entry; a GGUF in the base's training format reuses its block bytes."""
    for item in r.recipe.export:
        reuse = reuses_training_bytes(r.recipe.method.quant_base, item.format, item.quant)
        with r.phases("export"):
            path = export_model(
                model, tokenizer, r.run.merged, r.run.export, item.format, item.quant,
                trained_bytes if reuse else None,
            )  # fmt: skip
        out.outputs.setdefault("export", []).append(str(path))


def account(r: _Run, dense_base: str, out: RunResult) -> None:
    """The bill: the savings counterfactual, the energy totals, the planner's calibration of
    this machine, `summary.json` and the report."""
    if r.recipe.energy.measure_savings:
        measure_savings(r.phases, r.run.path, r.base, r.device, r.first_batch, out.tokens, out.seconds)
    out.energy = r.phases.ledger.totals()
    if r.job.calibrates_this_machine():  # `out` carries the run's tokens and seconds
        record_for_planner_optional(
            r.run.path, r.recipe, dense_base, out, r.phases.ledger, r.checkpointing.enabled
        )
    model = {"trainable_parameters": r.adapters.trainable, "lora_modules": len(r.adapters.wrapped)}
    compute = run_compute(read_jsonl(r.run.metrics), r.device)
    out.write_summary(r.run.summary, r.recipe, model, r.job.summary(), r.checkpointing.to_dict(), compute)
    out.outputs.update(report=str(write_report(r.run.path)[1]))
