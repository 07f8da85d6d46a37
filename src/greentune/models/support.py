"""Which model families greentune trains and exports, checked before a run touches anything.

`TRAINED` are the HF `model_type`s the family matrix (tests/families) trains end to end
(LoRA on attention + MLP or experts, fp32 and q4_k bases, ReLoRA). `NOT_YET` are families
users ask for that do not train yet, each with what is missing; `check_family` refuses
them in one line naming the supported ones, instead of a traceback mid-run. A family in
neither table is tried (it may well be llama-like) with a warning.

It also checks the recipe's `export:` entries against the GGUF and MLX writers' family
tables, so a run whose export would be refused fails before training, not after it.
"""

from __future__ import annotations

import logging

from greentune.errors import UserError

log = logging.getLogger(__name__)

TRAINED = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "granite",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "glm4_moe",
) + (
    # issue 17: the other softmax routers (tests/families rows of the same names)
    "granitemoe",
    "phimoe",
    "ernie4_5_moe",
    # issue 17: hybrid gated linear attention + MoE (LoRA on attention, delta-net projections, experts)
    "qwen3_next",
    "qwen3_5_moe_text",
)
TRAINED += ("gpt_oss",)  # issue 17: expert biases, clamped SwiGLU, sinks, MXFP4 experts

NOT_YET = {
    "granitemoehybrid": "its Mamba layers and fused experts are not in greentune's paths",
    "qwen3_5_moe": "it is the vision-language checkpoint; train its text model (model_type qwen3_5_moe_text)",
}


def _supported() -> str:
    return ", ".join(TRAINED)


def check_family(config: dict, exports=()) -> None:
    """UserError (one line) when `config`'s family cannot be trained, or an `exports` entry
    (objects with `.format`) cannot be written for it; a warning for an untested family."""
    mt = config.get("model_type")
    if mt in NOT_YET:
        raise UserError(
            f"greentune cannot train model type {mt!r} yet: {NOT_YET[mt]}; supported: {_supported()}"
        )
    if mt not in TRAINED:
        log.warning(
            "model type %r is not among the families greentune tests (%s); trying it as is", mt, _supported()
        )
    for item in exports:
        if item.format == "gguf":
            from greentune.export.gguf_families import family_of

            family_of(config)  # unsupported type or configuration: one line
        elif item.format == "mlx":
            from greentune.export.mlx import NOT_EXPORTED, SUPPORTED

            if mt in NOT_EXPORTED:
                raise UserError(f"MLX export of {mt}: {NOT_EXPORTED[mt]} (drop the mlx export: entry)")
            if mt not in SUPPORTED:
                raise UserError(
                    f"MLX export supports {sorted(SUPPORTED)}; this model is {mt!r} "
                    "(drop the mlx export: entry)"
                )
