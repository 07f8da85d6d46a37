"""The pipeline, as the product describes itself:

reuse a pretrained model → (quantise its frozen base) → (upcycle it to experts) → attach
(Re)LoRA adapters → train them → merge → export → report, recording the energy of each
phase on the way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .adapters.lora import apply_lora, fuse_all_
from .adapters.peft_format import save_adapter
from .data import build_datasets
from .data.packing import BatchStream
from .errors import UserError
from .fsutil import atomic_dir, atomic_write_json, atomic_write_text
from .models.loader import default_device, load_config, load_model, load_tokenizer, max_positions, check_model_dir
from .recipe import Recipe, check_supported, load_recipe
from .train.loop import LoopResult, evaluate_loss, run_training

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    tokens: int
    seconds: float
    eval_loss: float | None = None
    stopped: str | None = None
    outputs: dict = field(default_factory=dict)

    @property
    def eval_ppl(self) -> float | None:
        import math
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
    recipe_path = run_dir / "recipe.yaml"
    if recipe_path.exists():
        try:
            old = yaml.safe_load(recipe_path.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        old_identity = Recipe.model_validate(old).identity() if old else {}
        diff = _first_difference(old_identity, recipe.identity())
        if diff:
            raise UserError(f"run dir {run_dir} belongs to a different recipe (differs at '{diff}'); "
                            "choose another --run-dir")
        if not resume and (run_dir / "checkpoints").exists():
            raise UserError(f"run dir {run_dir} already holds a run; pass --resume to continue it "
                            "or choose another --run-dir")
    elif resume:
        raise UserError(f"--resume: {run_dir} holds no run (no recipe.yaml)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recipe_path, yaml.safe_dump(recipe.dump(), sort_keys=False))


def train(recipe: Recipe | str | Path, run_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True) -> RunResult:
    """Run a recipe end to end; returns where everything went and the final eval loss."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    check_supported(recipe)
    run_dir = Path(run_dir or Path("runs") / (recipe.name or "run"))
    base = recipe.base_model

    # Validate everything the user controls before touching the run dir.
    check_model_dir(base)
    config = load_config(Path(base), recipe.trust_remote_code)
    limit = max_positions(config)
    if limit is not None and recipe.data.max_seq_len > limit:
        raise UserError(f"data.max_seq_len {recipe.data.max_seq_len} exceeds the model's {limit} positions")
    tokenizer = load_tokenizer(base, recipe.trust_remote_code)
    tcfg = recipe.train
    train_data, eval_data = build_datasets(recipe.data.train, recipe.data.eval, tokenizer, recipe.data.max_seq_len,
                                           recipe.data.pack, tcfg.seed, recipe.data.eval_fraction)
    prepare_run_dir(run_dir, recipe, resume)

    device = default_device()
    torch.manual_seed(tcfg.seed)
    model = load_model(base, device=device, trust_remote_code=recipe.trust_remote_code)
    lora = recipe.method.lora
    wrapped = apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA on %d modules, %d trainable parameters", len(wrapped), n_train)

    stream = BatchStream(train_data, tcfg.batch_size, tcfg.seed)
    result: LoopResult = run_training(model, stream, tcfg, run_dir, resume=resume, eval_data=eval_data,
                                      device=device, progress=progress)
    out = RunResult(run_dir=run_dir, steps=result.step, tokens=result.tokens, seconds=result.seconds,
                    stopped=result.stopped)
    if result.stopped:
        return out

    adapter_dir = save_adapter(model, run_dir / "adapter", lora.rank, lora.alpha, lora.dropout, base)
    out.eval_loss, _ = evaluate_loss(model, eval_data, tcfg.batch_size, device=device)
    fuse_all_(model)
    merged_dir = run_dir / "merged"
    with atomic_dir(merged_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    out.outputs.update(adapter=str(adapter_dir), merged=str(merged_dir))
    atomic_write_json(run_dir / "summary.json", {
        "steps": out.steps, "tokens": out.tokens, "seconds": out.seconds, "eval_loss": out.eval_loss,
        "eval_ppl": out.eval_ppl, "trainable_parameters": n_train, "lora_modules": len(wrapped),
        "outputs": out.outputs,
    })
    return out
