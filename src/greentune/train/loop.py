"""The training loop: AdamW on the trainable (LoRA) parameters, gradient accumulation,
clipping, a warm-up + decay schedule, one `metrics.jsonl` line per step, and atomic
checkpoints from which `--resume` continues bit-identically on CPU.

Guards: a non-finite loss or gradient norm stops the run (`TrainingDiverged`) with a
checkpoint of the last finite state, and no checkpoint ever holds non-finite weights;
SIGTERM/SIGINT finish the step in flight and checkpoint (`signals.py`); `--resume` picks the
newest checkpoint that verifies, or starts from step 0 when there is none.

In a distributed job (see `distributed.py`) every rank runs this loop on its slice of each
global batch; rank 0 alone writes metrics and shows progress, and the per-step numbers
(loss, tokens, joules) are sums over ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from greentune.errors import UserError
from greentune.faults import maybe_fault
from greentune.fsutil import atomic_write_text, read_jsonl
from greentune.recipe import TrainConfig
from greentune.run_dir import RunDir
from greentune.train import checkpoint as ckpt
from greentune.train.distributed import SINGLE, DistContext, rank_slice, wrap_objective
from greentune.train.heap_policy import relax_after_first_step
from greentune.train.hooks import TrainHook
from greentune.train.loss import CausalLMLoss, count_targets
from greentune.train.metrics import MetricsFile, training_flops_per_token
from greentune.train.schedule import lr_at
from greentune.train.signals import StopSignals

log = logging.getLogger(__name__)


def _no_sync(objective, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    if not last and hasattr(objective, "no_sync"):
        return objective.no_sync()
    return contextlib.nullcontext()


@dataclass
class LoopResult:
    step: int
    tokens: int
    seconds: float
    stopped: str | None = None  # why the loop ended early, if it did
    signal: int | None = None  # the signal that stopped it (SIGTERM, SIGINT), if one did


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: the run stopped with its last finite state checkpointed."""


def _all_finite(params: dict[str, torch.nn.Parameter], ctx: DistContext) -> bool:
    """Every trainable tensor finite, on every rank (a collective in a job). One host sync:
    called only when a checkpoint is written or the run diverged, never per step."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params.values()]
    bad = int(not torch.stack([torch.isfinite(t.detach()).all() for t in local]).all())
    return (ctx.sum(bad)[0] if ctx.active else bad) == 0


def _last_finite(ckpt_root: Path) -> str:
    found = ckpt.list_checkpoints(ckpt_root)
    return (
        f"The last finite state is {found[-1]}" if found else "No checkpoint was written"
    ) + "; nothing was merged, exported or recorded. Lower train.lr or check the base weights for NaN/inf"


def _diverged(
    step: int,
    loss: float,
    grad_norm: float | None,
    save,
    ckpt_root: Path,
    params: dict[str, torch.nn.Parameter],
    ctx: DistContext,
) -> None:
    """Stop a run whose step `step` + 1 had a non-finite loss or gradient norm, after
    checkpointing the state before that step (when it is finite and not already saved)."""
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    if step > 0 and not (ckpt_root / f"step-{step}").is_dir() and _all_finite(params, ctx):
        save()
    raise TrainingDiverged(f"non-finite {what} at step {step + 1}. {_last_finite(ckpt_root)}")


def _flops_per_token(model, params: dict, seq_len: int) -> float | None:
    """`metrics.training_flops_per_token` of `model` (None when `models.facts` cannot model it),
    with the adapter parameters one token uses (expert LoRA: its top-k experts' factors)."""
    from greentune.models.facts import arch_facts

    try:
        facts = arch_facts(model.config)
    except Exception as e:  # an architecture the facts do not cover: no FLOPs, still training
        log.debug("no FLOPs per token for this model: %s", e)
        return None
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params.values()]
    trainable = sum(int(t.numel()) for t in local)
    full = trainable >= 0.5 * facts.total_params
    # Expert LoRA: one token passes through its top-k experts' factors only.
    for m in model.modules():
        if type(m).__name__ == "ExpertLoRA" and facts.top_k:  # by name: the module is moving (issue 14)
            for p in m.parameters():
                if p.requires_grad:
                    trainable -= p.numel() - p.numel() * facts.top_k / p.shape[0]
    checkpointing = bool(
        getattr(model, "is_activation_checkpointing", None)
        if hasattr(type(model), "is_activation_checkpointing")
        else getattr(model, "is_gradient_checkpointing", False)
    )
    return training_flops_per_token(facts, trainable, seq_len, checkpointing, full)


def _resume_point(ckpt_root: Path) -> str | None:
    """The newest checkpoint that verifies; one warning line names what was skipped and why."""
    found, skipped = ckpt.newest_valid(ckpt_root)
    if skipped:
        damaged = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        then = f"resuming from {found.name}" if found else "no earlier checkpoint is whole"
        log.warning("skipped damaged checkpoint(s) (%s, kept as *%s); %s", damaged, ckpt.DAMAGED_SUFFIX, then)
    return str(found) if found else None


def _micro_batches(batch: dict, ctx: DistContext, grad_accum: int) -> list[dict | None]:
    """This rank's slice of a global batch in exactly `grad_accum` micro-batches (None where
    no rows are left): every rank must make the same number of forward passes, since FSDP's
    are collectives and DDP syncs on the last."""
    local = rank_slice(batch, ctx)
    n = local["input_ids"].shape[0]
    bounds = [n * k // grad_accum for k in range(grad_accum + 1)]
    return [
        {key: v[lo:hi] for key, v in local.items()} if hi > lo else None for lo, hi in zip(bounds, bounds[1:])
    ]


@torch.no_grad()
def evaluate_loss(
    model, data, batch_size: int, max_batches: int | None = None, device="cpu", ctx: DistContext = SINGLE
) -> tuple[float, int]:
    """Mean token loss over `data` (a PackedData), and the number of scored tokens.

    In a job the batches are dealt out over ranks and the sums reduced; every rank makes the
    same number of forward calls (a rank short of batches repeats one and discards it),
    because an FSDP forward is a collective."""
    was_training = model.training
    model.eval()
    objective, one = CausalLMLoss(model), torch.tensor(1.0, device=device)
    total, count = 0.0, 0
    n = data.input_ids.shape[0]
    n_batches = -(-n // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for j in range(-(-n_batches // ctx.world)):
        b = j * ctx.world + ctx.rank
        real = b < n_batches
        i = (b if real else 0) * batch_size
        ids = data.input_ids[i : i + batch_size].to(device)
        labels = data.labels[i : i + batch_size].to(device)
        mask = data.attention_mask[i : i + batch_size].to(device)
        loss_sum = objective(ids, mask, labels, one)  # Σ token losses, without full logits when it can
        if not real:
            continue
        total += loss_sum.item()
        count += count_targets(labels)
    total, count = ctx.sum(total, count)
    model.train(was_training)
    return (total / max(count, 1)), int(count)


EVAL_BATCHES = 8  # batches of `eval_data` scored at each checkpoint (the final evaluation scores all)


def run_training(
    model,
    stream,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    hooks: list[TrainHook] | None = None,
    eval_data=None,
    device: torch.device | str = "cpu",
    ctx: DistContext = SINGLE,
    resume: bool = False,
    progress: bool = True,
) -> LoopResult:
    """Train `model`'s trainable parameters on batches from `stream` for `cfg.steps` steps.

    `stream` yields global batches; in a job this rank trains on its slice of each.
    `cfg.parallel`: "ddp", or "fsdp" when `model` is already sharded (`distributed.shard_model_`).
    """
    parallel, eval_batches = cfg.parallel, EVAL_BATCHES
    hooks = hooks or []
    sharded = ctx.active and parallel == "fsdp"
    progress = progress and ctx.is_main
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    metrics_path, ckpt_root = run.metrics, run.checkpoints
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(
        params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8, foreach=True
    )
    objective = wrap_objective(CausalLMLoss(model), ctx, parallel)
    step, tokens, seconds = 0, 0, 0.0
    if ctx.is_main:
        ckpt.clean_partial(ckpt_root)
    found = ctx.from_main(_resume_point(ckpt_root) if ctx.is_main else None) if resume else None
    if resume and found is None:  # killed before its first checkpoint was complete: nothing to lose
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", ckpt_root)
    if found is not None:
        found = Path(found)
        state = ckpt.load_checkpoint(found, params, optimizer, ctx)
        step, tokens, seconds = state["step"], state["tokens"], state["seconds"]
        stream.load_state(state["data"])
        for h in hooks:
            h.restore_tensors(state["extra"])
        if ctx.is_main:
            kept = [m for m in read_jsonl(metrics_path) if m.get("step", 0) <= step]
            atomic_write_text(metrics_path, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept))
        log.info("resumed from %s (step %d)", found, step)
    elif metrics_path.exists() and ctx.is_main:
        metrics_path.unlink()

    for h in hooks:
        h.on_start(step)
    model.train()
    bar = tqdm(
        total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True
    )
    stopped, stop_signal, signals = None, None, StopSignals()

    metrics = MetricsFile(metrics_path, enabled=ctx.is_main)
    flops_at: dict[int, float | None] = {}  # FLOPs per token by sequence length

    def save(at_step: int, data_position: dict) -> None:
        metrics.sync()  # the lines up to this checkpoint are on disk before it is
        if not _all_finite(params, ctx):  # never checkpoint a poisoned state (clipping off lets one through)
            raise TrainingDiverged(
                f"the weights became non-finite by step {at_step}; stopped. {_last_finite(ckpt_root)}"
            )
        extra = {}
        for h in hooks:
            extra.update(h.checkpoint_tensors())
        ckpt.save_checkpoint(
            ckpt_root,
            at_step,
            params,
            optimizer,
            {"tokens": tokens, "seconds": seconds, "data": data_position},
            extra=extra,
            keep=cfg.keep_checkpoints,
            ctx=ctx,
            sharded=sharded,
        )

    signals.install()
    first = True
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            maybe_fault(f"step:{step + 1}")
            lr = lr_at(step, cfg.lr, cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
            for h in hooks:
                lr *= h.lr_factor(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for h in hooks:
                h.before_step(step)
            position = stream.state()  # where a checkpoint of the state before this step resumes
            batch = next(stream)
            # Normalise by the target tokens of the whole global step (see loss.py).
            num_items = torch.tensor(float(max(count_targets(batch["labels"]), 1)), device=device)
            micro_losses, step_tokens = [], 0
            micro = _micro_batches(batch, ctx, cfg.grad_accum)
            for k, mb in enumerate(micro):
                weight = 1.0
                if mb is None:  # no rows left for this micro-batch in a short last batch
                    mb, weight = {key: v[:1] for key, v in batch.items()}, 0.0
                step_tokens += int(mb["attention_mask"].sum()) if weight else 0  # on the host batch
                mb = {key: v.to(device) for key, v in mb.items()}
                with _no_sync(objective, last=k == len(micro) - 1):
                    lm_loss = (
                        objective(mb["input_ids"], mb["attention_mask"], mb["labels"], num_items) * weight
                    )
                    loss = lm_loss
                    for h in hooks:
                        extra = h.extra_loss(mb)
                        if extra is not None:
                            loss = loss + extra * weight / len(micro)
                    # DDP and FSDP average gradients over ranks; the loss is already a share of
                    # the global sum, so scale by the world size to get the sum's gradient.
                    (loss * ctx.world).backward()
                micro_losses.append(lm_loss.detach().float())
            grad_norm, norm = None, None
            if cfg.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
                norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()
            # One host sync a step for the loss and the norm together (the finiteness guard
            # needs both before the optimiser step); summed in float64 in micro-batch order.
            values = torch.stack(
                micro_losses + ([norm.to(micro_losses[0].device)] if norm is not None else [])
            )
            values = values.tolist()
            step_loss = 0.0
            for v in values[: len(micro_losses)]:
                step_loss += v
            if norm is not None:
                grad_norm = values[-1]
            stop_votes = (signals.signum == signal.SIGTERM, signals.signum == signal.SIGINT)
            if ctx.world > 1:  # the ranks agree on a signal stop through the sum they already make
                step_loss, step_tokens, *stop_votes = ctx.sum(step_loss, step_tokens, *stop_votes)
                step_tokens = int(step_tokens)
            if not (math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad_norm))):
                optimizer.zero_grad(set_to_none=True)  # the step is not taken: weights stay finite
                _diverged(
                    step, step_loss, grad_norm, lambda s=step, p=position: save(s, p), ckpt_root, params, ctx
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            dt = time.perf_counter() - t0
            seconds += dt
            record = {
                "step": step,
                "loss": step_loss,
                "lr": lr,
                "tokens": tokens,
                "step_tokens": step_tokens,
                "seconds": round(seconds, 4),
                "step_seconds": round(dt, 4),
                "tokens_per_s": round(step_tokens / dt, 1),
            }
            seq_len = int(batch["input_ids"].shape[1])
            if seq_len not in flops_at:
                flops_at[seq_len] = _flops_per_token(model, params, seq_len)
            if flops_at[seq_len] is not None:
                record["flops_per_token"] = flops_at[seq_len]
                record["flops_per_s"] = round(step_tokens * flops_at[seq_len] / dt, 1)
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            for h in hooks:
                record.update(h.after_step(step, optimizer))
            if "step_joules" in record:
                record["j_per_token"] = record["step_joules"] / max(step_tokens, 1)
            if eval_data is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                record["eval_loss"], _ = evaluate_loss(
                    model, eval_data, stream.batch_size, eval_batches, device, ctx
                )
            metrics.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / dt:,.0f}")
            stopped = next(
                (r for h in hooks if (r := h.should_stop())), None
            )  # job-wide sums: same on every rank
            if any(stop_votes):
                stop_signal = signal.SIGTERM if stop_votes[0] else signal.SIGINT
                stopped = f"stopped by {signal.Signals(stop_signal).name}"
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped:
                save(step, stream.state())
            if stopped:
                break
            if first:  # one whole step is now in the peak: the host heap can be sized for speed
                first = False
                relax_after_first_step(device)
    finally:
        signals.restore()
        metrics.close()
        bar.close()
        for h in hooks:
            h.on_end(step)
    return LoopResult(step=step, tokens=tokens, seconds=seconds, stopped=stopped, signal=stop_signal)
