"""HF → GGUF tensor plan for llama-architecture models (Llama, Mistral, Qwen2, Mixtral).

llama.cpp runs all four as `general.architecture = "llama"`:
- Llama / Mistral: dense; Mistral's sliding window is not represented (as llama.cpp's own
  converter does), so contexts longer than the window differ from HF;
- Qwen2: dense with q/k/v biases (the llama graph adds them when present);
- Mixtral: experts stacked into `blk.N.ffn_{gate,up,down}_exps` (numpy shapes
  (E, n_ff, n_embd), (E, n_ff, n_embd), (E, n_embd, n_ff)), router `blk.N.ffn_gate_inp`.

q and k are permuted as llama.cpp's converter does, because its "llama" graph applies
rotary embeddings to interleaved pairs (x0,x1),(x2,x3)… while HF rotates halves
(x_i, x_{i+d/2}): per head the rows are reordered with
`reshape(n_head, 2, d/2, …).swapaxes(1, 2)` (n_head_kv heads for k). The same index
permutation applies to prequantized block bytes since blocks never cross rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from greentune.errors import UserError
from greentune.export.source import ModelSource, Tensor, rope_settings, shape_of, take_rows

SUPPORTED = {"llama", "mistral", "mixtral", "qwen2"}


@dataclass
class Arch:
    """The hyper-parameters llama.cpp's "llama" graph reads."""

    model_type: str
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
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict, has_lm_head: bool) -> "Arch":
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            raise UserError(f"GGUF export supports model types {sorted(SUPPORTED)}; this model is {mt!r}")
        n_head = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        theta, scaling = rope_settings(cfg)
        head_dim = cfg.get("head_dim") or hidden // n_head
        n_expert = int(cfg.get("num_local_experts") or 0) if mt == "mixtral" else 0
        return cls(
            model_type=mt, n_layer=cfg["num_hidden_layers"], n_embd=hidden, n_ff=cfg["intermediate_size"],
            n_head=n_head, n_head_kv=cfg.get("num_key_value_heads") or n_head, head_dim=head_dim,
            n_ctx=cfg.get("max_position_embeddings", 4096), eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=scaling, n_expert=n_expert,
            n_expert_used=int(cfg.get("num_experts_per_tok") or 0) if n_expert else 0,
            tied=bool(cfg.get("tie_word_embeddings", False)) or not has_lm_head,
        )


def qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row index that turns HF's half-rotation layout into llama.cpp's interleaved one."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


@dataclass
class PlannedTensor:
    name: str                       # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]          # numpy order, rows last-but-one
    load: Callable[[], Tensor]      # produces float32 array or Packed bytes
    layer: int | None = None
    sources: tuple[str, ...] = ()   # HF tensor names it is built from


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


def plan(src: ModelSource, arch: Arch) -> list[PlannedTensor]:
    """Every GGUF tensor of the model, in llama.cpp's usual order, each loaded on demand."""
    out: list[PlannedTensor] = []

    def direct(gname: str, hname: str, layer: int | None = None, perm_heads: int | None = None):
        shape = src.torch_shape(hname)

        def load() -> Tensor:
            t = src.get(hname)
            if perm_heads:
                t = _permute(t, perm_heads)
            return t
        out.append(PlannedTensor(gname, shape, load, layer, (hname,)))

    direct("token_embd.weight", "model.embed_tokens.weight")
    rtype = arch.rope_scaling.get("rope_type", arch.rope_scaling.get("type"))
    if rtype == "llama3":
        out.append(PlannedTensor("rope_freqs.weight", (arch.head_dim // 2,), lambda: llama3_rope_factors(arch)))
    for i in range(arch.n_layer):
        p = f"model.layers.{i}"
        b = f"blk.{i}"
        direct(f"{b}.attn_norm.weight", f"{p}.input_layernorm.weight", i)
        for proj, g, heads in (("q", "attn_q", arch.n_head), ("k", "attn_k", arch.n_head_kv), ("v", "attn_v", None)):
            direct(f"{b}.{g}.weight", f"{p}.self_attn.{proj}_proj.weight", i, heads)
            if src.has(f"{p}.self_attn.{proj}_proj.bias"):
                _bias(out, src, f"{b}.{g}.bias", f"{p}.self_attn.{proj}_proj.bias", i, heads)
        direct(f"{b}.attn_output.weight", f"{p}.self_attn.o_proj.weight", i)
        if src.has(f"{p}.self_attn.o_proj.bias"):
            _bias(out, src, f"{b}.attn_output.bias", f"{p}.self_attn.o_proj.bias", i, None)
        direct(f"{b}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight", i)
        if arch.n_expert:
            _experts(out, src, arch, i)
        else:
            direct(f"{b}.ffn_gate.weight", f"{p}.mlp.gate_proj.weight", i)
            direct(f"{b}.ffn_up.weight", f"{p}.mlp.up_proj.weight", i)
            direct(f"{b}.ffn_down.weight", f"{p}.mlp.down_proj.weight", i)
    direct("output_norm.weight", "model.norm.weight")
    if not arch.tied:
        direct("output.weight", "lm_head.weight")
    return out


def _permute(t: Tensor, n_head: int) -> Tensor:
    rows = shape_of(t)[-2]
    return take_rows(t, qk_permutation(rows, n_head))


def _bias(out, src: ModelSource, gname: str, hname: str, layer: int, heads: int | None):
    def load() -> Tensor:
        v = src.get(hname)
        if heads:
            v = v[qk_permutation(v.shape[0], heads)]
        return v
    out.append(PlannedTensor(gname, src.torch_shape(hname), load, layer, (hname,)))


def _experts(out, src: ModelSource, arch: Arch, i: int) -> None:
    b = f"blk.{i}"
    router = src.router_name(i)
    out.append(PlannedTensor(f"{b}.ffn_gate_inp.weight", src.torch_shape(router), lambda: src.get(router), i,
                             (router,)))
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

    E, ff, h = arch.n_expert, arch.n_ff, arch.n_embd
    names = src.expert_sources(i, arch.n_expert)
    for kind, shape, srcs in zip(kinds, ((E, ff, h), (E, ff, h), (E, h, ff)), names):
        out.append(PlannedTensor(f"{b}.ffn_{kind}_exps.weight", shape, part(kind), i, srcs))
