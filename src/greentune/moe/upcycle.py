"""Sparse upcycling: a dense Llama/Mistral checkpoint becomes a Mixtral checkpoint.

Komatsuzaki et al. 2022 (arXiv 2212.05055): every expert starts as a copy of the dense MLP,
all other weights are carried over, only the router is new.

Why the output equals the dense model's at initialisation, whatever the router: Mixtral's
router renormalises its top-k probabilities (`MixtralTopKRouter`: softmax → top-k →
divide by their sum), so the k weights of a token sum to 1, and with identical experts

    y = Σ_{i ∈ topk} w_i · MLP(x) = MLP(x).

The router is therefore drawn N(0, initializer_range²) (seeded) rather than zeroed, so that
tokens spread over the experts from the first step and different experts receive different
gradients; with a zero router every tie resolves to the same k experts and the others would
never train. `router_init="zeros"` is kept for experiments.

Mapping (HF names): ``mlp.gate_proj``/``mlp.up_proj`` [I, H] → ``mlp.experts.gate_up_proj[e]``
= cat(gate, up) [2I, H]; ``mlp.down_proj`` [H, I] → ``mlp.experts.down_proj[e]``; new
``mlp.gate.weight`` [E, H]. transformers' `save_pretrained` writes the hub's per-expert names
(``block_sparse_moe.experts.e.w1/w2/w3``), so the result loads anywhere Mixtral does.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from greentune.errors import UserError
from greentune.fsutil import atomic_dir
from greentune.ownership import check_replaceable, mark
from greentune.recipe import MAX_EXPERTS

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral")
OUTPUT_KIND = "upcycled-model"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def mixtral_config(dense_config, experts: int, top_k: int):
    """A `MixtralConfig` with the dense model's shapes, `experts` local experts and top-`top_k` routing."""
    from transformers import MixtralConfig

    c = dense_config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise UserError("cannot upcycle: the dense model has attention or MLP biases, which Mixtral lacks")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
        sliding_window=getattr(c, "sliding_window", None),
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        rope_parameters=dict(c.rope_parameters),
        num_local_experts=experts,
        num_experts_per_tok=top_k,
    )


def upcycled_state_dict(
    dense_sd: dict[str, torch.Tensor],
    num_layers: int,
    experts: int,
    router_init: str = "normal",
    std: float = 0.02,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Map a dense Llama/Mistral state dict to Mixtral (transformers-v5 fused) names."""
    sd = {k: v for k, v in dense_sd.items() if ".mlp." not in k}
    for i in range(num_layers):
        p = f"model.layers.{i}.mlp."
        try:
            gate, up, down = (dense_sd[p + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
        except KeyError as err:
            raise UserError(f"cannot upcycle: dense checkpoint has no {err.args[0]}") from None
        gate_up = torch.cat([gate, up], dim=0)  # [2I, H]
        sd[p + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)  # [E, 2I, H]
        sd[p + "experts.down_proj"] = down.unsqueeze(0).repeat(experts, 1, 1)  # [E, H, I]
        router = torch.zeros(experts, gate.shape[1], dtype=gate.dtype)
        if router_init == "normal":
            router.normal_(0.0, std, generator=generator)
        elif router_init != "zeros":
            raise ValueError(f"router_init must be 'normal' or 'zeros', got {router_init!r}")
        sd[p + "gate.weight"] = router
    return sd


def check_memory_for(config, experts: int, dtype: torch.dtype) -> None:
    """Refuse before allocating when the expert copies cannot fit in this machine's free memory."""
    import psutil

    mlp = 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers
    need = (experts + 1) * mlp * torch.empty(0, dtype=dtype).element_size()  # + the dense copy
    free = psutil.virtual_memory().available
    if need > free:
        raise UserError(
            f"upcycling to {experts} experts needs about {need / 1e9:.1f} GB for the expert weights, "
            f"this machine has {free / 1e9:.1f} GB free; use fewer --experts"
        )


def upcycle(
    model_dir: str | Path,
    out_dir: str | Path,
    experts: int = 8,
    top_k: int = 2,
    router_init: str = "normal",
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write a Mixtral-architecture copy of the dense checkpoint at `model_dir` to `out_dir`.

    Each of the `experts` experts is the dense MLP; the router ([E, H] per layer) is new (see
    module docstring); every other tensor and the tokenizer files are carried over. Weights keep
    the checkpoint's dtype and are written as safetensors, atomically. Returns `out_dir`.
    An existing `out_dir` is replaced only if greentune wrote it (or it is empty, or `force`);
    a folder that contains `model_dir` never is.
    Raises UserError for a non-Llama/Mistral model, bad expert counts or an `out_dir` that is not ours.
    """
    from transformers import MixtralForCausalLM

    from greentune.models.loader import check_model_dir, load_config, load_model

    if not 2 <= experts <= MAX_EXPERTS:
        raise UserError(f"upcycle needs at least 2 and at most {MAX_EXPERTS} experts, got {experts}")
    if not 1 <= top_k <= experts:
        raise UserError(f"upcycle top_k must be between 1 and the number of experts ({experts}), got {top_k}")
    model_dir, out_dir = check_model_dir(model_dir), Path(out_dir)
    config = load_config(model_dir)
    if config.model_type not in SUPPORTED:
        raise UserError(
            f"cannot upcycle a {config.model_type!r} model: only dense {' / '.join(SUPPORTED)} "
            "checkpoints (MLP gate/up/down, no biases) map onto Mixtral"
        )
    if out_dir.resolve() == model_dir.resolve():
        raise UserError(f"upcycle output folder must differ from the input ({out_dir})")
    check_replaceable(out_dir, OUTPUT_KIND, force=force, protect=(model_dir,))
    moe_config = mixtral_config(config, experts, top_k)
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    check_memory_for(config, experts, dtype)
    dense = load_model(model_dir, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    sd = upcycled_state_dict(
        dense.state_dict(),
        config.num_hidden_layers,
        experts,
        router_init,
        std=config.initializer_range,
        generator=gen,
    )
    del dense
    with torch.device("meta"):
        moe = MixtralForCausalLM(moe_config)
    missing, unexpected = moe.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            f"cannot upcycle: weights do not map onto Mixtral (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.to(dtype)
    with atomic_dir(out_dir) as tmp:
        moe.save_pretrained(tmp, safe_serialization=True)
        mark(tmp, OUTPUT_KIND)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
    n_params = sum(t.numel() for t in sd.values())
    log.info(
        "upcycled %s -> %s: %d experts top-%d, %.1f M parameters",
        model_dir,
        out_dir,
        experts,
        top_k,
        n_params / 1e6,
    )
    return out_dir
