"""ReLoRA: merge the low-rank update into the base every N steps and start a fresh one,
so that the sum of many rank-r updates can reach high rank (Lialin et al. 2023).

At every `merge_every` steps (`after_step`):

1. merge `W += B·A·alpha/rank` into each base in place — for a quantised base that is
   dequantise → add → re-quantise (`base.add_`), for MoE experts per expert;
2. re-initialise A (Kaiming-uniform) and B (zero), so the model output is unchanged;
3. prune the Adam moments of the LoRA parameters only: zero the `optimizer_prune`
   fraction of entries with the smallest |exp_avg|, in *both* moments with the same mask
   (pruning them independently leaves large first moments over zeroed second moments
   and the first updates explode — see REFERENCE.md's measured caution);
4. the LR restarts from zero and re-warms linearly over `restart_warmup` steps back onto
   the global envelope (`lr_factor`, the jagged schedule).

The merged bases are part of every checkpoint taken after the first merge, so a resume
across a merge boundary is bit-identical; no full-precision copy of the base is kept.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from torch import nn
from tqdm import tqdm

from greentune.adapters.expert_lora import ExpertLoRA
from greentune.adapters.lora import LoRALinear, lora_modules
from greentune.moe.experts import SparseExperts, sparse_experts
from greentune.recipe import ReloraConfig
from greentune.train.hooks import TrainHook
from greentune.train.schedule import restart_factor

log = logging.getLogger(__name__)

BASE_PREFIX = "relora.base."


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors of `model`: dense `LoRALinear` pairs and MoE expert LoRA factors."""
    params = []
    for m in model.modules():
        if isinstance(m, LoRALinear):
            params += [m.lora_A, m.lora_B]
        elif isinstance(m, ExpertLoRA):
            params += list(m.parameters())
    return params


@torch.no_grad()
def prune_adam_moments_(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], ratio: float) -> int:
    """Zero the `ratio` smallest-|exp_avg| entries of both Adam moments of `params`; returns the
    entries zeroed."""
    zeroed = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state or "exp_avg" not in state:
            continue
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if ratio >= 1.0:
            mask = torch.zeros_like(m, dtype=torch.bool)
        else:
            k = int(m.numel() * ratio)
            if k == 0:
                continue
            threshold = m.abs().flatten().kthvalue(k).values
            mask = m.abs() > threshold
        zeroed += int((~mask).sum())
        m.mul_(mask)
        v.mul_(mask)
    return zeroed


class ReLoRA(TrainHook):
    """The merge-and-restart hook; `phase` (optional) wraps each merge as its own energy phase."""

    def __init__(
        self,
        model: nn.Module,
        config: ReloraConfig,
        total_steps: int,
        phase=None,
        seed: int = 0,
        progress: bool = False,
    ):
        self.model, self.config, self.total_steps = model, config, total_steps
        self.phase, self.seed, self.progress = phase, seed, progress
        self.merges = 0

    def lr_factor(self, step: int) -> float:
        return restart_factor(step, self.config.merge_every, self.config.restart_warmup)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict:
        if step % self.config.merge_every or step >= self.total_steps:
            return {}
        with self.phase("merge") if self.phase else nullcontext():
            # The re-initialised factors come from a stream of their own, seeded by the step:
            # every data-parallel rank draws the same A, whatever its dropout RNG did.
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed * 1_000_003 + step)
                merged = merge_and_restart_(self.model, progress=self.progress)
            zeroed = prune_adam_moments_(optimizer, lora_parameters(self.model), self.config.optimizer_prune)
        self.merges += 1
        log.info(
            "ReLoRA merge %d at step %d: %d modules, %d moment entries zeroed",
            self.merges,
            step,
            merged,
            zeroed,
        )
        return {"relora_merge": self.merges}

    def on_start(self, step: int) -> None:
        self.merges = step // self.config.merge_every if step < self.total_steps else self.merges

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """After the first merge the bases differ from the checkpoint on disk: save them."""
        if self.merges == 0:
            return {}
        out = {}
        for name, module in merged_bases(self.model).items():
            for key, tensor in module.state_dict().items():
                out[f"{BASE_PREFIX}{name}.{key}"] = tensor
        return out

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        bases = merged_bases(self.model)
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            if not key.startswith(BASE_PREFIX):
                continue
            rest = key[len(BASE_PREFIX) :]
            owner = max((n for n in bases if rest.startswith(n + ".")), key=len, default=None)
            if owner is not None:
                groups.setdefault(owner, {})[rest[len(owner) + 1 :]] = tensor
        for name, sd in groups.items():
            bases[name].load_state_dict(sd, strict=False)


def merged_bases(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose frozen weights ReLoRA changes: LoRA bases and MoE experts (without their LoRA)."""
    out = {f"{name}.base": m.base for name, m in lora_modules(model).items()}
    for name, m in model.named_modules():
        if isinstance(m, SparseExperts) and m.lora is not None:
            out[name] = _ExpertWeights(m)
    return out


class _ExpertWeights(nn.Module):
    """A view of a SparseExperts' frozen weights (everything but its LoRA) for checkpointing."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        object.__setattr__(self, "experts", experts)

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in self.experts.state_dict().items() if not k.startswith("lora.")}

    def load_state_dict(self, sd, strict: bool = False):
        return self.experts.load_state_dict(sd, strict=False)


@torch.no_grad()
def merge_and_restart_(model: nn.Module, progress: bool = False) -> int:
    """Fuse every LoRA update into its base and re-initialise the factors; returns modules merged.
    `progress`: a bar over the modules (into a quantised base each is dequantise → add →
    re-quantise: minutes for a large model)."""
    modules = list(lora_modules(model).values())
    experts = [m for _, m in sparse_experts(model) if m.lora is not None]
    bar = tqdm(total=len(modules) + len(experts), desc="ReLoRA merge", unit="module", disable=not progress)
    for m in modules:
        m.fuse_()
        m.reset_lora_()
        bar.update()
    for m in experts:  # as fuse_expert_lora_(model, restart=True), one experts module at a time
        m.fuse(restart=True)
        bar.update()
    bar.close()
    return len(modules) + len(experts)
