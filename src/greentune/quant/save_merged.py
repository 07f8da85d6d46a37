"""Write a quantised-base model as a float HF checkpoint one decoder layer at a time.

`dequantize_model_` followed by `save_pretrained` holds the whole float model: 4 bytes a weight,
~59 GB for a 14.8 B model trained on a 8.3 GB Q4_K base. `save_dequantized_` gives the same
files (hub names through transformers' own `revert_weight_conversion`, sharded with an index)
and the same block bytes, but dequantises one decoder layer, writes it as one shard and drops
it (its tensors go to the meta device), so peak memory is the quantised model plus one float
layer. Weights are written in `dtype` (the pipeline passes the base checkpoint's own dtype).

The model is consumed: afterwards its decoder layers are on the meta device. Callers that still
need a model read the written folder.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from greentune.quant.dequantize import dequantize_model_

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The `model.model.layers` list of a HF causal LM, None if it has none."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _hub_names(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, sd)


_ST_DTYPE = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _save_shard(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written tensor by tensor from `sd` as it is: the reverted experts are
    views of one fused tensor, which `safetensors.torch.save_file` refuses (shared storage) and a
    copy of each would double the layer in memory. Each expert's rows are contiguous already."""
    names = sorted(sd)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k in names:
        t = sd[k]
        n = t.numel() * t.element_size()
        header[k] = {
            "dtype": _ST_DTYPE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in names:
            t = sd[k].detach().contiguous().reshape(-1)
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))


def _dequantize_experts_(layer: nn.Module, dtype: torch.dtype) -> dict[str, tuple]:
    """`dequantize_model_`'s step for every `QuantExperts3D` of `layer`, one expert at a time into
    the `dtype` result (not all experts in float32 first, 3.76 GB for one Mixtral layer's gate_up),
    keeping the packed bytes themselves (the layer is dropped after it is written)."""
    from greentune.quant.experts import QuantExperts3D

    packed = {}
    for name, module in list(layer.named_modules()):
        if not isinstance(module, QuantExperts3D):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        weight = torch.empty(
            (module.num_experts, module.out_features, module.in_features),
            dtype=dtype,
            device=module.qweight.device,
        )
        for e in range(module.num_experts):
            weight[e].copy_(module.dequantize_expert(e))
        if module.fmt.ggml_type is not None:
            packed[name] = (module.fmt.ggml_type, module.qweight.detach())
        del parent._modules[leaf]
        weight = nn.Parameter(weight, requires_grad=False)
        if hasattr(parent, "_set"):  # greentune.moe.SparseExperts
            parent._set(leaf, weight)
        else:
            parent.register_parameter(leaf, weight)
    return packed


WHOLE_BYTES = 4 * 1024**3  # a float model up to this size is written whole, as save_pretrained does


def float_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of `model`'s weights as `dtype` floats (quantised modules counted by their logical shape)."""
    from greentune.quant.experts import QuantExperts3D
    from greentune.quant.linear import PackedMatrix

    size = torch.empty(0, dtype=dtype).element_size()
    n = 0
    for m in model.modules():
        if isinstance(m, PackedMatrix):
            n += math.prod(m.weight_shape)
        elif isinstance(m, QuantExperts3D):
            n += m.num_experts * m.out_features * m.in_features
        n += sum(p.numel() for p in m.parameters(recurse=False))
    return n * size


@torch.no_grad()
def save_dequantized_(
    model: nn.Module,
    out_dir: Path,
    dtype: torch.dtype,
    progress: bool = False,
    whole_bytes: int = WHOLE_BYTES,
) -> dict[str, tuple]:
    """Write `model` (quantised modules and all) to `out_dir` as float `dtype` safetensors shards,
    one per decoder layer plus one for the rest, with config and index; return the block bytes as
    `dequantize_model_` does (keyed by the in-memory state-dict names). Consumes the model.
    A model of at most `whole_bytes` as floats is dequantised whole and written by `save_pretrained`
    (one `model.safetensors`, as before)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    layers = decoder_layers(model)
    if layers is None or float_bytes(model, dtype) <= whole_bytes:  # small, or not a decoder stack
        packed = dequantize_model_(model, dtype)
        model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
        return packed
    prefix = _prefix_of(model, layers)
    n = len(layers) + 1
    packed: dict[str, tuple] = {}
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=n, desc="merged/ (dequantise, write)", unit="shard", disable=not progress)
    for i, layer in enumerate(layers):
        p = f"{prefix}{i}."
        packed.update({p + k: v for k, v in _dequantize_experts_(layer, dtype).items()})
        packed.update({p + k: v for k, v in dequantize_model_(layer, dtype).items()})
        sd = {p + k: v.to(dtype) if v.is_floating_point() else v for k, v in layer.state_dict().items()}
        layer.to("meta")  # its float tensors live on in `sd` alone until written; the model is consumed
        total += _write(model, sd, out_dir, i + 1, n, weight_map)
        del sd
        bar.update()
    packed.update(dequantize_model_(model, dtype))  # embedding, head: the layers are done
    layer_keys = f"{prefix}"
    sd = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
        if not k.startswith(layer_keys)
    }
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # as save_pretrained: a tied head is the embedding
    total += _write(model, sd, out_dir, n, n, weight_map)
    bar.update()
    bar.close()
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
    )
    model.config.dtype = dtype
    model.config.save_pretrained(out_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out_dir)
    return packed


def _prefix_of(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise AssertionError("decoder layers not found in the model")


def _write(model, sd: dict, out_dir: Path, index: int, n: int, weight_map: dict) -> int:
    name = f"model-{index:05d}-of-{n:05d}.safetensors"
    hub = _hub_names(model, sd)
    _save_shard(hub, out_dir / name)
    weight_map.update({k: name for k in hub})
    return sum(v.numel() * v.element_size() for v in hub.values())


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The float dtype a HF checkpoint declares (`dtype` / `torch_dtype` in config.json); float32
    when it declares none or a non-float one."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
