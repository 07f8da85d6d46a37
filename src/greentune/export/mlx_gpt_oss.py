"""gpt-oss tensors under mlx-lm's names (`mlx_lm.models.gpt_oss`, already "sanitized").

mlx-lm's gpt-oss reads the experts split, in [E, out, in]: ``mlp.experts.{gate,up}_proj.weight``
[E, I, H] (the even / odd rows of HF's interleaved ``gate_up_proj`` transposed), their
``.bias`` [E, I], ``mlp.experts.down_proj.weight`` [E, H, I] and ``.bias``; the router
``mlp.router.{weight,bias}`` and the attention sinks ``self_attn.sinks`` keep HF's names.
"""

from __future__ import annotations

import numpy as np

from greentune.export.source import ModelSource


def tensors(src: ModelSource, to_float) -> list[tuple[str, callable]]:
    """(MLX name, loader of float32 numpy) for every weight of a gpt-oss model."""
    out = []
    experts = set()
    for i in range(src.config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        gu, dn = f"{p}.gate_up_proj", f"{p}.down_proj"
        experts |= {gu, dn, f"{gu}_bias", f"{dn}_bias"}
        for half, kind in ((0, "gate_proj"), (1, "up_proj")):
            out.append(
                (
                    f"{p}.{kind}.weight",
                    lambda gu=gu, h=half: np.ascontiguousarray(
                        to_float(src.get(gu)).transpose(0, 2, 1)[:, h::2]
                    ),
                )
            )
            out.append(
                (
                    f"{p}.{kind}.bias",
                    lambda gu=gu, h=half: np.ascontiguousarray(src.get(f"{gu}_bias")[:, h::2]),
                )
            )
        out.append(
            (
                f"{p}.down_proj.weight",
                lambda dn=dn: np.ascontiguousarray(to_float(src.get(dn)).transpose(0, 2, 1)),
            )
        )
        out.append((f"{p}.down_proj.bias", lambda dn=dn: src.get(f"{dn}_bias")))
    for name in src.names():
        if name in experts or "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and src.config.get("tie_word_embeddings"):
            continue
        out.append((name, lambda n=name: to_float(src.get(n))))
    return sorted(out, key=lambda x: x[0])
