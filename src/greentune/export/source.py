"""Where an export reads its weights: an HF model directory or an in-memory (model, tokenizer).

Every writer (GGUF, MLX, HF) asks a `ModelSource` for the config (a plain dict in HF's
spelling), the tokenizer and one tensor at a time, so a model directory is read lazily,
shard by shard, and peak memory is about one tensor.

Tensors come back as numpy arrays (float32) in HF's (out, in) orientation, or as
`Packed` GGUF block bytes when the caller supplied them precomputed ("train on what you
ship"). Rows of either kind can be selected, permuted and stacked the same way
(`take_rows`, `stack`), because a GGUF block never crosses a row.

Experts exist in three layouts and all are read:
- Mixtral on disk (`save_pretrained` in transformers v5 reverts to the hub names):
  `model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight` (gate, down, up);
- Qwen2-MoE / Qwen3-MoE / OLMoE / ERNIE-4.5 on disk:
  `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`;
- GraniteMoE on disk, fused: `model.layers.N.block_sparse_moe.input_linear.weight [E, 2I, H]` (gate rows
  first) and `output_linear.weight [E, H, I]`, router `block_sparse_moe.router.layer.weight`;
- in memory (transformers v5 fused parameters):
  `model.layers.N.mlp.experts.gate_up_proj [E, 2I, H]` (gate rows first, then up) and
  `model.layers.N.mlp.experts.down_proj [E, H, I]`, router `model.layers.N.mlp.gate.weight`.
`expert_weights(layer)` returns `(gate [E, I, H], up [E, I, H], down [E, H, I])` for either.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from greentune.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Packed:
    """Precomputed GGUF blocks of one tensor.

    `data` is uint8 of shape (*lead, rows, row_bytes); `ggml_type` a
    `gguf.GGMLQuantizationType`. A block never crosses a row, so row operations
    (select, permute, stack) act on `data` exactly as on the float tensor.
    """

    ggml_type: Any
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        from gguf.quants import quant_shape_from_byte_shape

        return tuple(quant_shape_from_byte_shape(self.data.shape, self.ggml_type))


Tensor = np.ndarray | Packed


def as_packed(ggml_type, data, shape: tuple[int, ...]) -> Packed:
    """Build a `Packed` from a type (enum, int or name like "q4_k") and raw block bytes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    if getattr(ggml_type, "ggml_type", None) is not None:  # a greentune.quant BlockFormat
        ggml_type = ggml_type.ggml_type
    if isinstance(ggml_type, str):
        try:
            ggml_type = GGMLQuantizationType[ggml_type.upper()]
        except KeyError:
            raise UserError(f"unknown GGML type {ggml_type!r} in prequantized tensors") from None
    ggml_type = GGMLQuantizationType(int(ggml_type))
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous().numpy()
    elif isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(bytes(data), dtype=np.uint8)
    data = np.asarray(data).view(np.uint8).reshape(-1)
    byte_shape = quant_shape_to_byte_shape(shape, ggml_type)
    if data.size != int(np.prod(byte_shape)):
        raise UserError(
            f"prequantized tensor of shape {tuple(shape)} as {ggml_type.name} needs "
            f"{int(np.prod(byte_shape))} bytes, got {data.size}"
        )
    return Packed(ggml_type, data.reshape(byte_shape))


def take_rows(t: Tensor, index) -> Tensor:
    """Rows `index` (a slice or integer array) of the second-to-last axis."""
    if isinstance(t, Packed):
        return Packed(t.ggml_type, np.ascontiguousarray(t.data[..., index, :]))
    return np.ascontiguousarray(t[..., index, :])


def stack(ts: list[Tensor]) -> Tensor:
    """Stack along a new leading axis (experts)."""
    if isinstance(ts[0], Packed):
        types = {p.ggml_type for p in ts}
        if len(types) != 1 or not all(isinstance(p, Packed) for p in ts):
            raise UserError("prequantized experts of one layer must all have the same GGML type")
        return Packed(ts[0].ggml_type, np.stack([p.data for p in ts]))
    if any(isinstance(p, Packed) for p in ts):
        raise UserError("some experts of a layer are prequantized and some are not")
    return np.stack(ts)


def shape_of(t: Tensor) -> tuple[int, ...]:
    return t.shape if isinstance(t, Packed) else tuple(t.shape)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


class ModelSource:
    """Config, tokenizer and lazily read tensors of one causal LM.

    Build with `ModelSource.from_dir(path)` or `ModelSource.from_model(model, tokenizer)`.
    `prequantized` maps HF tensor names to `(ggml_type, bytes)`; those tensors are
    returned as `Packed` instead of floats.
    """

    def __init__(
        self,
        config: dict,
        tokenizer,
        shapes: dict[str, tuple[int, ...]],
        getter,
        origin: str,
        prequantized: dict | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self._shapes = dict(shapes)
        self._names = set(shapes)
        self._get = getter
        self.origin = origin
        self._pre: dict[str, tuple] = _on_disk_names(dict(prequantized or {}), self._shapes)
        unknown = sorted(set(self._pre) - self._names)
        if unknown:
            raise UserError(f"prequantized tensor {unknown[0]!r} is not a tensor of {origin}")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str | Path, prequantized: dict | None = None) -> ModelSource:
        from safetensors import safe_open

        model_dir = Path(model_dir)
        cfg_path = model_dir / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"{model_dir} has no *.safetensors weights (greentune never reads pickles)")
        where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    where[k] = f
                    shapes[k] = tuple(h.get_slice(k).get_shape())

        def get(name: str) -> torch.Tensor:
            with safe_open(where[name], framework="pt") as h:
                return h.get_tensor(name)

        from greentune.models import mxfp4_checkpoint
        from greentune.quant.mxfp4 import float_view

        if mxfp4_checkpoint.is_mxfp4(config):  # a Hub gpt-oss folder: its experts read as floats
            shapes, get = float_view(shapes, get)
        tokenizer = _load_tokenizer(model_dir)
        return cls(config, tokenizer, shapes, get, str(model_dir), prequantized)

    @classmethod
    def from_model(cls, model, tokenizer, prequantized: dict | None = None) -> ModelSource:
        sd = model.state_dict()
        config = model.config.to_dict()
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        return cls(config, tokenizer, shapes, lambda n: sd[n], type(model).__name__, prequantized)

    # -- access -------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return sorted(self._names)

    def torch(self, name: str) -> torch.Tensor:
        """The tensor as stored (any dtype), for writers that copy it unchanged."""
        if name not in self._names:
            raise UserError(f"{self.origin} has no tensor {name!r}")
        return self._get(name)

    def get(self, name: str) -> Tensor:
        """Float32 numpy array, or `Packed` when the tensor was given prequantized."""
        if name in self._pre:
            gtype, data = self._pre[name]
            shape = tuple(self.torch_shape(name))
            return as_packed(gtype, data, shape)
        return _to_numpy(self.torch(name))

    def torch_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def prequantized_entry(self, name: str):
        """The `(ggml_type, bytes)` given for `name`, or None (for writers that know the bytes'
        own [E, out, in] layout differs from the float tensor's, e.g. gpt-oss's experts)."""
        return self._pre.get(name)

    # -- architecture helpers -----------------------------------------------------------
    def expert_weights(self, layer: int, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
        """(gate [E, I, H], up [E, I, H], down [E, H, I]) of one Mixtral-style layer."""
        p = f"model.layers.{layer}"
        for fused, down in _FUSED:
            if self.has(fused.format(p=p)):
                gu = self.get(fused.format(p=p))
                inter = shape_of(gu)[-2] // 2
                return (
                    take_rows(gu, slice(0, inter)),
                    take_rows(gu, slice(inter, 2 * inter)),
                    self.get(down.format(p=p)),
                )
        gate, up, down = self.expert_sources(layer, n_experts)
        return (
            stack([self.get(n) for n in gate]),
            stack([self.get(n) for n in up]),
            stack([self.get(n) for n in down]),
        )

    def has_experts(self, layer: int) -> bool:
        """Whether `layer` holds routed experts (ERNIE's first layers are dense)."""
        p = f"model.layers.{layer}."
        return any(
            n.startswith(p) and (".experts." in n or ".block_sparse_moe.input_linear." in n)
            for n in self._names
        )

    def expert_sources(self, layer: int, n_experts: int) -> tuple[tuple[str, ...], ...]:
        """HF names that `expert_weights(layer)` reads for (gate, up, down)."""
        p = f"model.layers.{layer}"
        for fused, down in _FUSED:
            if self.has(fused.format(p=p)):
                gu = (fused.format(p=p),)
                return gu, gu, (down.format(p=p),)
        for base, kinds in (
            (f"{p}.block_sparse_moe.experts", ("w1", "w3", "w2")),
            (f"{p}.mlp.experts", ("gate_proj", "up_proj", "down_proj")),
        ):
            if self.has(f"{base}.0.{kinds[0]}.weight"):
                return tuple(tuple(f"{base}.{e}.{w}.weight" for e in range(n_experts)) for w in kinds)
        raise UserError(
            f"{self.origin}: layer {layer} has neither fused experts ({p}.mlp.experts.gate_up_proj) "
            f"nor per-expert weights ({p}.mlp.experts.0.gate_proj.weight)"
        )

    def prequantized_type(self, names: tuple[str, ...]):
        """The GGML type shared by prequantized `names`, None if none is prequantized."""
        hits = [n for n in names if n in self._pre]
        if not hits:
            return None
        if len(hits) != len(names):
            raise UserError(
                f"{hits[0]!r} is prequantized but {sorted(set(names) - set(hits))[0]!r} is not; "
                "a stacked GGUF tensor needs all or none"
            )
        types = {as_packed(self._pre[n][0], self._pre[n][1], self.torch_shape(n)).ggml_type for n in hits}
        if len(types) != 1:
            raise UserError(f"prequantized tensors {hits[:2]} have different GGML types")
        return types.pop()

    def router_name(self, layer: int) -> str:
        for n in (
            f"model.layers.{layer}.block_sparse_moe.gate.weight",
            f"model.layers.{layer}.mlp.gate.weight",
            f"model.layers.{layer}.block_sparse_moe.router.layer.weight",  # GraniteMoE
            f"model.layers.{layer}.mlp.router.weight",  # PhiMoE in memory
        ):
            if self.has(n):
                return n
        raise UserError(f"{self.origin}: layer {layer} has no router (block_sparse_moe.gate / mlp.gate)")


# fused [E, 2I, H] gate|up and [E, H, I] down experts: transformers v5 in memory, GraniteMoE on disk
_FUSED = (
    ("{p}.mlp.experts.gate_up_proj", "{p}.mlp.experts.down_proj"),
    ("{p}.block_sparse_moe.experts.gate_up_proj", "{p}.block_sparse_moe.experts.down_proj"),
    ("{p}.block_sparse_moe.input_linear.weight", "{p}.block_sparse_moe.output_linear.weight"),
)


_FUSED_IN_MEMORY = re.compile(
    r"^(?P<p>.+\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<w>gate_up_proj|down_proj)$"
)
# per-expert names on disk of (gate, up, down), as `expert_sources` reads them
_PER_EXPERT = (
    ("{p}.block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
    ("{p}.mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
)


def _on_disk_names(pre: dict[str, tuple], shapes: dict[str, tuple]) -> dict[str, tuple]:
    """`pre` with in-memory fused expert names (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj``)
    split into the per-expert names a folder written by `save_pretrained` holds instead (gate rows
    first, then up; a block never crosses a row), so block bytes kept from training match a model
    folder without loading the model. Names the folder has, or that are not fused experts, stay."""
    out = {}
    for name, (gtype, data) in pre.items():
        m = _FUSED_IN_MEMORY.match(name)
        if name in shapes or m is None:
            out[name] = (gtype, data)
            continue
        fused = next(  # the same fused tensor under its on-disk name (GraniteMoE's input/output_linear)
            (
                pair[m["w"] == "down_proj"].format(p=m["p"])
                for pair in _FUSED
                if pair[0].format(p=m["p"]) in shapes
            ),
            None,
        )
        if fused is not None:
            out[fused] = (gtype, data)
            continue
        for base, kinds in _PER_EXPERT:
            first = base.format(p=m["p"], e=0) + kinds[0] + ".weight"
            if first in shapes:
                break
        else:
            out[name] = (gtype, data)  # reported as unknown below
            continue
        data = data.detach().cpu() if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))
        n_exp = data.shape[0]
        per = data.reshape(n_exp, -1)
        for e in range(n_exp):
            prefix = base.format(p=m["p"], e=e)
            if m["w"] == "down_proj":
                out[prefix + kinds[2] + ".weight"] = (gtype, per[e])
                continue
            rows = shapes[prefix + kinds[0] + ".weight"][0] * 2
            halves = per[e].reshape(rows, -1)
            out[prefix + kinds[0] + ".weight"] = (gtype, halves[: rows // 2])
            out[prefix + kinds[1] + ".weight"] = (gtype, halves[rows // 2 :])
    return out


def _load_tokenizer(model_dir: Path):
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        raise UserError(f"{model_dir} has no tokenizer (tokenizer.json); save the tokenizer beside the model")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def rope_settings(config: dict) -> tuple[float, dict]:
    """(rope θ, scaling dict or {}) from a v5 `rope_parameters` or an older `rope_theta`/`rope_scaling`."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = dict(config.get("rope_scaling") or {})
    if params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    return float(theta), scaling
