"""The training loop: AdamW on the trainable (LoRA) parameters, gradient accumulation,
clipping, a warm-up + decay schedule, one `metrics.jsonl` line per step, and atomic
checkpoints from which `--resume` continues bit-identically on CPU.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import UserError
from ..fsutil import append_jsonl, atomic_write_text, read_jsonl
from ..recipe import TrainConfig
from . import checkpoint as ckpt
from .hooks import TrainHook
from .loss import CausalLMLoss, count_targets
from .schedule import lr_at

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    step: int
    tokens: int
    seconds: float
    stopped: str | None = None  # why the loop ended early, if it did


def _micro_batches(batch: dict, grad_accum: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    size = math.ceil(n / grad_accum)
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


@torch.no_grad()
def evaluate_loss(model, data, batch_size: int, max_batches: int | None = None, device="cpu") -> tuple[float, int]:
    """Mean token loss over `data` (a PackedData), and the number of scored tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = data.input_ids.shape[0]
    for b, i in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        ids = data.input_ids[i:i + batch_size].to(device)
        labels = data.labels[i:i + batch_size].to(device)
        mask = data.attention_mask[i:i + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100,
            reduction="sum")
        total += loss.item()
        count += int((shift_labels != -100).sum())
    model.train(was_training)
    return (total / max(count, 1)), count


def run_training(model, stream, cfg: TrainConfig, run_dir: Path, *, resume: bool = False,
                 hooks: list[TrainHook] | None = None, eval_data=None, eval_batches: int = 8,
                 device: torch.device | str = "cpu", progress: bool = True) -> LoopResult:
    """Train `model`'s trainable parameters on batches from `stream` for `cfg.steps` steps."""
    hooks = hooks or []
    run_dir = Path(run_dir)
    metrics_path, ckpt_root = run_dir / "metrics.jsonl", run_dir / "checkpoints"
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8, foreach=True)
    objective = CausalLMLoss(model)
    step, tokens, seconds = 0, 0, 0.0
    ckpt.clean_partial(ckpt_root)
    if resume:
        found = ckpt.list_checkpoints(ckpt_root)
        if not found:
            raise UserError(f"--resume: no complete checkpoint in {ckpt_root}")
        state = ckpt.load_checkpoint(found[-1], params, optimizer)
        step, tokens, seconds = state["step"], state["tokens"], state["seconds"]
        stream.load_state(state["data"])
        for h in hooks:
            h.restore_tensors(state["extra"])
        kept = [m for m in read_jsonl(metrics_path) if m.get("step", 0) <= step]
        atomic_write_text(metrics_path, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept))
        log.info("resumed from %s (step %d)", found[-1], step)
    elif metrics_path.exists():
        metrics_path.unlink()

    for h in hooks:
        h.on_start(step)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    stopped = None
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
            for h in hooks:
                lr *= h.lr_factor(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for h in hooks:
                h.before_step(step)
            batch = next(stream)
            step_loss, step_tokens = 0.0, 0
            micro = _micro_batches(batch, cfg.grad_accum)
            num_items = torch.tensor(float(max(count_targets(batch["labels"]), 1)), device=device)
            for mb in micro:
                mb = {k: v.to(device) for k, v in mb.items()}
                lm_loss = objective(mb["input_ids"], mb["attention_mask"], mb["labels"], num_items)
                loss = lm_loss
                for h in hooks:
                    extra = h.extra_loss(mb)
                    if extra is not None:
                        loss = loss + extra / len(micro)
                loss.backward()
                step_loss += lm_loss.item()
                step_tokens += int(mb["attention_mask"].sum())
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            dt = time.perf_counter() - t0
            seconds += dt
            record = {"step": step, "loss": step_loss, "lr": lr, "tokens": tokens, "seconds": round(seconds, 4),
                      "step_seconds": round(dt, 4), "tokens_per_s": round(step_tokens / dt, 1)}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            for h in hooks:
                record.update(h.after_step(step, optimizer))
            if "step_joules" in record:
                record["j_per_token"] = record["step_joules"] / max(step_tokens, 1)
            if eval_data is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                record["eval_loss"], _ = evaluate_loss(model, eval_data, stream.batch_size, eval_batches, device)
            append_jsonl(metrics_path, record)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / dt:,.0f}")
            stopped = next((r for h in hooks if (r := h.should_stop())), None)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped:
                extra = {}
                for h in hooks:
                    extra.update(h.checkpoint_tensors())
                ckpt.save_checkpoint(ckpt_root, step, params, optimizer,
                                     {"tokens": tokens, "seconds": seconds, "data": stream.state()},
                                     extra=extra, keep=cfg.keep_checkpoints)
            if stopped:
                break
    finally:
        bar.close()
        for h in hooks:
            h.on_end(step)
    return LoopResult(step=step, tokens=tokens, seconds=seconds, stopped=stopped)
