"""The pipeline, as the product describes itself:

reuse a pretrained model → (quantise its frozen base) → (upcycle it to experts) → attach
(Re)LoRA adapters → train them → merge → export → report, metering the energy of every
phase into the run's ledger on the way.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from greentune import data_identity
from greentune.adapters.lora import apply_lora, check_rank_fits, fuse_all_
from greentune.adapters.peft_format import save_adapter
from greentune.adapters.relora import ReLoRA
from greentune.data import BatchStream, build_datasets
from greentune.energy import Factors, Ledger, Meter, describe_hardware
from greentune.energy.hook import EnergyHook
from greentune.errors import UserError, user_os_error
from greentune.faults import maybe_fault
from greentune.fsutil import atomic_dir, atomic_write_json, atomic_write_text, remove_stale_temps
from greentune.models.loader import (
    check_model_dir,
    check_weights_match,
    default_device,
    load_config,
    load_model,
    load_tokenizer,
    max_positions,
)
from greentune.models.support import check_family
from greentune.moe import prepare_moe_, upcycle
from greentune.moe.hook import MoEHook
from greentune.ownership import RUN, check_run_dir, mark
from greentune.quant import load_quantized
from greentune.quant.dequantize import dequantize_model_
from greentune.quant.save_merged import checkpoint_dtype, save_dequantized_
from greentune.recipe import MoeConfig, Recipe, load_recipe
from greentune.runlock import RunLock
from greentune.train import checkpoint, distributed
from greentune.train.activation_checkpointing import apply_activation_checkpointing
from greentune.train.distributed import SINGLE, DistContext
from greentune.train.loop import LoopResult, evaluate_loss, run_training

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    tokens: int
    seconds: float
    eval_loss: float | None = None
    stopped: str | None = None
    signal: int | None = None  # the signal (SIGTERM, SIGINT) that stopped training, if one did
    outputs: dict = field(default_factory=dict)
    energy: dict = field(default_factory=dict)

    @property
    def eval_ppl(self) -> float | None:
        return math.exp(self.eval_loss) if self.eval_loss is not None else None


def _first_difference(a, b, prefix="") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return prefix.rstrip(".") if a != b else None


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> None:
    """Claim `run_dir` for this recipe: refuse another recipe's run, or an accidental overwrite."""
    check_run_dir(run_dir)  # never a folder of the user's: its files would be replaced below
    recipe_path = run_dir / "recipe.yaml"
    if recipe_path.exists():
        try:
            old = Recipe.model_validate(yaml.safe_load(recipe_path.read_text()) or {}).identity()
        except Exception:  # an unreadable or older recipe is simply "different"
            old = {}
        diff = _first_difference(old, recipe.identity())
        if diff:
            raise UserError(
                f"run dir {run_dir} belongs to a different recipe (differs at '{diff}'); "
                "choose another --run-dir"
            )
        if not resume and checkpoint.list_checkpoints(run_dir / "checkpoints"):  # progress to lose
            raise UserError(
                f"run dir {run_dir} already holds a run; pass --resume to continue it "
                "or choose another --run-dir"
            )
    elif resume:
        raise UserError(f"--resume: {run_dir} holds no run (no recipe.yaml)")
    run_dir.mkdir(parents=True, exist_ok=True)
    mark(run_dir, RUN)
    if not resume:
        for stale in ("ledger.jsonl", "metrics.jsonl", "savings.json", "summary.json"):
            (run_dir / stale).unlink(missing_ok=True)
    atomic_write_text(recipe_path, yaml.safe_dump(recipe.dump(), sort_keys=False))


class Phases:
    """Meters named phases of a run into its ledger: `with phases("merge"): ...`."""

    def __init__(self, run_dir: Path, recipe: Recipe, ctx: DistContext = SINGLE):
        e = recipe.energy
        self.ctx = ctx
        if ctx.world == 1:
            self.meter = Meter.auto()
        else:  # each device metered by exactly one rank (see Meter.auto)
            self.meter = Meter.auto(
                scope="self",
                host=ctx.local_rank == 0,
                gpu_index=ctx.local_rank if torch.cuda.is_available() else None,
            )
        self.ledger = Ledger(
            run_dir,
            Factors.for_region(
                e.region,
                pue=e.pue,
                wue_onsite=e.wue_onsite,
                grid_g_per_kwh=e.grid_g_per_kwh,
                offsite_l_per_kwh=e.offsite_l_per_kwh,
            ),
            ctx=ctx,
        )

    @contextmanager
    def __call__(self, name: str):
        maybe_fault(f"phase:{name}")
        with self.meter.phase(name) as window:
            yield window
        self.ledger.record(window.result)

    def train_hook(self, recipe: Recipe) -> EnergyHook:
        return EnergyHook(
            self.meter, self.ledger, recipe.energy.interval_steps, recipe.energy.budget_kwh, ctx=self.ctx
        )

    def close(self) -> None:
        self.meter.close()


def _measure_savings(
    run_dir: Path, base: str, device, batch: dict, result: LoopResult, phases: Phases
) -> None:
    """The counterfactual, measured here: a few steps of full fine-tuning of the same model (or of
    a slice of its layers, or the planner's model of it, when it would not fit) and batch."""
    from greentune.energy.savings import full_finetune_counterfactual, save_savings, savings_table

    full = full_finetune_counterfactual(
        base, device, batch, steps=3, meter=phases.meter
    )  # never what cannot fit
    rows_train = [r for r in phases.ledger.rows() if r["phase"] == "train"]
    run_joules = sum(sum(r["joules"].values()) for r in rows_train)
    estimate = any(src == "estimate" for r in rows_train for src in r["source"].values())
    save_savings(
        run_dir, full, savings_table(result.tokens, run_joules, result.seconds, full, run_estimate=estimate)
    )


TRAINED_BYTES = "trained-base.safetensors"


def save_trained_bytes(path: Path, packed: dict[str, tuple]) -> None:
    """The quantised base's block bytes (uint8) with their GGML types in the metadata. Written
    from the tensors to a temporary file and renamed (no in-memory copy of the whole file)."""
    import os

    from safetensors.torch import save_file

    from greentune.errors import user_os_error
    from greentune.fsutil import fsync_dir, temp_file_beside

    tensors = {k: v.contiguous() for k, (_, v) in packed.items()}
    tmp = temp_file_beside(path)
    try:
        save_file(tensors, str(tmp), metadata={k: t.name for k, (t, _) in packed.items()})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        maybe_fault(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise user_os_error(err, path) from None
        raise
    fsync_dir(path.parent)


def load_trained_bytes(path: Path) -> dict[str, tuple]:
    import gguf
    from safetensors import safe_open

    from greentune.models.safetensors_header import read_header

    header = read_header(path)  # a corrupt file is one line naming it
    unknown = [
        k for k in header.tensors if header.metadata.get(k) not in gguf.GGMLQuantizationType.__members__
    ]
    if unknown:
        raise UserError(f"{path}: corrupt training bytes (no GGML type for {unknown[0]})")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        return {k: (gguf.GGMLQuantizationType[meta[k]], f.get_tensor(k)) for k in f.keys()}


# A GGUF export reuses the training bytes when the base was trained in that export's format.
_GGUF_BASE_FORMAT = {"q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": "q4_k"}


def _same_format(quant_base: str, item) -> bool:
    return item.format == "gguf" and _GGUF_BASE_FORMAT.get(item.quant or "q4_k_m") == quant_base


def export_model(
    model,
    tokenizer,
    merged_dir: Path,
    out_dir: Path,
    fmt: str,
    quant: str | None,
    prequantized: dict | None = None,
) -> Path:
    """One `export:` entry. GGUF from the in-memory merged model, so that `prequantized` (the
    base's training bytes, keyed by its state-dict names) is written byte for byte. A full disk
    or read-only `out_dir` is a `UserError` naming it (the writers leave no temporary file). A GGUF `out_dir` whose
    name ends in `.gguf` is the file itself; any other is a folder."""
    try:
        return _export_model(model, tokenizer, merged_dir, out_dir, fmt, quant, prequantized)
    except OSError as err:
        raise user_os_error(err, out_dir) from None


def _export_model(
    model, tokenizer, merged_dir: Path, out_dir: Path, fmt: str, quant: str | None, prequantized: dict | None
) -> Path:
    from greentune.export import export, write_gguf, write_modelfile

    if fmt == "gguf":
        quant = quant or "q4_k_m"
        source = model if model is not None else merged_dir
        gguf_path = out_dir if out_dir.suffix == ".gguf" else out_dir / f"model-{quant}.gguf"
        path = write_gguf(source, gguf_path, quant, tokenizer=tokenizer, prequantized=prequantized or None)
        write_modelfile(path, merged_dir)
        return path
    if fmt == "mlx":
        bits = None if quant in ("none", "f32", "f16", "fp16") else 4
        return export(merged_dir, out_dir, "mlx", bits=bits)
    return export(merged_dir, out_dir, fmt)


def record_for_planner(
    run_dir: Path, recipe: Recipe, dense_base: str, result: LoopResult, ledger, checkpointing: bool = False
) -> dict:
    """This run's measured speed and power as a planner calibration: written to the run dir
    and stored for this machine, so the next `greentune plan` starts from what was measured."""
    from dataclasses import asdict

    from greentune.models.facts import arch_facts
    from greentune.plan.calibrate import record_observation
    from greentune.plan.cost import Technique
    from greentune.plan.hardware import detect_this

    lora, relora, moe = recipe.method.lora, recipe.method.relora, recipe.moe
    upcycle_to = (moe.upcycle.experts, moe.upcycle.top_k) if moe and moe.upcycle else None
    technique = Technique(
        "observed run",
        "relora" if relora else "lora",
        recipe.method.quant_base,
        lora.rank,
        tuple(lora.targets),
        upcycle_to,
        relora.merge_every if relora else 200,
    )
    rows = [r for r in ledger.rows() if r["phase"] == "train"]
    joules = sum(sum(r["joules"].values()) for r in rows) if rows else None
    sources = sorted({s for r in rows for s in r["source"].values()})
    cal = record_observation(
        detect_this(),
        arch_facts(Path(dense_base)),
        technique,
        recipe.data.max_seq_len,
        result.tokens,
        result.seconds,
        joules,
        power_source="+".join(sources) or "ledger",
        micro_batch=max(1, recipe.train.batch_size // recipe.train.grad_accum),
        checkpointing=checkpointing,
    )
    data = asdict(cal)
    atomic_write_json(run_dir / "calibration.json", data)
    return data


def record_for_planner_optional(
    run_dir: Path, recipe: Recipe, dense_base: str, result: LoopResult, ledger, checkpointing: bool = False
) -> None:
    """`record_for_planner`, as the optional bookkeeping it is: a cache that cannot be
    written (read-only $HOME, a bad GREENTUNE_CACHE) is one warning, not a failed run."""
    try:
        record_for_planner(run_dir, recipe, dense_base, result, ledger, checkpointing)
    except (OSError, ValueError) as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        log.warning(
            "not recorded as a planner calibration: %s%s", getattr(err, "strerror", None) or err, where
        )


def _claim_run_dir(run_dir: Path, recipe: Recipe, resume: bool, ctx: DistContext) -> RunLock | None:
    """Rank 0 locks `run_dir` for the run's life, removes the temp files of a killed earlier
    process, refuses a resume on changed data, and prepares the dir; a refusal stops every
    rank. Returns the lock on rank 0 (None on the others)."""
    held = []

    def claim():
        check_run_dir(run_dir)  # before the lock file is written into someone else's folder
        lock = RunLock.acquire(run_dir)
        try:
            for folder in (run_dir, run_dir / "export"):
                for p in remove_stale_temps(folder):
                    log.info("removed %s, left by a killed run", p)
            data = data_identity.data_identity({"train": recipe.data.train, "eval": recipe.data.eval})
            if resume:
                data_identity.check_unchanged(run_dir, data)
            prepare_run_dir(run_dir, recipe, resume)
            data_identity.store(run_dir, data)
        except BaseException:
            lock.release()
            raise
        held.append(lock)

    _on_main(ctx, claim)
    return held[0] if held else None


def train(
    recipe: Recipe | str | Path,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run a recipe end to end; returns where everything went and the final eval loss.

    Under torchrun every rank calls this: they train together, then rank 0 alone merges,
    exports and reports (the others return after the final evaluation)."""
    ctx = distributed.init_from_env()
    try:
        return _train(recipe, run_dir, resume, progress, ctx)
    finally:
        distributed.close(ctx)


def _on_main(ctx: DistContext, fn) -> None:
    """Run `fn` on rank 0; a UserError there is raised on every rank, so all stop cleanly."""
    err = None
    if ctx.is_main:
        try:
            fn()
        except UserError as e:
            err = str(e)
    err = ctx.from_main(err)
    if err:
        raise UserError(err)


def _rebuild_for_merge(base: str, recipe: Recipe, trained: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rank 0's own unsharded copy of an FSDP-trained model, on the CPU: the base (quantised
    as in training) with the gathered adapter tensors loaded into fresh LoRA modules."""
    lora, moe = recipe.method.lora, recipe.moe or MoeConfig()
    quant = recipe.method.quant_base
    model = (
        load_quantized(base, quant)
        if quant != "none"
        else load_model(base, device="cpu", trust_remote_code=recipe.trust_remote_code)
    )
    apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout)
    prepare_moe_(
        model,
        (lora.rank, lora.alpha, lora.dropout) if "experts" in lora.targets else None,
        router=moe.router,
        aux_loss_coef=moe.aux_loss_coef,
    )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value)
    return model


def _fuse_experts_with_progress(model, progress: bool) -> None:
    """`fuse_expert_lora_(model)` with a bar: into a quantised base each experts module is
    dequantise → add → re-quantise, minutes for a Mixtral-sized model."""
    from tqdm import tqdm

    from greentune.moe.experts import sparse_experts

    mods = [m for _, m in sparse_experts(model) if m.lora is not None]
    for m in tqdm(mods, desc="merge expert LoRA", unit="layer", disable=not progress or not mods):
        m.fuse(restart=False)


def pin_base_model(recipe: Recipe) -> tuple[Recipe, str]:
    """(recipe with `base_model_commit` set for a Hub id, the local folder to load from)."""
    from greentune.models.hub import resolve_model

    resolved = resolve_model(recipe.base_model, revision=recipe.base_model_commit)
    if resolved.commit is not None:
        recipe = recipe.model_copy(update={"base_model_commit": resolved.commit})
    return recipe, str(resolved.path)


def _train(
    recipe: Recipe | str | Path, run_dir: str | Path | None, resume: bool, progress: bool, ctx: DistContext
) -> RunResult:
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    run_dir = Path(run_dir or Path("runs") / (recipe.name or "run"))
    recipe, base = pin_base_model(recipe)
    dense_base = base

    # Validate everything the user controls before touching the run dir.
    check_run_dir(run_dir)
    check_model_dir(base)
    config = load_config(Path(base), recipe.trust_remote_code)
    if not (recipe.moe and recipe.moe.upcycle):  # an upcycled base is checked as the Mixtral it becomes
        check_family(config.to_dict(), recipe.export)
    limit = max_positions(config)
    if limit is not None and recipe.data.max_seq_len > limit:
        raise UserError(
            f"data.max_seq_len {recipe.data.max_seq_len} exceeds the model's {limit} positions "
            f"({base}/config.json)"
        )
    check_weights_match(base, config)  # missing / unexpected / mis-shaped tensors, from the headers
    check_rank_fits(config, recipe.method.lora.rank, recipe.method.lora.targets, base)
    Factors.for_region(recipe.energy.region)  # an unknown region fails now, not after training
    tcfg = recipe.train
    if ctx.world > 1:
        distributed.check_same_recipe(
            ctx, {"recipe": recipe.identity(), "run_dir": str(run_dir.resolve()), "resume": resume}
        )
        distributed.check_divisible(ctx, tcfg.batch_size, tcfg.grad_accum)
        if tcfg.parallel == "fsdp" and recipe.method.relora is not None:
            raise UserError(
                "method.relora merges into the whole base, which train.parallel fsdp shards over "
                "the ranks; use train.parallel ddp for ReLoRA"
            )
    tokenizer = load_tokenizer(base, recipe.trust_remote_code)
    train_data, eval_data = build_datasets(
        recipe.data.train,
        recipe.data.eval,
        tokenizer,
        recipe.data.max_seq_len,
        recipe.data.pack,
        tcfg.seed,
        recipe.data.eval_fraction,
        progress=progress,
    )
    lock = _claim_run_dir(run_dir, recipe, resume, ctx)

    phases = Phases(run_dir, recipe, ctx)
    moe = recipe.moe or MoeConfig()
    lora = recipe.method.lora
    fsdp = ctx.world > 1 and tcfg.parallel == "fsdp"
    try:
        device = ctx.device() if ctx.world > 1 else default_device()
        if moe.upcycle is not None:
            with phases("upcycle"):
                target = run_dir / "upcycled"
                if ctx.is_main and not (target / "config.json").exists():
                    upcycle(
                        base, target, experts=moe.upcycle.experts, top_k=moe.upcycle.top_k, seed=tcfg.seed
                    )
                ctx.barrier()
                base = str(target)
        quant = recipe.method.quant_base
        torch.manual_seed(tcfg.seed)  # the same adapter initialisation on every rank
        # FSDP moves each decoder layer to the device as it shards it, so a base larger than
        # one device only ever has one whole layer there.
        load_device = torch.device("cpu") if fsdp else device
        if quant != "none":
            with phases("quantise"):  # streams the checkpoint, quantising each weight as it arrives
                model = load_quantized(base, quant, progress=progress and ctx.is_main).to(load_device)
        else:
            with phases("load"):
                model = load_model(base, device=load_device, trust_remote_code=recipe.trust_remote_code)
        with phases("adapt"):
            wrapped = apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout)
            monitor = prepare_moe_(
                model,
                (lora.rank, lora.alpha, lora.dropout) if "experts" in lora.targets else None,
                router=moe.router,
                aux_loss_coef=moe.aux_loss_coef,
            )
            if fsdp:
                distributed.shard_model_(model, ctx)
        checkpointing = apply_activation_checkpointing(model, recipe, device, ctx)
        if ctx.world > 1:  # dropout masks differ between ranks, reproducibly
            torch.manual_seed(tcfg.seed + 7919 * (ctx.rank + 1))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA on %d modules, %d trainable parameters", len(wrapped), n_train)

        stream = BatchStream(train_data, tcfg.batch_size, tcfg.seed)
        first_batch = next(BatchStream(train_data, tcfg.batch_size, tcfg.seed))
        energy_hook = phases.train_hook(recipe)
        hooks = [energy_hook] + ([MoEHook(monitor)] if monitor is not None else [])
        if recipe.method.relora is not None:
            hooks.append(
                ReLoRA(
                    model,
                    recipe.method.relora,
                    tcfg.steps,
                    phase=energy_hook.separate_phase,
                    seed=tcfg.seed,
                    progress=progress and ctx.is_main,
                )
            )
        result = run_training(
            model,
            stream,
            tcfg,
            run_dir,
            resume=resume,
            eval_data=eval_data,
            device=device,
            progress=progress,
            hooks=hooks,
            ctx=ctx,
            parallel=tcfg.parallel,
        )
        out = RunResult(
            run_dir=run_dir,
            steps=result.step,
            tokens=result.tokens,
            seconds=result.seconds,
            stopped=result.stopped,
            signal=result.signal,
        )
        if result.stopped:
            out.energy = phases.ledger.totals()
            return out

        with phases("eval"):
            out.eval_loss, _ = evaluate_loss(model, eval_data, tcfg.batch_size, device=device, ctx=ctx)
        if monitor is not None:
            monitor.close()
        if ctx.world > 1:
            # The job's last collectives: gather the adapter (FSDP shards it), then leave the
            # group; from here rank 0 merges, exports and reports alone.
            trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            if fsdp:
                trained = {n: t.full_tensor().cpu() for n, t in trained.items()}
            else:
                out.outputs["adapter_digest_by_rank"] = distributed.adapter_digests(ctx, trained)
            ctx.barrier()
            distributed.close(ctx)
            if not ctx.is_main:
                return out
            if fsdp:
                del model
                with phases("load"):
                    model = _rebuild_for_merge(base, recipe, trained)
                device = torch.device("cpu")

        adapter_dir = save_adapter(model, run_dir / "adapter", lora.rank, lora.alpha, lora.dropout, base)
        with phases("merge"):
            fuse_all_(model)  # into a quantised base: dequantise → add → re-quantise
            _fuse_experts_with_progress(model, progress)
            merged_dir = run_dir / "merged"
            with atomic_dir(merged_dir) as tmp:
                if quant != "none":  # one float layer at a time: the whole float model may not fit
                    trained_bytes = save_dequantized_(model, tmp, checkpoint_dtype(base), progress=progress)
                    model = None  # consumed (its layers are on the meta device): exports read merged/
                else:
                    trained_bytes = dequantize_model_(model)
                    model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            if trained_bytes:  # the block bytes the base was trained in
                save_trained_bytes(run_dir / TRAINED_BYTES, trained_bytes)
        out.outputs.update(adapter=str(adapter_dir), merged=str(merged_dir))
        for item in recipe.export:
            with phases("export"):
                path = export_model(
                    model,
                    tokenizer,
                    merged_dir,
                    run_dir / "export",
                    item.format,
                    item.quant,
                    trained_bytes if _same_format(quant, item) else None,
                )
            out.outputs.setdefault("export", []).append(str(path))
        del model
        if recipe.energy.measure_savings:
            _measure_savings(run_dir, base, device, first_batch, result, phases)
        out.energy = phases.ledger.totals()
        if ctx.world == 1:
            record_for_planner_optional(
                run_dir, recipe, dense_base, result, phases.ledger, checkpointing.enabled
            )
        else:
            log.info("a %d-rank run is not recorded as a planner calibration of this machine", ctx.world)
        atomic_write_json(
            run_dir / "summary.json",
            {
                "base_model": recipe.base_model,
                "base_model_commit": recipe.base_model_commit,
                "steps": out.steps,
                "tokens": out.tokens,
                "seconds": out.seconds,
                "eval_loss": out.eval_loss,
                "eval_ppl": out.eval_ppl,
                "trainable_parameters": n_train,
                "lora_modules": len(wrapped),
                "outputs": out.outputs,
                "hardware": describe_hardware(),
                "ranks": ctx.world,
                "parallel": tcfg.parallel if ctx.world > 1 else None,
                "activation_checkpointing": checkpointing.to_dict(),
                "energy": {
                    k: out.energy[k] for k in ("it_kwh", "facility_kwh", "kg_co2e", "water_l", "estimate")
                },
            },
        )
        from greentune.report import write_report

        json_path, html_path = write_report(run_dir)
        out.outputs.update(report=str(html_path))
        return out
    finally:
        phases.close()
        if lock is not None:
            lock.release()
