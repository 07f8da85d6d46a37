"""Swap a model's frozen weights for quantised ones, in place.

What is quantised (`plan`):
* every `nn.Linear` whose qualified name contains none of the `skip` substrings
  (default: ``lm_head``, ``embed_tokens``) → `QuantLinear`;
* every 3D ``*_proj`` parameter of an experts module (class name containing "Experts", i.e.
  transformers v5's fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, or greentune's
  `moe.experts.SparseExperts` holding them) → `QuantExperts3D`,
  registered as a submodule under the parameter's own name, so ``experts.gate_up_proj[e]``
  still yields expert e's ``[2I, H]`` weight.

Rows that are not whole blocks of the requested format fall back to Q8_0 or F32
(`formats.fallback_format`); a tied output layer is kept tied (not quantised). Experts modules
are switched to transformers' ``eager`` experts implementation, the one that indexes experts
one by one (``grouped_mm`` / ``batched_mm`` read the whole 3D parameter).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .block import BlockFormat
from .experts import QuantExperts3D
from .formats import fallback_format, get_format
from .linear import QuantLinear

logger = logging.getLogger(__name__)

DEFAULT_SKIP = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class Target:
    """One weight to quantise: module `module_name`'s `attr` (``"weight"`` of a Linear, or an
    experts parameter), logical `shape`, stored in `fmt` (after any fallback)."""
    module_name: str
    attr: str
    kind: str                 # "linear" | "experts"
    shape: tuple[int, ...]
    fmt: BlockFormat
    bias: bool = False        # a Linear's bias (kept fp32 by QuantLinear)

    @property
    def key(self) -> str:
        """The state-dict key of the original (unquantised) weight."""
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(s and s in name for s in skip)


def is_experts_module(module: nn.Module) -> bool:
    return "Experts" in type(module).__name__


def _tied_output_names(model: nn.Module) -> set[str]:
    """Module names whose weight is the input embedding's (tied word embeddings)."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is None or getattr(emb, "weight", None) is None:
        return set()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (m.weight is emb.weight or (tied and name.endswith("lm_head"))):
            out.add(name)
    return out


def plan(model: nn.Module, fmt: "str | BlockFormat", skip: Iterable[str] = DEFAULT_SKIP) -> list[Target]:
    """The weights `quantize_model_` would quantise, in module order (works on meta models)."""
    wanted = get_format(fmt)
    skip = tuple(skip)
    tied = _tied_output_names(model)
    targets: list[Target] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear | QuantExperts3D):
            continue
        if isinstance(module, nn.Linear):
            if _skipped(name, skip):
                continue
            if name in tied:
                logger.info("%s shares the input embedding's weight: left unquantised", name)
                continue
            targets.append(Target(name, "weight", "linear", (module.out_features, module.in_features),
                                  fallback_format(wanted, module.in_features), module.bias is not None))
        elif is_experts_module(module):
            for pname, p in module.named_parameters(recurse=False):
                full = f"{name}.{pname}"
                if p.dim() == 3 and pname.endswith("_proj") and not _skipped(full, skip):
                    targets.append(Target(name, pname, "experts", tuple(p.shape),
                                          fallback_format(wanted, p.shape[-1])))
    return targets


def empty_quantized_module(target: Target, device=None) -> nn.Module:
    """An uninitialised (zero bytes) quantised module for `target`, for streaming loads."""
    if target.kind == "linear":
        out, inp = target.shape
        return QuantLinear(inp, out, target.fmt, bias=target.bias, device=device)
    return QuantExperts3D(*target.shape, fmt=target.fmt, device=device)


def install(model: nn.Module, target: Target, module: nn.Module) -> None:
    """Put quantised `module` where `target` points: replace the Linear, or replace the experts
    parameter by a submodule of the same name."""
    parent = model.get_submodule(target.module_name) if target.module_name else model
    if target.kind == "linear":
        *path, leaf = target.module_name.split(".")
        owner = model.get_submodule(".".join(path)) if path else model
        setattr(owner, leaf, module)
    else:
        delattr(parent, target.attr)              # drop the nn.Parameter
        parent.add_module(target.attr, module)


def use_eager_experts(model: nn.Module) -> None:
    """Select transformers' eager experts loop (it indexes experts; the fused kernels can't)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_experts_implementation", "eager") in (None, "eager"):
        return
    setter = getattr(model, "set_experts_implementation", None)
    try:
        if callable(setter):
            setter("eager")
        else:
            config._experts_implementation = "eager"
        logger.info("quantised experts: switched experts implementation to 'eager'")
    except (ValueError, AttributeError) as exc:      # pragma: no cover - depends on transformers
        logger.warning("could not switch experts implementation to eager: %s", exc)


@torch.no_grad()
def quantize_model_(model: nn.Module, fmt: "str | BlockFormat",
                    skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, int]:
    """Replace `model`'s Linear layers and fused expert tensors by quantised ones, in place.

    Args:
        model: any torch module (typically a transformers causal LM), weights materialised.
        fmt: a format name (see `formats.get_format`) or a `BlockFormat`.
        skip: substrings of qualified module names to leave unquantised.
    Returns:
        counts: ``linear`` and ``experts`` modules quantised, ``fallback`` of those stored in
        another format than asked, ``params`` quantised weights, ``packed_bytes`` their size.
    """
    wanted = get_format(fmt)
    counts = dict(linear=0, experts=0, fallback=0, params=0, packed_bytes=0)
    fallbacks: dict[str, int] = {}
    for target in plan(model, wanted, skip):
        if target.kind == "linear":
            module = QuantLinear.from_linear(model.get_submodule(target.module_name), target.fmt)
        else:
            module = QuantExperts3D.from_tensor(getattr(model.get_submodule(target.module_name), target.attr),
                                                target.fmt)
        install(model, target, module)
        counts[target.kind] += 1
        counts["params"] += int(torch.Size(target.shape).numel())
        counts["packed_bytes"] += module.qweight.numel()
        if target.fmt is not wanted:
            counts["fallback"] += 1
            fallbacks[target.fmt.name] = fallbacks.get(target.fmt.name, 0) + 1
    if fallbacks:
        logger.warning("%d of %d weights have rows that are not whole %s blocks; stored as %s",
                       counts["fallback"], counts["linear"] + counts["experts"], wanted.name,
                       ", ".join(f"{n}×{k}" for k, n in fallbacks.items()))
    if counts["experts"]:
        use_eager_experts(model)
    return counts
