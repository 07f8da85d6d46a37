"""Reuse a pretrained checkpoint: a local Hugging Face folder, safetensors only.

The model *definition* comes from transformers (so every HF causal-LM architecture
loads); greentune only checks the folder first so that every user mistake becomes one
clear line, and refuses pickled weights, which can run arbitrary code when loaded.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU (no bf16 units on common CPUs: bf16 matmul is ~400x slower), bf16 on GPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight shards of a checkpoint folder, via the index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{index}: not a valid safetensors index ({err})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{model_dir}: shard(s) named in the index are missing: {', '.join(missing[:3])}")
        return files
    return sorted(model_dir.glob("*.safetensors"))


def check_safetensors_header(path: Path) -> None:
    """Parse the 8-byte length and JSON header, so corruption is one line, not a Rust panic."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensors end at byte {8 + n + end} but the file has {size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt safetensors file ({err})") from None


def resolve_model_dir(ref: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; a Hub id `ORG/NAME[@REVISION]` → its snapshot folder in the
    Hugging Face cache, downloaded when online and missing (see `models.hub`)."""
    from .hub import resolve_model

    return resolve_model(ref, revision).path


def check_model_dir(path: str | Path) -> Path:
    """Validate a checkpoint folder: it exists, has config.json and safetensors weights."""
    model_dir = Path(path)
    if not model_dir.exists():
        raise UserError(f"model not found: {model_dir} (no such folder; a Hugging Face Hub model is given "
                        "by its id, ORG/NAME or ORG/NAME@REVISION)")
    if not model_dir.is_dir():
        raise UserError(f"model path is not a folder: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json, not a Hugging Face model folder")
    files = safetensors_files(model_dir)
    if not files:
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserError(
                f"{model_dir}: only pickled weights ({', '.join(sorted(pickles)[:3])}); greentune never unpickles "
                "model files because loading a pickle can run arbitrary code: convert them to safetensors in a "
                "trusted environment (load, then model.save_pretrained(dir, safe_serialization=True))")
        raise UserError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        check_safetensors_header(f)
    return model_dir


def load_config(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{model_dir}/config.json: {first}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{model_dir}/config.json: cannot be read ({err})") from None


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{model_dir}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json) in the model folder")
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir}: tokenizer cannot be loaded ({str(err).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               trust_remote_code: bool = False):
    """Load a causal LM from a checked folder; weights from safetensors only."""
    from transformers import AutoModelForCausalLM

    from ..heap import limit_heap_retention

    model_dir = check_model_dir(model_dir)
    config = load_config(model_dir, trust_remote_code)
    dtype = dtype or compute_dtype(device)
    limit_heap_retention()   # for the load and the training that follows (see heap.py)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise UserError(f"{model_dir}: not a causal language model this transformers can load "
                        f"({str(err).splitlines()[0]})") from None
    return model.to(device)


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
