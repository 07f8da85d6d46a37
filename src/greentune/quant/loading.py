"""Load a Hugging Face checkpoint straight into quantised form, one tensor at a time.

    model = load_quantized("models/mixtral", "q4_k")

1. The model skeleton is built by transformers from the config with every *parameter* on the
   meta device (no memory); buffers such as rotary ``inv_freq`` are computed by the modules'
   own constructors, on CPU, as `from_pretrained` computes them.
2. The weights `replace.plan` selects get empty packed modules (`QuantLinear`,
   `QuantExperts3D`): their bytes are the only large allocation that lives on.
3. Each safetensors shard is read tensor by tensor with plain file reads (not mmap: mapped
   pages would count as resident until the file is closed) and each tensor is quantised into
   its module, or, if it is not quantised (embeddings, norms, lm_head, routers), materialised
   in `dtype`, then dropped (quantising runs in the native kernels, `kernels.quantize_blocks`,
   over `torch.get_num_threads()` threads). Peak memory ≈ quantised model + non-quantised weights + the
   largest tensor (+ its fp32 copy and a few MB of quantiser work space). The packed buffers
   are uninitialised storage (`replace.empty_quantized_module`), resident only once written,
   and `greentune.heap.limit_heap_retention` fixes glibc's mmap threshold at 1 MB for the process, so freed
   loader and training-step tensors go back to the OS instead of fragmenting the heap. The token
   embedding and lm_head are quantised too (`replace.plan`); with tied embeddings the table
   is read once and the head reads it (a duplicate ``lm_head.weight`` is ignored).

Checkpoint names go through transformers' own conversion mapping (`WeightRenaming`s, e.g.
Mixtral's ``block_sparse_moe`` → ``mlp``) and `WeightConverter`s of the MoE-fusion kind
(``experts.N.w1/w3`` → ``experts.gate_up_proj[N]``, ``experts.N.w2`` → ``down_proj[N]``; Qwen-MoE's
``gate_proj/up_proj/down_proj`` likewise): each expert is quantised as soon as its pieces have
arrived. Other converter operations are refused with an error naming them.

The result equals ``AutoModelForCausalLM.from_pretrained(dir, dtype=dtype)`` followed by
``quantize_model_(model, fmt, skip)``, byte for byte.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from greentune.errors import UserError
from greentune.heap import limit_heap_retention
from greentune.models.completeness import ignorable_unexpected, require_complete
from greentune.models.safetensors_header import read_header
from greentune.quant.formats import get_format
from greentune.quant.replace import (
    DEFAULT_SKIP,
    empty_quantized_module,
    expert_tensor,
    install,
    plan,
    use_eager_experts,
)

logger = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


# ---- reading safetensors without mmap ------------------------------------------------------------


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors shard(s) of a HF model directory (single file or indexed shards)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"model directory not found: {d}")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        from greentune.models.loader import (
            safetensors_files,
        )  # the index checked (valid JSON, shards present)

        return safetensors_files(d)
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(d.glob("*.safetensors"))
    if not found:
        raise UserError(f"no .safetensors weights in {d} (greentune never loads pickled checkpoints)")
    return found


def _anonymous_buffer(nbytes: int) -> torch.Tensor:
    """uint8 ``[nbytes]`` in its own anonymous memory mapping, returned to the OS as soon as the
    tensor dies. (A malloc'ed buffer of this size would raise glibc's dynamic mmap threshold, so
    later frees stay in the heap and the process's resident size keeps every tensor's peak.)"""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from one safetensors file in storage order, each tensor read
    into fresh memory with `readinto`. The generator keeps no reference to a tensor once it
    has been yielded, so a consumer that drops it frees it before the next one is read."""
    header = read_header(path)  # every structural rule, one line if broken
    with open(path, "rb") as f:
        base = header.data_start
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):
            start, end = info.begin, info.end
            dtype = _ST_DTYPES.get(info.dtype)
            if dtype is None:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {info.dtype}")
            buf = _anonymous_buffer(end - start)
            f.seek(base + start)
            if end > start and f.readinto(memoryview(buf.numpy())) != end - start:
                raise UserError(f"{path}: truncated file (tensor {name})")
            tensor = buf.view(dtype).reshape(info.shape)
            del buf
            yield name, tensor
            # Hold no reference across the next allocation: the consumer's `del` frees the
            # tensor at once. (The buffers are lazily-mapped, so the old rebinding did not
            # double resident memory in practice; an eager buffer would have.)
            del tensor


def release_free_memory() -> None:
    """Hand free heap pages back to the OS (glibc `malloc_trim`; a no-op elsewhere), so the
    resident size after a load reflects what the model holds, not the loader's freed buffers."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


# ---- the skeleton -------------------------------------------------------------------------------


@contextmanager
def params_on_meta():
    """Within the block, every parameter a module registers is moved to the meta device
    (buffers stay real, so constructors compute them as usual)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _conversions(model):
    """transformers' renamings and converters for this model (its `from_pretrained` uses them)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - older transformers: keys are module names
        return [], []
    transforms = get_model_conversion_mapping(model)
    return (
        [t for t in transforms if isinstance(t, WeightRenaming)],
        [t for t in transforms if isinstance(t, WeightConverter)],
    )


def _expert_fusion(converter) -> int:
    """Number of pieces concatenated per expert for a supported MoE-fusion converter."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    if (
        ops
        and isinstance(ops[0], MergeModulelist)
        and ops[0].dim == 0
        and (len(ops) == 1 or (len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1))
    ):
        return len(converter.source_patterns) if len(ops) == 2 else 1
    raise UserError(
        f"load_quantized cannot stream checkpoint conversion {converter!r}; "
        "load with from_pretrained and call quantize_model_ instead"
    )


def _expert_index(pattern: str, key: str) -> int:
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    m = re.search(regex, key)
    if m is None or not m.groups():
        raise UserError(f"cannot find the expert index of {key!r} (pattern {pattern!r})")
    return int(m.group(1))


class _Loader:
    """Streams checkpoint tensors into a skeleton whose quantised modules are installed."""

    def __init__(
        self, model: nn.Module, targets, shapes: dict[str, tuple], dtype: torch.dtype, device: torch.device
    ):
        self.model, self.dtype, self.shapes, self.device = model, dtype, shapes, device
        self.targets = {t.key: t for t in targets}
        self.loaded: set[str] = set()
        self.experts_done: dict[str, set[int]] = {}
        self.pending: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
        self.renamings, self.converters = _conversions(model)
        self.meta_keys = {k: True for k in shapes}
        self.unexpected: list[str] = []
        self.mismatched: list[tuple[str, tuple, tuple]] = []

    def _shape_ok(self, key: str, tensor: torch.Tensor) -> bool:
        """Record a tensor of the wrong shape for `require_complete` instead of loading it."""
        if tuple(tensor.shape) == tuple(self.shapes[key]):
            return True
        self.mismatched.append((key, tuple(tensor.shape), tuple(self.shapes[key])))
        return False

    def _rename(self, key: str):
        from transformers.core_model_loading import apply_renamings, rename_source_key

        target, pattern = rename_source_key(
            key,
            self.renamings,
            self.converters,
            getattr(self.model, "base_model_prefix", None),
            self.meta_keys,
        )
        if pattern is None:
            return target, None, None
        renamed = apply_renamings(key, self.renamings)
        for conv in self.converters:
            if conv.rename_source_key(renamed)[1] is not None:
                return target, conv, pattern
        raise AssertionError(f"no converter matched {key}")  # pragma: no cover

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if key.endswith(("_blocks", "_scales")) and key[: -len("_blocks")] in self.targets:
            self._put_mxfp4(key, tensor)
            return
        target_key, conv, pattern = (
            self._rename(key) if (self.renamings or self.converters) else (key, None, None)
        )
        if conv is not None:
            self._put_piece(target_key, conv, pattern, key, tensor)
        elif target_key in self.targets:
            target = self.targets[target_key]
            if target_key in self.shapes and not self._shape_ok(target_key, tensor):
                return
            owner = self.model.get_submodule(target.module_name)
            if (
                target.kind == "experts"
            ):  # a fused [E, out, in] tensor (gpt-oss: [E, in, out]; Granite's input_linear)
                getattr(owner, target.attr).load_(expert_tensor(owner, tensor))
            elif target.kind != "tied_head":  # a tied head's bytes are its embedding's
                owner.load_weight_(tensor)
            self.loaded.add(target_key)
        elif target_key in self.shapes:
            if not self._shape_ok(target_key, tensor):
                return
            self._assign(target_key, tensor)
            self.loaded.add(target_key)
        else:
            self.unexpected.append(key)

    def _put_mxfp4(self, key: str, tensor: torch.Tensor) -> None:
        """One half of a Hub MXFP4 expert tensor (gpt-oss: `*_blocks` [E, out, in/32, 16] and
        `*_scales` [E, out, in/32]); with both, the store takes the bytes as they are when it is
        MXFP4 (nibbles reordered, `mxfp4.hub_to_ggml`), else expert by expert dequantised and
        re-quantised into its format: never the whole tensor in floats."""
        from greentune.quant.mxfp4 import hub_to_ggml

        target_key, part = key[: -len("_blocks")], key[-len("blocks") :]
        slot = self.pending.setdefault((target_key, -1), {})
        slot[part] = tensor
        if len(slot) < 2:
            return
        del self.pending[(target_key, -1)]
        t = self.targets[target_key]
        store = getattr(self.model.get_submodule(t.module_name), t.attr)
        try:
            packed = hub_to_ggml(slot["blocks"], slot["scales"])
        except ValueError as err:
            raise UserError(f"{target_key}: {err}") from None
        mx = get_format("mxfp4")
        want = (*store.shape[:-1], -1) if not mx.fits(store.in_features) else mx.packed_shape(store.shape)
        if tuple(packed.shape) != tuple(want):
            self.mismatched.append((target_key, tuple(packed.shape), tuple(want)))
            return
        if store.fmt.name == "mxfp4":
            store.qweight.copy_(packed)
        else:
            for e in range(store.num_experts):
                store.load_expert_(e, mx.dequantize(packed[e], (store.out_features, store.in_features)))
        self.loaded.add(target_key)

    def _put_piece(self, target_key, conv, pattern, key, tensor) -> None:
        n_pieces = _expert_fusion(conv)
        e = _expert_index(pattern, key)
        slot = self.pending.setdefault((target_key, e), {})
        slot[conv.source_patterns.index(pattern) if n_pieces > 1 else 0] = tensor
        if len(slot) < n_pieces:
            return
        w = torch.cat([slot[p] for p in range(n_pieces)], dim=0) if n_pieces > 1 else slot[0]
        del self.pending[(target_key, e)]
        if target_key in self.targets:
            t = self.targets[target_key]
            getattr(self.model.get_submodule(t.module_name), t.attr).load_expert_(e, w)
        elif target_key in self.shapes:
            param = self._param_for_experts(target_key)
            param.data[e].copy_(w)
        else:
            self.unexpected.append(key)
            return
        done = self.experts_done.setdefault(target_key, set())
        done.add(e)
        if len(done) == self.shapes[target_key][0]:
            self.loaded.add(target_key)

    def _param_for_experts(self, key: str) -> torch.Tensor:
        module_name, _, name = key.rpartition(".")
        module = self.model.get_submodule(module_name)
        p = getattr(module, name)
        if p.is_meta:
            p = nn.Parameter(
                torch.empty(p.shape, dtype=self.dtype, device=self.device), requires_grad=p.requires_grad
            )
            setattr(module, name, p)
        return p

    def _assign(self, key: str, tensor: torch.Tensor) -> None:
        module_name, _, name = key.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        if tuple(tensor.shape) != tuple(self.shapes[key]):
            raise UserError(
                f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(self.shapes[key])}"
            )
        if name in module._parameters:
            old = module._parameters[name]
            if old.is_meta:
                value = tensor.to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)
                module._parameters[name] = nn.Parameter(
                    value, requires_grad=old.requires_grad and value.is_floating_point()
                )
            else:
                old.data.copy_(tensor)
        else:
            old = module._buffers[name]
            module._buffers[name] = tensor.to(self.device, old.dtype if old is not None else tensor.dtype)


def _tie_the_rest(model: nn.Module, missing: set[str], quantised: set[str]) -> None:
    """transformers' tying for the tied pairs that are not quantised (a quantised pair is tied
    already: `QuantTiedHead` reads its `QuantEmbedding`, which has no `.weight` to share)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, dict) or not (set(tied) | set(tied.values())) & quantised:
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
        return
    kept = {k: v for k, v in tied.items() if k in quantised or v in quantised}
    for k in kept:
        del tied[k]
    try:
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
    finally:
        tied.update(kept)


def check_loaded_complete(model_dir, model: nn.Module, loader: _Loader, shapes: dict[str, tuple]) -> None:
    """The shared completeness rule (`models.completeness`) on what the stream filled: every
    parameter and quantised target present, every expert's pieces arrived, no tensor the
    architecture lacks, every shape equal."""
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    unfilled = [k for k in loader.targets if k not in loader.loaded]
    pending = [f"{k}[{e}]" for k, e in loader.pending]
    missing = set(still_meta + unfilled + pending) - {name for name, _, _ in loader.mismatched}
    require_complete(
        model_dir,
        missing,
        loader.unexpected,
        loader.mismatched,
        expected_count=len(shapes),
        ignore_unexpected=ignorable_unexpected(model),
    )


def load_quantized(
    model_dir: str | Path,
    fmt,
    dtype: torch.dtype = torch.float32,
    skip: Iterable[str] = DEFAULT_SKIP,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> nn.Module:
    """Build a causal LM from `model_dir` with its Linear/expert weights stored in `fmt`.

    Args:
        model_dir: a local Hugging Face model directory (config.json + safetensors).
        fmt: format name or `BlockFormat` (see `formats.get_format`).
        dtype: dtype of the weights that are not quantised.
        skip: substrings of module names to leave unquantised (as `quantize_model_`).
        device: where tensors are quantised and the model lives (default CPU). On a GPU the
            K-quant searches run as large batched kernels (not measured here), and host
            memory only ever holds one checkpoint tensor.
        progress: a progress bar over the checkpoint's bytes (minutes for a 30 GB checkpoint).
    Returns:
        the model, in eval mode.
    Raises:
        UserError: missing directory, no safetensors, or weights the model needs are absent.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fmt = get_format(fmt)
    device = torch.device(device if device is not None else "cpu")
    files = checkpoint_files(model_dir)
    limit_heap_retention()  # for the load and the training that follows
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    from greentune.models.mxfp4_checkpoint import drop_quantization_config

    drop_quantization_config(config)  # MXFP4 experts (gpt-oss): read by `_Loader._put_mxfp4`
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    targets = plan(model, fmt, skip)
    for t in targets:  # a tied head comes after its embedding
        install(model, t, empty_quantized_module(t, device=device, model=model, dtype=dtype))
    loader = _Loader(model, targets, shapes, dtype, device)
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total, desc=f"quantise to {fmt.name}", unit="B", unit_scale=True, disable=not progress)
    for path in files:
        for key, tensor in iter_safetensors(path):
            n = tensor.numel() * tensor.element_size()
            loader.put(key, tensor)
            del tensor
            bar.update(n)
    bar.close()
    quantised_ties = {t.key for t in targets if t.kind == "tied_head"}
    loader.loaded |= quantised_ties  # tied checkpoints usually omit the head
    missing = set(shapes) - loader.loaded
    if hasattr(model, "tie_weights"):
        _tie_the_rest(model, missing, {t.key for t in targets if t.kind in ("tied_head", "embedding")})
    check_loaded_complete(model_dir, model, loader, shapes)
    if any(t.kind == "experts" for t in targets):
        use_eager_experts(model)
    model.to(device)  # the constructor-made buffers (rotary tables)
    model.eval()
    release_free_memory()
    return model
