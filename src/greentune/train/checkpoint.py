"""Checkpoints that survive SIGKILL: `checkpoints/step-N/` appears by one atomic rename.

A checkpoint holds the trainable tensors, the AdamW state, the torch RNG states, the
data position and counters — everything needed for a resumed run to continue
bit-identically on CPU. Tensors go to safetensors and the rest to JSON: nothing is ever
unpickled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..fsutil import atomic_dir

STEP_RE = re.compile(r"^step-(\d+)$")

# Fault injection for the crash tests: GREENTUNE_FAULT=checkpoint-write:N kills this
# process with SIGKILL halfway through writing checkpoint N.
FAULT_ENV = "GREENTUNE_FAULT"


def _maybe_fault(step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"checkpoint-write:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{names[param]}::{key}"] = value.detach().contiguous().clone()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                           tensors: dict[str, torch.Tensor]) -> None:
    optimizer.state.clear()
    for key, value in tensors.items():
        name, field = key.rsplit("::", 1)
        if name not in params:
            raise UserError(f"checkpoint has optimiser state for {name}, which this model does not train")
        optimizer.state[params[name]][field] = value.to(params[name].device)


def save_checkpoint(ckpt_root: Path, step: int, params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, state: dict, extra: dict[str, torch.Tensor] | None = None,
                    keep: int = 2) -> Path:
    """Write `ckpt_root/step-<step>` atomically, then drop all but the newest `keep`."""
    names = {p: n for n, p in params.items()}
    target = ckpt_root / f"step-{step}"
    with atomic_dir(target) as tmp:
        save_file({n: p.detach().contiguous().clone() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
        save_file(optimizer_tensors(optimizer, names), str(tmp / "optimizer.safetensors"))
        _maybe_fault(step)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        if extra:
            save_file({k: v.detach().contiguous().clone() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "param_groups": groups}, indent=2))
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones only exist under temp names)."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def clean_partial(ckpt_root: Path) -> None:
    """Remove temp folders left by a process killed while writing a checkpoint."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Restore tensors, optimiser state and RNG from `path`; return the JSON state (+ `extra`)."""
    trainable = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(params) - set(trainable))
    if missing:
        raise UserError(f"{path}: checkpoint lacks {missing[0]}; was it written by another recipe?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trainable[name])
    load_optimizer_tensors(optimizer, params, load_file(str(path / "optimizer.safetensors")))
    state = json.loads((path / "state.json").read_text())
    for group, saved in zip(optimizer.param_groups, state.pop("param_groups")):
        group.update(saved)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    extra_path = path / "extra.safetensors"
    state["extra"] = load_file(str(extra_path)) if extra_path.exists() else {}
    return state
