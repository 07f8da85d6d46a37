"""Write a GGUF file that llama.cpp, Ollama and LM Studio load: `write_gguf`.

    from greentune.export import write_gguf
    write_gguf("runs/x/merged", "runs/x/export/model-q4_k_m.gguf", quant="q4_k_m")

The file is streamed: tensor infos are declared first (their sizes follow from shape and
type), then each tensor is read, permuted/stacked, quantised and written before the next
one is read, so peak memory is about one (stacked-expert) tensor. It is written to a
temporary name in the target folder and renamed when complete.

Metadata written, under the family's llama.cpp architecture ARCH (`gguf_families`):
`general.{architecture,name,file_type,quantization_version}`, `ARCH.{context_length,
embedding_length, block_count, feed_forward_length, rope.dimension_count, rope.freq_base,
attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon,
vocab_size}`, `ARCH.attention.{key,value}_length` when head_dim ≠ n_embd/n_head (always
for the families llama.cpp reads it from), `ARCH.rope.scaling.*` for linear scaling,
`ARCH.expert_count` and `ARCH.expert_used_count` for MoE, the family's own keys
(`Family.keys`), and the tokenizer keys of `gguf_vocab`.

Quantisation presets and the per-tensor mix are in `gguf_quant`. Tensors given in
`prequantized` (HF name → (ggml type, block bytes)) are written byte for byte whatever the
preset — the frozen base a run trained on is the base that ships.
"""

from __future__ import annotations

import enum
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, RopeScalingType

from greentune.errors import UserError
from greentune.export import gguf_quant, gguf_vocab
from greentune.export.gguf_tensors import Arch, plan
from greentune.export.source import ModelSource, Packed
from greentune.faults import maybe_fault
from greentune.fsutil import temp_file_beside

log = logging.getLogger(__name__)


class State(enum.Enum):
    """Where `_write_all` is: tensor types planned → header/KV/infos written → tensor data."""

    PLANNED = "planned"
    HEADER = "header"
    TENSORS = "tensors"


@dataclass
class GGUFSummary:
    """What was written: path, bytes, parameters, bits per weight, GGML type per tensor."""

    path: Path
    n_bytes: int
    n_params: int
    bits_per_weight: float
    types: dict[str, str]
    vocab: dict


def _as_source(model, tokenizer, prequantized) -> ModelSource:
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, (str, os.PathLike)):
        return ModelSource.from_dir(model, prequantized)
    if tokenizer is None:
        raise UserError("exporting an in-memory model needs its tokenizer (tokenizer=...)")
    return ModelSource.from_model(model, tokenizer, prequantized)


def write_gguf(
    model_dir,
    out_path,
    quant: str = "f16",
    *,
    tokenizer=None,
    prequantized: dict | None = None,
    tokenizer_pre: str | None = None,
    name: str | None = None,
) -> Path:
    """Export a model of a `gguf_families.FAMILIES` type to GGUF at `out_path`; return the path.

    Args:
        model_dir: HF model directory (config.json, *.safetensors, tokenizer files), or an
            in-memory `transformers` model (then pass `tokenizer=`).
        out_path: target .gguf file (written atomically).
        quant: one of `gguf_quant.QUANTS`: f32, f16, q8_0, q4_0, q4_k_m.
        prequantized: HF tensor name → (ggml type, GGUF block bytes of the (out, in)
            tensor); written unchanged (q/k rows permuted, experts stacked).
        tokenizer_pre: override the detected `tokenizer.ggml.pre` name.
        name: `general.name` (default: the folder's name).
    Raises:
        UserError: unsupported architecture or tokenizer, unknown quant, missing files.
    """
    return export_gguf(
        model_dir,
        out_path,
        quant,
        tokenizer=tokenizer,
        prequantized=prequantized,
        tokenizer_pre=tokenizer_pre,
        name=name,
    ).path


def export_gguf(
    model_dir,
    out_path,
    quant: str = "f16",
    *,
    tokenizer=None,
    prequantized=None,
    tokenizer_pre=None,
    name=None,
) -> GGUFSummary:
    """As `write_gguf`, returning a `GGUFSummary` (sizes, bits per weight, types)."""
    quant = gguf_quant.check_quant(quant)
    src = _as_source(model_dir, tokenizer, prequantized)
    out_path = Path(out_path)
    arch = Arch.from_config(src.config, src.has("lm_head.weight"))
    if quant == "q4_k_m" and not gguf_quant.have_k_quants():
        raise UserError(
            "q4_k_m needs the Q4_K/Q6_K quantisers of greentune.quant.formats, "
            "which this install lacks; use q8_0 or q4_0"
        )
    tensors = plan(src, arch)
    n_vocab = tensors[0].shape[0]
    if (
        arch.model_type == "mistral"
        and src.config.get("sliding_window")
        and src.config["sliding_window"] < arch.n_ctx
    ):
        log.warning(
            "sliding window %d is not represented in GGUF 'llama': contexts beyond it differ from HF",
            src.config["sliding_window"],
        )

    tmp = temp_file_beside(out_path)
    try:
        name = name or (
            Path(str(model_dir)).name
            if isinstance(model_dir, (str, os.PathLike))
            else src.config.get("model_type", "model")
        )
        summary = _write(
            src,
            arch,
            tensors,
            n_vocab,
            quant,
            Path(tmp),
            tokenizer_pre,
            _loadable_name(name, arch, src.tokenizer),
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        maybe_fault(f"write:{out_path.name}")
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    summary.path = out_path
    log.info(
        "wrote %s: %d tensors, %.1f MB, %.2f bits/weight",
        out_path,
        len(tensors),
        summary.n_bytes / 1e6,
        summary.bits_per_weight,
    )
    return summary


# llama.cpp sets token attributes of these when `general.name` contains "phi3" / "phi-3",
# and fails to load a file whose vocabulary lacks one of them
_PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _loadable_name(name: str, arch: Arch, tokenizer) -> str:
    """`name`, unless llama.cpp would key a vocabulary lookup on it that this vocabulary fails."""
    if arch.model_type == "phi3" and re.search(r"phi-?3", name.lower()):
        vocab = tokenizer.get_vocab()
        missing = [t for t in _PHI3_NAMED_TOKENS if t not in vocab]
        if missing:
            log.warning(
                "general.name %r written as 'model': llama.cpp looks up %s in Phi-3-named models, "
                "which this vocabulary lacks",
                name,
                missing,
            )
            return "model"
    return name


def _write(
    src: ModelSource,
    arch: Arch,
    tensors,
    n_vocab: int,
    quant: str,
    path: Path,
    tokenizer_pre: str | None,
    name: str,
) -> GGUFSummary:
    w = GGUFWriter(path, arch.family.name)
    try:
        return _write_all(w, src, arch, tensors, n_vocab, quant, path, tokenizer_pre, name)
    finally:
        w.close()


def _write_all(
    w: GGUFWriter,
    src: ModelSource,
    arch: Arch,
    tensors,
    n_vocab: int,
    quant: str,
    path: Path,
    tokenizer_pre: str | None,
    name: str,
) -> GGUFSummary:
    state = State.PLANNED
    w.add_name(name)
    _add_hparams(w, arch, n_vocab)
    vocab = gguf_vocab.add_vocab(w, src.tokenizer, n_vocab, pre=tokenizer_pre)

    # decide each tensor's type, declare it
    types: dict[str, T] = {}
    any_quantised = False
    for t in tensors:
        pre_type = src.prequantized_type(t.sources)
        types[t.name] = (
            pre_type
            if pre_type is not None
            else gguf_quant.tensor_type(
                quant, t.name, t.shape, t.layer, arch.n_layer, arch.n_expert, arch.tied
            )
        )
    for t in tensors:
        gtype = types[t.name]
        any_quantised |= gtype not in (T.F32, T.F16)
        w.add_tensor_info(
            t.name,
            _byte_shape(t.shape, gtype),
            _np_dtype(gtype),
            gguf_quant.nbytes_of(t.shape, gtype),
            raw_dtype=_raw(gtype),
        )
    w.add_file_type(int(gguf_quant.FILE_TYPE[quant]))
    if any_quantised:
        w.add_quantization_version(2)

    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    state = State.HEADER
    n_params = 0
    n_bytes = 0
    from tqdm import tqdm

    # a bar on a terminal only (disable=None): a 14.8 B model's GGUF is minutes of reading and writing
    for t in tqdm(tensors, desc=f"write {path.name}", unit="tensor", disable=None, leave=False):
        assert state in (State.HEADER, State.TENSORS), f"expected header or tensors, got {state}"
        gtype = types[t.name]
        value = t.load()
        if isinstance(value, Packed):
            if value.ggml_type != gtype or tuple(value.shape) != tuple(t.shape):
                raise UserError(
                    f"prequantized {t.name}: {value.ggml_type.name}{value.shape} "
                    f"does not match planned {gtype.name}{t.shape}"
                )
            data = value.data
        else:
            if tuple(value.shape) != tuple(t.shape):
                raise UserError(f"{t.name}: tensor shape {value.shape} differs from the config's {t.shape}")
            data = gguf_quant.quantise(value, gtype)
        w.write_tensor_data(data)
        n_params += int(np.prod(t.shape))
        n_bytes += data.nbytes
        state = State.TENSORS
    w.close()
    return GGUFSummary(
        path=path,
        n_bytes=path.stat().st_size,
        n_params=n_params,
        bits_per_weight=8.0 * n_bytes / max(n_params, 1),
        types={k: v.name for k, v in types.items()},
        vocab=vocab,
    )


def _raw(t: T):
    return None if t in (T.F32, T.F16) else t


def _np_dtype(t: T):
    return {T.F32: np.float32, T.F16: np.float16}.get(t, np.uint8)


def _byte_shape(shape, t: T):
    if t in (T.F32, T.F16):
        return tuple(shape)
    from gguf.quants import quant_shape_to_byte_shape

    return tuple(quant_shape_to_byte_shape(shape, t))


def _add_hparams(w: GGUFWriter, a: Arch, n_vocab: int) -> None:
    w.add_vocab_size(n_vocab)
    w.add_context_length(a.n_ctx)
    w.add_embedding_length(a.n_embd)
    w.add_block_count(a.n_layer)
    w.add_feed_forward_length(a.n_ff)
    w.add_rope_dimension_count(a.n_rot or a.head_dim)
    w.add_head_count(a.n_head)
    w.add_head_count_kv(a.n_head_kv)
    w.add_layer_norm_rms_eps(a.eps)
    w.add_rope_freq_base(a.rope_theta)
    if a.family.head_lengths and (a.head_dim != a.n_embd // a.n_head or a.family.name != "llama"):
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
    rtype = a.rope_scaling.get("rope_type", a.rope_scaling.get("type"))
    if rtype == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(a.rope_scaling["factor"]))
    elif rtype == "yarn" and a.family.name == "gpt-oss":
        pass  # its keys come with the family (`gguf_gpt_oss.keys`)
    elif rtype not in (None, "llama3", *a.family.rope_scaling):
        raise UserError(
            f"GGUF export does not support rope scaling {rtype!r} yet (default, linear, llama3 are)"
        )
    if a.n_expert:
        w.add_expert_count(a.n_expert)
        w.add_expert_used_count(a.n_expert_used)
    if a.family.keys is not None:
        a.family.keys(w, a.config)
