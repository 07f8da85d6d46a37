"""HF → GGUF tensor plan for every family of `gguf_families.FAMILIES`.

Names: each HF tensor is mapped by the `gguf` package's `TensorNameMap` of the family's
llama.cpp architecture; a tensor it does not know is refused (never silently dropped).
Experts are stacked into `blk.N.ffn_{gate,up,down}_exps` (numpy shapes (E, n_ff, n_embd),
(E, n_ff, n_embd), (E, n_embd, n_ff)); the router is `blk.N.ffn_gate_inp`, a shared expert
`blk.N.ffn_{gate,up,down}_shexp` with its gate `blk.N.ffn_gate_inp_shexp` (all by the map).

q and k are permuted for the llama-rope families as llama.cpp's converter does, because
its "llama" graph applies rotary embeddings to interleaved pairs (x0,x1),(x2,x3)… while HF
rotates halves (x_i, x_{i+d/2}): per head the rows are reordered with
`reshape(n_head, 2, d/2, …).swapaxes(1, 2)` (n_head_kv heads for k). The same index
permutation applies to prequantized block bytes since blocks never cross rows. Gemma's
norms are stored as 1 + w (`Family.norm_offset`).
A family's `split` stores some HF tensors under other names and shapes (DeepSeek's
`kv_b_proj` as per-head `attn_k_b` / `attn_v_b`, the router bias as `exp_probs_b.bias`;
the hybrids' delta-net tensors, `gguf_hybrid`), or drops them (their `mtp.*` head);
layers below `first_k_dense_replace` are dense and get no expert tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, TensorNameMap

from greentune.errors import UserError
from greentune.export.gguf_families import Family, family_of
from greentune.export.source import ModelSource, Packed, Tensor, rope_settings, shape_of, take_rows


@dataclass
class Arch:
    """The hyper-parameters llama.cpp's graphs read, and the family's row."""

    model_type: str
    family: Family
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    eps: float
    rope_theta: float
    rope_scaling: dict
    n_expert: int = 0
    n_expert_used: int = 0
    tied: bool = False
    n_rot: int = 0  # rotary dimensions (phi3's partial_rotary_factor); 0: head_dim
    config: dict = field(default_factory=dict)
    n_ff_exp: int = 0  # the experts' width (0: n_ff)
    moe_layers: tuple[int, ...] | None = None  # layers with experts (None: all)

    @classmethod
    def from_config(cls, cfg: dict, has_lm_head: bool) -> Arch:
        mt = cfg.get("model_type")
        fam = family_of(cfg)
        n_head = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        theta, scaling = rope_settings(cfg)
        head_dim = cfg.get("head_dim") or hidden // n_head
        n_expert = (
            int(
                cfg.get("num_local_experts")
                or cfg.get("num_experts")
                or cfg.get("moe_num_experts")
                or cfg.get("n_routed_experts")
                or 0
            )
            if fam.moe
            else 0
        )
        n_ff = n_ff_exp = cfg["intermediate_size"]
        if n_expert:  # the experts' width (Qwen-MoE families give it separately)
            n_ff_exp = int(cfg.get("moe_intermediate_size") or n_ff)
            if fam.moe_layers is None:  # every layer MoE: feed_forward_length is the experts'
                n_ff = n_ff_exp
        arch = cls(
            model_type=mt,
            family=fam,
            n_layer=cfg["num_hidden_layers"],
            n_embd=hidden,
            n_ff=n_ff,
            n_head=n_head,
            n_head_kv=cfg.get("num_key_value_heads") or n_head,
            head_dim=head_dim,
            n_ctx=cfg.get("max_position_embeddings", 4096),
            eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            n_expert=n_expert,
            n_expert_used=int(cfg.get("num_experts_per_tok") or cfg.get("moe_k") or 0) if n_expert else 0,
            tied=bool(cfg.get("tie_word_embeddings", False)) or not has_lm_head,
            n_rot=int(
                head_dim
                * float(
                    (cfg.get("rope_parameters") or {}).get(
                        "partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)
                    )
                )
            ),
            config=cfg,
            n_ff_exp=n_ff_exp,
            moe_layers=tuple(fam.moe_layers(cfg)) if n_expert and fam.moe_layers else None,
        )
        if fam.overrides is not None:
            for k, v in fam.overrides(cfg).items():
                setattr(arch, k, v)
        return arch

    def has_experts(self, i: int) -> bool:
        """Whether layer `i` holds experts: not a dense layer among them (ERNIE's `moe_layers`) nor
        one of DeepSeek/GLM's leading dense layers (`first_k_dense_replace`)."""
        if not self.n_expert or (self.moe_layers is not None and i not in self.moe_layers):
            return False
        return i >= int(self.config.get("first_k_dense_replace") or 0)


def qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row index that turns HF's half-rotation layout into llama.cpp's interleaved one."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


@dataclass
class PlannedTensor:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy order, rows last-but-one
    load: Callable[[], Tensor]  # produces float32 array or Packed bytes
    layer: int | None = None
    sources: tuple[str, ...] = ()  # HF tensor names it is built from


def llama3_rope_factors(arch: Arch) -> np.ndarray:
    """`rope_freqs.weight` for rope_type "llama3" (same formula as llama.cpp's converter)."""
    s = arch.rope_scaling
    dim = arch.head_dim
    freqs = 1.0 / (arch.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = s.get("factor", 8.0)
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


_EXPERT = re.compile(r"\.(?:block_sparse_moe|mlp)\.experts\.|\.block_sparse_moe\.(?:input|output)_linear\.")
# ERNIE-4.5's selection bias `mlp.moe_statics.e_score_correction_bias` [1, E]: llama.cpp's
# `blk.N.exp_probs_b.bias` [E] (the name the gguf map knows without the `_bias`)
_CORRECTION = "moe_statics.e_score_correction_bias"
# in-memory (transformers v5) names the gguf map knows only by their on-disk spelling
_ON_DISK = (
    (".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight"),  # GraniteMoE
    (".mlp.gate.moe_statics.", ".mlp.moe_statics."),  # ERNIE-4.5
)


def _on_disk(name: str) -> str:
    for mem, disk in _ON_DISK:
        name = name.replace(mem, disk)
    return name


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def plan(src: ModelSource, arch: Arch) -> list[PlannedTensor]:
    """Every GGUF tensor of the model, in llama.cpp's usual order, each loaded on demand."""
    fam = arch.family
    names = TensorNameMap(fam.arch, arch.n_layer)
    head: list[PlannedTensor] = []
    layers: dict[int, list[PlannedTensor]] = {i: [] for i in range(arch.n_layer)}
    tail: list[PlannedTensor] = []
    for hname in src.names():
        if "rotary_emb" in hname or _EXPERT.search(hname) or (hname == "lm_head.weight" and arch.tied):
            continue
        m = _LAYER.match(hname)
        layer = int(m.group(1)) if m else None
        parts = (
            None
            if fam.split is None
            else fam.split(arch.config, hname, layer, src.torch_shape(hname), _loader(src, hname, None, 0.0))
        )
        if parts is not None:  # stored otherwise (gguf_deepseek, gguf_hybrid); [] drops the tensor
            # a part naming its HF sources may carry their prequantized blocks (row reorders);
            # without, its type is the preset's and it loads as float
            for n, shp, load, *srcs in parts:
                layers[layer].append(
                    PlannedTensor(n, tuple(shp), load, layer, tuple(srcs[0]) if srcs else ())
                )
            continue
        disk = _on_disk(hname)
        gname = names.get_name(disk, try_suffixes=(".weight", ".bias"))
        flat = disk.endswith(_CORRECTION)
        if flat and names.get_name(disk[: -len("_bias")]):
            gname = names.get_name(disk[: -len("_bias")]) + ".bias"
        if gname is None:
            raise UserError(
                f"{src.origin}: tensor {hname!r} has no GGUF {fam.name!r} counterpart; "
                "its export would silently drop it"
            )
        if not gname.endswith((".weight", ".bias")):  # a bare parameter (gpt-oss's sinks) is a weight
            gname += ".weight"
        heads = None
        if fam.interleaved_rope and layer is not None:
            heads = {"attn_q": arch.n_head, "attn_k": arch.n_head_kv}.get(gname.split(".")[2])
        offset = fam.norm_offset if "norm" in gname else 0.0
        shape = src.torch_shape(hname)
        load = _loader(src, hname, heads, offset)
        if flat:
            shape, load = (int(np.prod(shape)),), (lambda f=load: f().reshape(-1))
        t = PlannedTensor(gname, shape, load, layer, (hname,))
        if layer is not None:
            layers[layer].append(t)
        elif gname.startswith("token_embd"):
            head.append(t)
        else:
            tail.append(t)
    rtype = arch.rope_scaling.get("rope_type", arch.rope_scaling.get("type"))
    if rtype == "llama3":
        head.append(
            PlannedTensor("rope_freqs.weight", (arch.head_dim // 2,), lambda: llama3_rope_factors(arch))
        )
    out = head
    for i in range(arch.n_layer):
        out += sorted(layers[i], key=lambda t: t.name)  # by GGUF name: the same file from any HF layout
        if arch.has_experts(i):
            (fam.experts or _experts)(out, src, arch, i)
    return out + sorted(tail, key=lambda t: t.name != "output_norm.weight")


def _loader(src: ModelSource, hname: str, heads: int | None, offset: float):
    def load() -> Tensor:
        t = src.get(hname)
        if heads:
            t = _permute(t, heads) if len(shape_of(t)) > 1 else t[qk_permutation(t.shape[0], heads)]
        if offset:
            if isinstance(t, Packed):
                raise UserError(f"{hname}: a norm weight cannot be prequantized")
            t = t + np.float32(offset)
        return t

    return load


def _permute(t: Tensor, n_head: int) -> Tensor:
    rows = shape_of(t)[-2]
    return take_rows(t, qk_permutation(rows, n_head))


def _experts(out, src: ModelSource, arch: Arch, i: int) -> None:
    cache: dict[str, Tensor] = {}
    kinds = ("gate", "up", "down")

    def part(kind: str):
        def load() -> Tensor:
            # gate/up/down are read together (fused layouts hold two in one tensor), handed out once
            if kind not in cache:
                cache.clear()
                cache.update(zip(kinds, src.expert_weights(i, arch.n_expert)))
            return cache.pop(kind)

        return load

    E, ff, h = arch.n_expert, arch.n_ff_exp or arch.n_ff, arch.n_embd
    names = src.expert_sources(i, arch.n_expert)
    tensors = (MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP, MODEL_TENSOR.FFN_DOWN_EXP)
    for kind, tensor, shape, srcs in zip(kinds, tensors, ((E, ff, h), (E, ff, h), (E, h, ff)), names):
        out.append(PlannedTensor(TENSOR_NAMES[tensor].format(bid=i) + ".weight", shape, part(kind), i, srcs))
