"""Architecture facts of a decoder-only causal LM, from its config alone (no weights).

`arch_facts(config)` accepts a `transformers.PretrainedConfig`, a path to a `config.json`
(or to the directory holding it), or a plain dict, and returns an `ArchFacts`:

* **total_params** — every distinct parameter, tied embeddings counted once; equals
  `sum(p.numel() for p in model.parameters())` of the model transformers builds from the
  config (checked in tests for llama, mistral, mixtral, qwen2, qwen3, qwen2_moe, qwen3_moe,
  olmoe, deepseek_v3). Multi-token-prediction heads that transformers does not build
  (DeepSeek-V3's `num_nextn_predict_layers`) are not counted.
* **active_params** — parameters a token touches: total minus the `(E - k)` routed experts
  it skips in each MoE layer. Embeddings are included (the convention behind "Mixtral 8x7B:
  46.7 B total, 12.9 B active").
* **active_matmul_params** `N_mm` — weights a token multiplies: attention and MLP matrices,
  the `top_k` routed experts, shared experts, router, and the LM head `V·H` (also when tied
  to the input embedding, whose lookup is not a matmul). Norm weights and biases excluded.
* **forward FLOPs per token** at a training context of `T` tokens::

      F_fwd(T) = 2·N_mm + Σ_layers 2·n_heads·(d_qk + d_v)·A_l(T)

  where the first term is one multiply-add (2 FLOPs) per weight, and the second is the
  score `Q·Kᵀ` (2·n_heads·d_qk per attended key) plus the value mix `P·V` (2·n_heads·d_v).
  `A_l(T)` is the mean number of keys a query attends to: `(T + 1) / 2` for causal
  attention over a packed sequence of length T (`Σ_{i=1..T} i / T`), `min(i, W)` averaged
  for a sliding window W, and `T` with `causal=False` (kernels that compute the full
  square and mask it). Softmax, norms, activations and the router's softmax are O(H) per
  token and ignored.

Families are described by a small registry (`FAMILIES`) of where biases, q/k norms,
extra norms and experts sit; a config whose `model_type` is not there but whose
`architectures` name a `...ForCausalLM` is read as llama-like with a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from greentune.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearGroup:
    """Identical weight matrices across the model: `count` of shape (d_out, d_in).

    kind: "attn" | "mlp" (dense MLP and shared experts) | "experts" (routed) | "router" | "head".
    `active` is how many of the `count` matrices one token multiplies.
    """

    name: str
    kind: str
    d_in: int
    d_out: int
    count: int
    active: int

    @property
    def params(self) -> int:
        return self.d_in * self.d_out * self.count

    @property
    def active_params(self) -> int:
        return self.d_in * self.d_out * self.active


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its biases, norms and experts.

    A bias entry is a config key to read (False when absent) or a constant bool.
    qk_norm: "none" | "head" (RMSNorm over head_dim, q and k) | "full" (over heads·head_dim
    and kv_heads·head_dim, OLMo-style). moe: "none" | "mixtral" (routed experts only) |
    "qwen" (decoder_sparse_step, mlp_only_layers, optional shared expert + its gate) |
    "deepseek" (first_k_dense_replace, moe_layer_freq, n_shared_experts) | "ernie"
    (moe_layer_interval / start / end index, moe_num_shared_experts, a correction bias per expert).
    norm_bias: LayerNorms with a bias (phimoe); head_bias: the LM head's bias (config key).
    attention: "gqa" (q/k/v/o) | "mla" (DeepSeek multi-head latent attention) | "hybrid"
    (Qwen3-Next / Qwen3.5: `layer_types` full_attention layers with a gated q_proj of 2·heads·head_dim
    rows, the others gated delta-net linear attention; see `_linear_attention`).
    """

    qkv_bias: str | bool = "attention_bias"
    o_bias: str | bool = "attention_bias"
    mlp_bias: str | bool = "mlp_bias"
    qk_norm: str = "none"
    norms_per_layer: int = 2
    moe: str = "none"
    attention: str = "gqa"
    tied_default: bool = False
    norm_bias: bool = False
    head_bias: str | bool = False
    defaults: dict = field(default_factory=dict)  # transformers' class defaults that matter here
    expert_bias: bool = False  # gpt-oss: a bias on every expert's gate_up and down, and on the router
    sinks: bool = False  # gpt-oss: one attention-sink logit per head and layer
    qk_norm_flag: str | None = None  # config key that switches qk_norm on (GLM-4.5's use_qk_norm)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(qkv_bias=False, o_bias=False, mlp_bias=False),
    "mixtral": Family(
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        moe="mixtral",
        defaults={"num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "qwen2": Family(qkv_bias=True, o_bias=False, mlp_bias=False, defaults={"use_sliding_window": False}),
    "qwen3": Family(mlp_bias=False, qk_norm="head", defaults={"use_sliding_window": False}),
    "qwen2_moe": Family(
        qkv_bias="qkv_bias",
        o_bias=False,
        mlp_bias=False,
        moe="qwen",
        defaults={"qkv_bias": True, "use_sliding_window": False},
    ),
    "qwen3_moe": Family(mlp_bias=False, qk_norm="head", moe="qwen", defaults={"use_sliding_window": False}),
    "olmoe": Family(mlp_bias=False, qk_norm="full", moe="mixtral"),
    "olmo2": Family(mlp_bias=False, qk_norm="full"),
    "granite": Family(),
    "phi3": Family(qkv_bias=False, o_bias=False, mlp_bias=False),
    "gemma": Family(mlp_bias=False, tied_default=True),
    "gemma2": Family(mlp_bias=False, norms_per_layer=4, tied_default=True),
    "gemma3_text": Family(mlp_bias=False, norms_per_layer=4, qk_norm="head", tied_default=True),
    "deepseek": Family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False, moe="deepseek"),
    "deepseek_v2": Family(mlp_bias="mlp_bias", moe="deepseek", attention="mla"),
    "deepseek_v3": Family(mlp_bias=False, moe="deepseek", attention="mla"),
    "gpt_oss": Family(
        mlp_bias=False, moe="mixtral", expert_bias=True, sinks=True, defaults={"attention_bias": True}
    ),
    "glm4_moe": Family(
        o_bias=False, mlp_bias=False, qk_norm="head", qk_norm_flag="use_qk_norm", moe="deepseek"
    ),
    # issue 17: granite's MoE, Phi-3.5-MoE, ERNIE-4.5 MoE
    "granitemoe": Family(mlp_bias=False, moe="mixtral"),
    "phimoe": Family(
        mlp_bias=False,
        moe="mixtral",
        norm_bias=True,
        head_bias="lm_head_bias",
        defaults={"num_local_experts": 16, "num_experts_per_tok": 2},
    ),
    "qwen3_next": Family(
        mlp_bias=False, qk_norm="head", moe="qwen", attention="hybrid", defaults={"use_sliding_window": False}
    ),
    "qwen3_5_moe_text": Family(
        mlp_bias=False, qk_norm="head", moe="qwen", attention="hybrid", defaults={"use_sliding_window": False}
    ),
    "ernie4_5_moe": Family(
        qkv_bias="use_bias",
        o_bias="use_bias",
        mlp_bias="use_bias",
        moe="ernie",
        tied_default=True,
        defaults={"moe_layer_start_index": 1, "moe_num_shared_experts": 2, "moe_layer_interval": 1},
    ),
}

NOT_CAUSAL = "is not a decoder-only causal LM"


@dataclass(frozen=True)
class ArchFacts:
    """Sizes and parameter counts of a decoder-only LM (counts are numbers of scalars)."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int  # d_qk per head (MLA: qk_nope + qk_rope)
    v_head_dim: int  # d_v per head (= head_dim except MLA)
    intermediate: int  # dense MLP width
    vocab: int
    tied_embeddings: bool
    total_params: int
    active_params: int
    embedding_params: int  # V·H, twice when the LM head is untied
    active_matmul_params: int  # N_mm of the module docstring
    experts: int = 0  # routed experts per MoE layer (0: dense)
    top_k: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0  # summed width of always-on shared experts
    moe_layers: int = 0
    sliding_window: int | None = None
    sliding_layers: int = 0
    linear_layers: int = 0  # linear-attention layers (hybrids): no attention over past keys
    max_position_embeddings: int | None = None
    attention: str = "gqa"  # "gqa" | "mla" (keys/values expanded per head from a latent)
    linears: tuple[LinearGroup, ...] = field(default=(), repr=False)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0 and self.moe_layers > 0

    @property
    def expert_params(self) -> int:
        """All routed-expert weights, over all MoE layers."""
        return sum(g.params for g in self.linears if g.kind == "experts")

    def mean_attended(self, context: int, causal: bool = True, window: int | None = None) -> float:
        """Mean keys per query A(T) for a sequence of `context` tokens (see module docstring)."""
        t = int(context)
        if t <= 0:
            raise UserError(f"context length must be positive, got {context}")
        if not causal:
            return float(min(t, window) if window else t)
        if window is None or window >= t:
            return (t + 1) / 2
        w = int(window)
        # Σ_{i=1..T} min(i, W) = W(W+1)/2 + (T-W)·W
        return (w * (w + 1) / 2 + (t - w) * w) / t

    def attention_flops_per_token(self, context: int, causal: bool = True) -> float:
        """Σ_layers 2·n_heads·(d_qk + d_v)·A_l(T): score and value FLOPs of one token's forward."""
        per_key = 2 * self.heads * (self.head_dim + self.v_head_dim)
        full = self.layers - self.sliding_layers - self.linear_layers
        total = full * per_key * self.mean_attended(context, causal)
        if self.sliding_layers:
            total += self.sliding_layers * per_key * self.mean_attended(context, causal, self.sliding_window)
        return float(total)

    def forward_flops_per_token(self, context: int, causal: bool = True) -> float:
        """F_fwd(T) = 2·N_mm + attention FLOPs (module docstring); FLOPs per token."""
        return 2.0 * self.active_matmul_params + self.attention_flops_per_token(context, causal)

    def upcycled(self, experts: int, top_k: int) -> ArchFacts:
        """Facts after sparse upcycling: each dense MLP becomes `experts` copies, top-`top_k` routed.

        Per dense layer the MLP's 3 matrices become E expert copies (E·3·H·I weights, k·3·H·I
        active) plus a new router (E·H). Existing MoE layers and shared experts are unchanged.
        """
        if self.is_moe:
            raise UserError(
                f"{self.model_type} is already a mixture of experts; upcycling takes a dense base"
            )
        if not 1 <= top_k <= experts or experts < 2:
            raise UserError(f"upcycle needs experts >= 2 and 1 <= top_k <= experts, got {experts}, {top_k}")
        dense = [g for g in self.linears if g.kind == "mlp"]
        n = dense[0].count if dense else 0
        groups = [g for g in self.linears if g.kind != "mlp"]
        groups += [
            LinearGroup(f"experts.{g.name}", "experts", g.d_in, g.d_out, g.count * experts, g.count * top_k)
            for g in dense
        ]
        groups.append(LinearGroup("router", "router", self.hidden, experts, n, n))
        mlp = sum(g.params for g in dense)
        router = self.hidden * experts * n
        return replace(
            self,
            total_params=self.total_params + (experts - 1) * mlp + router,
            active_params=self.active_params + (top_k - 1) * mlp + router,
            active_matmul_params=self.active_matmul_params + (top_k - 1) * mlp + router,
            experts=experts,
            top_k=top_k,
            moe_intermediate=self.intermediate,
            moe_layers=n,
            linears=tuple(groups),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("linears")
        d["is_moe"] = self.is_moe
        return d


# ---------------------------------------------------------------- reading configs


class _Cfg:
    """Uniform `get` over a PretrainedConfig (attribute aliases resolved) or a dict."""

    def __init__(self, obj: Any):
        self.obj = obj
        self.defaults: dict = {}  # the family's class defaults, for keys a config.json omits

    def get(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if isinstance(self.obj, dict):
                v = self.obj.get(k)
            else:
                v = getattr(self.obj, k, None)
            if v is not None:
                return v
        for k in keys:
            if self.defaults.get(k) is not None:
                return self.defaults[k]
        return default


def load_config_dict(source: str | Path | dict) -> dict:
    """Read a config.json (file or directory) into a dict; a dict is returned as is."""
    if isinstance(source, dict):
        return source
    p = Path(source).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"no model config at {p} (expected a config.json or a directory holding one)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON: {e}") from None


def _as_cfg(config: Any) -> tuple[_Cfg, str]:
    if isinstance(config, (str, Path)):
        config = load_config_dict(config)
    if isinstance(config, dict):
        d = dict(config)
        model_type = d.get("model_type")
        if model_type and d.get("text_config") and model_type not in FAMILIES:
            raise UserError(
                f"config model_type {model_type!r} is multimodal; plan its text model's config instead"
            )
        return _Cfg(d), model_type or ""
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UserError(
            f"expected a config (PretrainedConfig, config.json path or dict), got {type(config).__name__}"
        )
    return _Cfg(config), model_type


def _family(cfg: _Cfg, model_type: str) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    archs = cfg.get("architectures", default=[]) or []
    if cfg.get("is_encoder_decoder", default=False):
        raise UserError(f"config model_type {model_type!r} is an encoder-decoder model and {NOT_CAUSAL}")
    causal = any(str(a).endswith("ForCausalLM") for a in archs)
    llama_like = all(
        cfg.get(k) is not None
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        )
    )
    if causal and llama_like and not cfg.get("num_experts", "num_local_experts", "n_routed_experts"):
        log.warning(
            "model_type %r is not in greentune's registry; counting it as a llama-like decoder", model_type
        )
        return FAMILIES["llama"]
    what = f"config model_type {model_type or '(none)'!r}" + (
        f" ({', '.join(map(str, archs))})" if archs else ""
    )
    raise UserError(f"{what} {NOT_CAUSAL} that greentune knows; known: {', '.join(sorted(FAMILIES))}")


def _flag(cfg: _Cfg, spec: str | bool) -> bool:
    return spec if isinstance(spec, bool) else bool(cfg.get(spec, default=False))


def _int(cfg: _Cfg, *keys: str, default: int | None = None) -> int:
    v = cfg.get(*keys, default=default)
    if v is None:
        raise UserError(f"model config lacks {keys[0]!r}")
    return int(v)


# ---------------------------------------------------------------- counting


def _moe_layer_ids(cfg: _Cfg, fam: Family, layers: int, experts: int) -> list[int]:
    if fam.moe == "none" or experts <= 0:
        return []
    if fam.moe == "mixtral":
        return list(range(layers))
    if fam.moe == "qwen":
        step = int(cfg.get("decoder_sparse_step", default=1) or 1)
        only = set(cfg.get("mlp_only_layers", default=[]) or [])
        return [i for i in range(layers) if i not in only and (i + 1) % step == 0]
    if fam.moe == "ernie":
        start = cfg.get("moe_layer_start_index", default=0)
        end = cfg.get("moe_layer_end_index", default=layers - 1)
        start = min(start) if isinstance(start, (list, tuple)) else int(start)
        end = max(end) if isinstance(end, (list, tuple)) else int(end)
        every = int(cfg.get("moe_layer_interval", default=1) or 1)
        return [i for i in range(layers) if (i + 1) % every == 0 and start <= i <= end]
    first = int(cfg.get("first_k_dense_replace", default=0) or 0)
    freq = int(cfg.get("moe_layer_freq", default=1) or 1)
    return [i for i in range(layers) if i >= first and i % freq == 0]


def _attention(cfg: _Cfg, fam: Family, h: int, heads: int, kv: int, hd: int) -> tuple[list, int, int, int]:
    """Per-layer attention linears, per-layer bias+norm scalars, d_qk, d_v."""
    qkv_b, o_b = _flag(cfg, fam.qkv_bias), _flag(cfg, fam.o_bias)
    if fam.attention == "mla":
        nope, rope = _int(cfg, "qk_nope_head_dim"), _int(cfg, "qk_rope_head_dim")
        dv, kvr = _int(cfg, "v_head_dim"), _int(cfg, "kv_lora_rank")
        qr = cfg.get("q_lora_rank")
        dqk = nope + rope
        lin, extra = [], 0
        if qr is None:
            lin.append(("q_proj", h, heads * dqk))
        else:
            lin += [("q_a_proj", h, qr), ("q_b_proj", qr, heads * dqk)]
            extra += qr + (qr if qkv_b else 0)  # q_a_layernorm (+ q_a bias)
        lin += [
            ("kv_a_proj_with_mqa", h, kvr + rope),
            ("kv_b_proj", kvr, heads * (nope + dv)),
            ("o_proj", heads * dv, h),
        ]
        extra += kvr + ((kvr + rope) if qkv_b else 0) + (h if o_b else 0)
        return lin, extra, dqk, dv
    lin = [
        ("q_proj", h, heads * hd),
        ("k_proj", h, kv * hd),
        ("v_proj", h, kv * hd),
        ("o_proj", heads * hd, h),
    ]
    extra = ((heads + 2 * kv) * hd if qkv_b else 0) + (h if o_b else 0)
    qk_norm = fam.qk_norm if fam.qk_norm_flag is None or cfg.get(fam.qk_norm_flag, default=False) else "none"
    extra += {"none": 0, "head": 2 * hd, "full": (heads + kv) * hd}[qk_norm]
    return lin, extra, hd, hd


def _linear_attention(cfg: _Cfg, model_type: str, h: int) -> tuple[list, int]:
    """Per-layer linears and other scalars of one gated delta-net layer (Qwen3-Next: fused
    in_proj_qkvz / in_proj_ba; Qwen3.5: in_proj_qkv, _z, _b, _a), plus conv1d over q·k·v
    channels, A_log, dt_bias (one per value head) and the gated norm (value head dim)."""
    nk, nv = _int(cfg, "linear_num_key_heads"), _int(cfg, "linear_num_value_heads")
    dk, dv = _int(cfg, "linear_key_head_dim"), _int(cfg, "linear_value_head_dim")
    kd, vd = nk * dk, nv * dv
    if model_type == "qwen3_next":
        lin = [("in_proj_qkvz", h, 2 * kd + 2 * vd), ("in_proj_ba", h, 2 * nv)]
    else:
        lin = [
            ("in_proj_qkv", h, 2 * kd + vd),
            ("in_proj_z", h, vd),
            ("in_proj_b", h, nv),
            ("in_proj_a", h, nv),
        ]
    lin.append(("out_proj", vd, h))
    kernel = _int(cfg, "linear_conv_kernel_dim", default=4)
    return lin, (2 * kd + vd) * kernel + 2 * nv + dv


def arch_facts(config: Any) -> ArchFacts:
    """Architecture facts of a causal LM config (PretrainedConfig | config.json path/dir | dict).

    Raises UserError for a config that is not a decoder-only causal LM of a known layout.
    """
    cfg, model_type = _as_cfg(config)
    fam = _family(cfg, model_type)
    cfg.defaults = fam.defaults
    h, layers = _int(cfg, "hidden_size"), _int(cfg, "num_hidden_layers")
    heads = _int(cfg, "num_attention_heads")
    kv = _int(cfg, "num_key_value_heads", default=heads)
    hd = int(cfg.get("head_dim") or h // heads)
    vocab = _int(cfg, "vocab_size")
    inter = int(cfg.get("intermediate_size", default=0) or 0)  # Qwen3.5-MoE, all layers routed, has none
    tied = bool(cfg.get("tie_word_embeddings", default=fam.tied_default))

    experts = int(
        cfg.get("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", default=0) or 0
    )
    top_k = int(cfg.get("num_experts_per_tok", "moe_k", default=0) or 0) if experts else 0
    moe_ids = _moe_layer_ids(cfg, fam, layers, experts)
    n_moe, n_dense = len(moe_ids), layers - len(moe_ids)
    moe_inter = int(cfg.get("moe_intermediate_size", default=inter) or 0) if n_moe else 0
    if (n_dense and not inter) or (n_moe and not moe_inter):
        raise UserError("model config lacks 'intermediate_size'")
    if n_moe and not 0 < top_k <= experts:
        raise UserError(f"config has {experts} experts but num_experts_per_tok={top_k}")
    shared, shared_gate = 0, False
    if n_moe and fam.moe == "qwen":
        shared = int(cfg.get("shared_expert_intermediate_size", default=0) or 0)
        shared_gate = shared > 0
    elif n_moe and fam.moe == "deepseek":
        shared = moe_inter * int(cfg.get("n_shared_experts", default=0) or 0)
    elif n_moe and fam.moe == "ernie":
        shared = moe_inter * int(cfg.get("moe_num_shared_experts", default=0) or 0)

    attn, attn_extra, dqk, dv = _attention(cfg, fam, h, heads, kv, hd)
    mlp_b = _flag(cfg, fam.mlp_bias)
    n_lin, lin_extra = 0, 0
    n_attn = layers
    if fam.attention == "hybrid":
        types = list(cfg.get("layer_types", default=None) or [])
        if not types:  # transformers' default: every full_attention_interval-th layer is full attention
            every = int(cfg.get("full_attention_interval", default=4) or 4)
            types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
        n_attn = sum(1 for t in types if t == "full_attention")
        n_lin = layers - n_attn
        attn = [(n, i, 2 * o if n == "q_proj" else o) for n, i, o in attn]  # the gated q_proj
    groups: list[LinearGroup] = [LinearGroup(n, "attn", i, o, n_attn, n_attn) for n, i, o in attn]
    if n_lin:
        lin, lin_extra = _linear_attention(cfg, model_type, h)
        groups += [LinearGroup(n, "attn", i, o, n_lin, n_lin) for n, i, o in lin]
    for name, (i, o) in {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}.items():
        if n_dense:
            groups.append(LinearGroup(name, "mlp", i, o, n_dense, n_dense))
    if n_moe:
        for name, (i, o) in {
            "gate_proj": (h, moe_inter),
            "up_proj": (h, moe_inter),
            "down_proj": (moe_inter, h),
        }.items():
            groups.append(LinearGroup(f"experts.{name}", "experts", i, o, n_moe * experts, n_moe * top_k))
        groups.append(LinearGroup("router", "router", h, experts, n_moe, n_moe))
        if shared:
            for name, (i, o) in {
                "gate_proj": (h, shared),
                "up_proj": (h, shared),
                "down_proj": (shared, h),
            }.items():
                groups.append(LinearGroup(f"shared_expert.{name}", "mlp", i, o, n_moe, n_moe))
        if shared_gate:
            groups.append(LinearGroup("shared_expert_gate", "router", h, 1, n_moe, n_moe))
    groups.append(LinearGroup("lm_head", "head", h, vocab, 1, 1))

    mlp_bias_per_dense = (2 * inter + h) if mlp_b else 0
    shared_bias = (2 * shared + h) if (mlp_b and fam.moe in ("deepseek", "ernie") and shared) else 0
    norm_scalars = (layers * fam.norms_per_layer + 1) * h
    extra = (norm_scalars if fam.norm_bias else 0) + (vocab if _flag(cfg, fam.head_bias) else 0)
    extra += n_moe * experts if fam.moe == "ernie" else 0  # moe_statics.e_score_correction_bias
    scalars = (
        n_attn * attn_extra
        + n_lin * lin_extra
        + layers * fam.norms_per_layer * h
        + n_dense * mlp_bias_per_dense
        + n_moe * shared_bias
        + h
        + extra
    )
    if fam.expert_bias:  # per MoE layer: E·(2I + H) expert biases and the router's E
        scalars += n_moe * experts * (2 * moe_inter + h + 1)
    if fam.sinks:
        scalars += layers * heads
    embed = vocab * h
    weights = sum(g.params for g in groups)
    total = weights + scalars + (0 if tied else embed)  # tied: lm_head's V·H is the embedding
    skipped = sum(g.params - g.active_params for g in groups)
    active = total - skipped
    active_mm = sum(g.active_params for g in groups)

    sliding_window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types", default=None) or []
    use_sw = cfg.get("use_sliding_window", default=True)
    if sliding_window and use_sw:
        n_sw = sum(1 for t in layer_types if t == "sliding_attention") if layer_types else layers
    else:
        sliding_window, n_sw = None, 0

    return ArchFacts(
        model_type=model_type or "llama-like",
        layers=layers,
        hidden=h,
        heads=heads,
        kv_heads=kv,
        head_dim=dqk,
        v_head_dim=dv,
        intermediate=inter,
        vocab=vocab,
        tied_embeddings=tied,
        total_params=int(total),
        active_params=int(active),
        embedding_params=embed * (1 if tied else 2),
        active_matmul_params=int(active_mm),
        experts=experts if n_moe else 0,
        top_k=top_k if n_moe else 0,
        moe_intermediate=moe_inter,
        shared_intermediate=shared,
        moe_layers=n_moe,
        sliding_window=int(sliding_window) if sliding_window else None,
        sliding_layers=n_sw,
        linear_layers=n_lin,
        max_position_embeddings=cfg.get("max_position_embeddings"),
        attention=fam.attention,
        linears=tuple(groups),
    )
