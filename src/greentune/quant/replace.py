"""Swap a model's frozen weights for quantised ones, in place.

What is quantised (`plan`):
* every `nn.Linear` whose qualified name contains none of the `skip` substrings →
  `QuantLinear`; the output layer (``get_output_embeddings()``) in the head format of
  `embedding_formats` (Q6_K for the 4-bit formats, as llama.cpp's Q4_K_M / Q4_0 do);
* the input token embedding, when it is a plain `nn.Embedding` → `QuantEmbedding` in the
  embedding format of `embedding_formats` (the base format; Q4_K for Q4_K, as Q4_K_M);
  with tied word embeddings the one shared table is quantised once, in the head format (as
  llama.cpp does: `token_embd` takes the output's type), and the lm_head becomes a
  `QuantTiedHead` reading it. Skipping either name (e.g. ``skip=("lm_head", "embed_tokens")``,
  the old default) keeps a tied pair in full precision;
* every 3D ``*_proj`` parameter of an experts module (class name containing "Experts", i.e.
  transformers v5's fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, or greentune's
  `moe.experts.SparseExperts` holding them) → `QuantExperts3D`,
  registered as a submodule under the parameter's own name, so ``experts.gate_up_proj[e]``
  still yields expert e's ``[2I, H]`` weight (gpt-oss's transposed ``[E, H, 2I]`` is stored
  as its transpose, `expert_shape`);
* with ``mxfp4`` (an experts format) the experts are MXFP4 and the other Linears Q8_0.

Rows that are not whole blocks of the requested format fall back to Q8_0 or F32
(`formats.fallback_format`). Experts modules are switched to transformers' ``eager`` experts
implementation, the one that indexes experts one by one (``grouped_mm`` / ``batched_mm`` read
the whole 3D parameter).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from greentune.quant.block import BlockFormat
from greentune.quant.embedding import QuantEmbedding, QuantTiedHead
from greentune.quant.experts import QuantExperts3D
from greentune.quant.formats import fallback_format, get_format
from greentune.quant.linear import QuantLinear

logger = logging.getLogger(__name__)

#: Nothing is skipped by default: embeddings and lm_head are quantised too (see `embedding_formats`).
DEFAULT_SKIP: tuple[str, ...] = ()

# (token embedding, output layer) formats per base format, after llama.cpp's mixes: Q4_K_M
# stores token_embd in Q4_K and output in Q6_K, Q4_0 output in Q6_K, Q8_0 everything in Q8_0.
# NF4 (no GGUF type) follows the 4-bit pattern; NF4 with double quantisation is not row-local,
# so its embedding rows use plain NF4.
_EMBEDDING_MIX = {
    "q4_k": ("q4_k", "q6_k"),
    "q4_0": ("q4_0", "q6_k"),
    "nf4": ("nf4", "q6_k"),
    "nf4_dq": ("nf4", "q6_k"),
    "mxfp4": ("q8_0", "q8_0"),
}
# Formats meant for experts only: the other Linear layers take this format (MXFP4 as
# llama.cpp's MXFP4_MOE files store gpt-oss: experts MXFP4, the rest Q8_0).
_LINEAR_OF = {"mxfp4": "q8_0"}


def expert_shape(module: nn.Module, p: torch.Tensor) -> tuple[int, int, int]:
    """The [E, out, in] shape an experts parameter is stored in: gpt-oss's are transposed
    ([E, in, out], `is_transposed`), so its store quantises along `in` as GGUF does."""
    if getattr(module, "is_transposed", False):
        return (p.shape[0], p.shape[2], p.shape[1])
    return tuple(p.shape)


def expert_tensor(module: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """An experts parameter as [E, out, in] (a transposed view for gpt-oss)."""
    return p.transpose(1, 2) if getattr(module, "is_transposed", False) else p


@dataclass(frozen=True)
class Target:
    """One weight to quantise: module `module_name`'s `attr` (``"weight"`` of a Linear, or an
    experts parameter), logical `shape`, stored in `fmt` (after any fallback)."""

    module_name: str
    attr: str
    kind: str  # "linear" | "experts" | "embedding" | "tied_head"
    shape: tuple[int, ...]
    fmt: BlockFormat
    bias: bool = False  # a Linear's bias (kept fp32 by QuantLinear)
    source: str = ""  # tied_head: the embedding module it reads
    padding_idx: int | None = None  # embedding
    requested: BlockFormat | None = None  # the format asked for, when `fmt` is a fallback

    @property
    def key(self) -> str:
        """The state-dict key of the original (unquantised) weight."""
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(s and s in name for s in skip)


def is_experts_module(module: nn.Module) -> bool:
    return "Experts" in type(module).__name__


def embedding_formats(fmt: str | BlockFormat) -> tuple[BlockFormat, BlockFormat]:
    """``(token embedding format, output layer format)`` for a base quantised in `fmt`."""
    fmt = get_format(fmt)
    emb, head = _EMBEDDING_MIX.get(fmt.name, (fmt.name, fmt.name))
    emb = get_format(emb)
    return (emb if emb.row_local else get_format("nf4")), get_format(head)


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _embedding_module(model: nn.Module, getter: str) -> nn.Module | None:
    """`model.get_input_embeddings()` / `get_output_embeddings()`, or None where the model has
    none (transformers raises NotImplementedError for some architectures)."""
    get = getattr(model, getter, None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def _io_modules(model: nn.Module) -> tuple[str | None, str | None, bool]:
    """(input embedding name if a plain nn.Embedding, output layer name if a Linear, tied?)."""
    emb = _embedding_module(model, "get_input_embeddings")
    head = _embedding_module(model, "get_output_embeddings")
    emb_name = _module_name(model, emb) if type(emb) is nn.Embedding else None
    head_name = _module_name(model, head) if isinstance(head, nn.Linear) else None
    tied = False
    if emb is not None and head is not None and getattr(emb, "weight", None) is not None:
        tied = getattr(head, "weight", None) is emb.weight or (
            bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
            and isinstance(head, nn.Linear)
            and isinstance(emb, nn.Embedding)
        )
    if emb is not None and type(emb) is not nn.Embedding:
        logger.info("input embedding is a %s, not a plain nn.Embedding: left unquantised", type(emb).__name__)
    return emb_name, head_name, tied


def plan(model: nn.Module, fmt: str | BlockFormat, skip: Iterable[str] = DEFAULT_SKIP) -> list[Target]:
    """The weights `quantize_model_` would quantise, in module order, a tied head after its
    embedding (works on meta models)."""
    wanted = get_format(fmt)
    emb_fmt, head_fmt = embedding_formats(wanted)
    experts_fmt, linear_fmt = wanted, get_format(_LINEAR_OF.get(wanted.name, wanted.name))
    skip = tuple(skip)
    emb_name, head_name, tied = _io_modules(model)
    if emb_name is not None and _skipped(emb_name, skip):
        emb_name = None
    if head_name is not None and _skipped(head_name, skip):
        head_name = None
    keep_head = None  # a tied output layer whose embedding stays in full precision
    if tied and (emb_name is None or head_name is None or model.get_submodule(head_name).bias is not None):
        logger.info("tied input/output embedding left unquantised (skipped or not a plain pair)")
        keep_head, emb_name, head_name = head_name, None, None
    targets: list[Target] = []
    tied_head: Target | None = None
    routers = _router_names(model)

    def stored(f: BlockFormat, row: int) -> dict:
        used = fallback_format(f, row)
        return dict(fmt=used, requested=f if used is not f else None)

    for name, module in model.named_modules():
        if isinstance(module, QuantLinear | QuantExperts3D | QuantEmbedding | QuantTiedHead):
            continue
        if name == emb_name:
            shape = (module.num_embeddings, module.embedding_dim)
            targets.append(
                Target(
                    name,
                    "weight",
                    "embedding",
                    shape,
                    padding_idx=module.padding_idx,
                    **stored(head_fmt if tied else emb_fmt, module.embedding_dim),
                )
            )
            if tied:
                tied_head = Target(head_name, "weight", "tied_head", shape, targets[-1].fmt, source=name)
        elif isinstance(module, nn.Linear):
            if (
                (tied and name in (head_name, keep_head))
                or _skipped(name, skip)
                or _shares_embedding(model, module, name)
                or name in routers
            ):
                continue
            f = head_fmt if name == head_name else linear_fmt
            targets.append(
                Target(
                    name,
                    "weight",
                    "linear",
                    (module.out_features, module.in_features),
                    bias=module.bias is not None,
                    **stored(f, module.in_features),
                )
            )
        elif is_experts_module(module):
            for pname, p in module.named_parameters(recurse=False):
                full = f"{name}.{pname}"
                if p.dim() == 3 and pname.endswith("_proj") and not _skipped(full, skip):
                    shape = expert_shape(module, p)
                    targets.append(Target(name, pname, "experts", shape, **stored(experts_fmt, shape[-1])))
    if tied_head is not None:
        targets.append(tied_head)
    return targets


def _router_names(model: nn.Module) -> set[str]:
    """MoE routers that are `nn.Linear`s (PhiMoE's): the `gate`/`router` beside an `experts`
    module stays in full precision, as every router does (its errors change which experts run)."""
    out = set()
    for name, module in model.named_modules():
        if isinstance(getattr(module, "experts", None), nn.Module):
            out |= {f"{name}.{a}" if name else a for a in ("gate", "router") if hasattr(module, a)}
    return out


def _shares_embedding(model: nn.Module, linear: nn.Linear, name: str) -> bool:
    """A Linear sharing the input embedding's weight outside the planned tied pair (e.g. the
    pair was skipped): left in full precision rather than quantising one tensor twice."""
    emb = _embedding_module(model, "get_input_embeddings")
    if emb is None or getattr(emb, "weight", None) is None or linear.weight is not emb.weight:
        return False
    logger.info("%s shares the input embedding's weight: left unquantised", name)
    return True


def empty_quantized_module(
    target: Target, device=None, model: nn.Module | None = None, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """An uninitialised quantised module for `target`, for streaming loads. A tied head needs
    `model`, whose (already installed) quantised embedding it reads.

    The packed bytes are `torch.empty`, not zeros: built on the meta device, then given real
    uninitialised storage, so no page is touched until the load writes it, and the load's peak
    is what has been loaded so far plus the tensor at hand, not the whole quantised model from
    the start. (A bias, if any, is zeros.)"""
    if target.kind == "tied_head":
        return QuantTiedHead(model.get_submodule(target.source))
    if target.kind == "linear":
        out, inp = target.shape
        module = QuantLinear(inp, out, target.fmt, bias=target.bias, device="meta")
    elif target.kind == "embedding":
        module = QuantEmbedding(
            *target.shape, fmt=target.fmt, padding_idx=target.padding_idx, dtype=dtype, device="meta"
        )
    else:
        module = QuantExperts3D(*target.shape, fmt=target.fmt, device="meta")
    for name, b in module._buffers.items():
        if b is not None:
            module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    for name, p in module._parameters.items():
        if p is not None:
            module._parameters[name] = nn.Parameter(
                torch.zeros(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad
            )
    return module


def install(model: nn.Module, target: Target, module: nn.Module) -> None:
    """Put quantised `module` where `target` points: replace the Linear, or replace the experts
    parameter by a submodule of the same name."""
    parent = model.get_submodule(target.module_name) if target.module_name else model
    if target.kind in ("linear", "embedding", "tied_head"):
        *path, leaf = target.module_name.split(".")
        owner = model.get_submodule(".".join(path)) if path else model
        setattr(owner, leaf, module)
    else:
        delattr(parent, target.attr)  # drop the nn.Parameter
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
    except (ValueError, AttributeError) as exc:  # pragma: no cover - depends on transformers
        logger.warning("could not switch experts implementation to eager: %s", exc)


@torch.no_grad()
def quantize_model_(
    model: nn.Module, fmt: str | BlockFormat, skip: Iterable[str] = DEFAULT_SKIP
) -> dict[str, int]:
    """Replace `model`'s Linear layers and fused expert tensors by quantised ones, in place.

    Args:
        model: any torch module (typically a transformers causal LM), weights materialised.
        fmt: a format name (see `formats.get_format`) or a `BlockFormat`.
        skip: substrings of qualified module names to leave unquantised.
    Returns:
        counts: ``linear`` (lm_head included), ``experts`` and ``embedding`` modules quantised
        (a tied head is not counted: it reads the embedding's bytes), ``fallback`` of those
        stored in another format than their rows asked for, ``params`` quantised weights,
        ``packed_bytes`` their size.
    """
    wanted = get_format(fmt)
    counts = dict(linear=0, experts=0, embedding=0, fallback=0, params=0, packed_bytes=0)
    fallbacks: dict[str, int] = {}
    for target in plan(model, wanted, skip):
        if target.kind == "tied_head":
            install(model, target, QuantTiedHead(model.get_submodule(target.source)))
            continue
        if target.kind == "linear":
            module = QuantLinear.from_linear(model.get_submodule(target.module_name), target.fmt)
        elif target.kind == "embedding":
            emb = model.get_submodule(target.module_name)
            module = QuantEmbedding(
                *target.shape,
                fmt=target.fmt,
                padding_idx=emb.padding_idx,
                dtype=emb.weight.dtype,
                device=emb.weight.device,
            )
            module.load_weight_(emb.weight)
        else:
            owner = model.get_submodule(target.module_name)
            module = QuantExperts3D.from_tensor(expert_tensor(owner, getattr(owner, target.attr)), target.fmt)
        install(model, target, module)
        counts[target.kind] += 1
        counts["params"] += int(torch.Size(target.shape).numel())
        counts["packed_bytes"] += module.qweight.numel()
        if target.requested is not None:
            counts["fallback"] += 1
            fallbacks[target.fmt.name] = fallbacks.get(target.fmt.name, 0) + 1
    if fallbacks:
        logger.warning(
            "%d of %d weights have rows that are not whole %s blocks; stored as %s",
            counts["fallback"],
            counts["linear"] + counts["experts"] + counts["embedding"],
            wanted.name,
            ", ".join(f"{n}×{k}" for k, n in fallbacks.items()),
        )
    if counts["experts"]:
        use_eager_experts(model)
    return counts
