"""`greentune eval`: held-out perplexity and tokens/s of a run or a model folder.

A run dir is evaluated through its `merged/` model when present, else as base + adapter.
Perplexity = exp(mean cross-entropy over the predicted tokens), with the same loss masks
as training (prompt tokens are not scored).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from greentune.data.packing import pack
from greentune.data.sources import read_samples
from greentune.data.templates import tokenize
from greentune.errors import UserError
from greentune.models.loader import (
    default_device,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_model_dir,
)
from greentune.recipe import SEQ_LEN, Recipe
from greentune.run_dir import RunDir
from greentune.train.loop import evaluate_loss


def resolve_model(target: str | Path, device="cpu"):
    """(model, tokenizer, description, the run's `Recipe` or None) for a run dir, model folder or Hub id."""
    target = Path(target)
    run = RunDir(target)
    if run.has_recipe():
        recipe = run.read_recipe()
        if run.has_merged():
            model_dir = run.merged
            return load_model(model_dir, device), load_tokenizer(model_dir), f"{model_dir}", recipe
        if run.adapter.is_dir():
            from greentune.adapters.lora import apply_lora
            from greentune.adapters.peft_format import load_lora_state_dict, read_adapter

            base = resolve_model_dir(recipe.base_model, recipe.base_model_commit)
            model = load_model(base, device)
            config, sd = read_adapter(run.adapter)
            apply_lora(model, recipe.method.lora.targets, config["r"], config["lora_alpha"])
            load_lora_state_dict(model, sd, str(run.adapter))
            return model, load_tokenizer(base), f"{base} + {run.adapter}", recipe
        raise UserError(f"{target}: run has no merged/ model or adapter/ yet (did it finish?)")
    model_dir = resolve_model_dir(target)
    return load_model(model_dir, device), load_tokenizer(model_dir), str(target), None


def load_eval_rows(path: str | Path, tokenizer, max_seq_len: int, pack_rows: bool = True):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pack(tokenize(read_samples(path), tokenizer), max_seq_len, pack=pack_rows, pad_id=pad_id)


def check_seq_len(max_seq_len: int, config, description: str) -> None:
    """Rows longer than the model's positions would index past its position table (or, with
    rotary embeddings, be out of distribution and allocate T² attention for nothing)."""
    limit = max_positions(config)
    if max_seq_len < 1 or (limit is not None and max_seq_len > limit):
        raise UserError(
            f"--max-seq-len {max_seq_len} must be between 1 and the model's {limit} positions ({description})"
        )


def evaluate_path(
    target: str | Path, data: str | Path, max_seq_len: int | None = None, batch_size: int = 8
) -> dict:
    """Perplexity, loss, tokens and tokens/s of `target` on `data`."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    device = default_device()
    model, tokenizer, description, recipe = resolve_model(target, device)
    if max_seq_len is None:
        max_seq_len = recipe.data.max_seq_len if isinstance(recipe, Recipe) else SEQ_LEN
    check_seq_len(max_seq_len, model.config, description)
    rows = load_eval_rows(data, tokenizer, max_seq_len)
    t0 = time.perf_counter()
    loss, count = evaluate_loss(model, rows, batch_size, device=device)
    seconds = time.perf_counter() - t0
    return {
        "model": description,
        "data": str(data),
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": count,
        "seconds": seconds,
        "tokens_per_s": rows.n_tokens / max(seconds, 1e-9),
    }
