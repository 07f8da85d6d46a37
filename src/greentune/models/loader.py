"""Reuse a pretrained checkpoint: a local Hugging Face folder, safetensors only.

The model *definition* comes from transformers (so every HF causal-LM architecture
loads); greentune only checks the folder first so that every user mistake becomes one
clear line, and refuses pickled weights, which can run arbitrary code when loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from greentune.errors import UserError
from greentune.models.completeness import (
    check_headers_against_architecture,
    ignorable_unexpected,
    require_complete,
)
from greentune.models.safetensors_header import read_header

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
    """Validate the 8-byte length and JSON header, so corruption is one line, not a Rust panic."""
    read_header(path)


def resolve_model_dir(ref: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; a Hub id `ORG/NAME[@REVISION]` → its snapshot folder in the
    Hugging Face cache, downloaded when online and missing (see `models.hub`)."""
    from greentune.models.hub import resolve_model

    return resolve_model(ref, revision).path


def check_model_dir(path: str | Path) -> Path:
    """Validate a checkpoint folder: it exists, has config.json and safetensors weights."""
    model_dir = Path(path)
    if not model_dir.exists():
        raise UserError(
            f"model not found: {model_dir} (no such folder; a Hugging Face Hub model is given "
            "by its id, ORG/NAME or ORG/NAME@REVISION)"
        )
    if not model_dir.is_dir():
        raise UserError(f"model path is not a folder: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json, not a Hugging Face model folder")
    files = safetensors_files(model_dir)
    if not files:
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserError(
                f"{model_dir}: only pickled weights ({', '.join(sorted(pickles)[:3])}); greentune never "
                "unpickles "
                "model files because loading a pickle can run arbitrary code: convert them to safetensors in "
                "a "
                "trusted environment (load, then model.save_pretrained(dir, safe_serialization=True))"
            )
        raise UserError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        check_safetensors_header(f)
    return model_dir


def load_config(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{model_dir}/config.json: {first}") from None
    except (OSError, json.JSONDecodeError, RecursionError) as err:
        raise UserError(f"{model_dir}/config.json: cannot be read ({err})") from None
    check_vocab_size(Path(model_dir), config)
    return config


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def check_weights_match(model_dir: str | Path, config) -> None:
    """Before any weight is read: the checkpoint's tensor names and shapes (from the headers)
    against the architecture `config` describes (`completeness.check_headers_against_architecture`)."""
    model_dir = Path(model_dir)
    headers = {
        name: t.shape for f in safetensors_files(model_dir) for name, t in read_header(f).tensors.items()
    }
    from greentune.models import mxfp4_checkpoint

    if mxfp4_checkpoint.is_mxfp4(config):  # experts as *_blocks/*_scales: checked as the floats they encode
        headers = mxfp4_checkpoint.float_shapes(headers)
    check_headers_against_architecture(model_dir, config, headers)


def check_vocab_size(model_dir: Path, config) -> None:
    """config.json's `vocab_size` must be the token embedding's row count in the weights."""
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or not (model_dir / "config.json").is_file():
        return
    for f in safetensors_files(model_dir):
        for name, t in read_header(f).tensors.items():
            if name.endswith(EMBEDDING_SUFFIXES) and len(t.shape) == 2 and t.shape[0] != vocab:
                raise UserError(
                    f"{model_dir}/config.json says vocab_size {vocab}, but the weights' {name} has "
                    f"{t.shape[0]} rows"
                )


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(
            f"{model_dir}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json) in the model folder"
        )
    check_tokenizer_file(model_dir / "tokenizer.json")
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir}: tokenizer cannot be loaded ({str(err).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    check_tokenizer_fits(tok, model_dir)
    return tok


def check_tokenizer_file(path: Path) -> None:
    """A tokenizer.json that `tokenizers` cannot build (wrong structure, not JSON) is one line."""
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ValueError("not a JSON object with a `model` object")
        Tokenizer.from_str(text)
    except RecursionError:
        raise UserError(f"{path}: not a tokenizer file (JSON nested too deeply)") from None
    except Exception as err:  # tokenizers raises plain Exception for a wrong structure
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{path}: not a tokenizer file ({first})") from None


def check_tokenizer_fits(tokenizer, model_dir: Path) -> None:
    """Every token id must have an embedding row: a larger tokenizer indexes past the table."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    vocab = config.get("vocab_size") if isinstance(config, dict) else None
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise UserError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{vocab} rows (vocab_size); token ids past {vocab - 1} have no embedding"
        )


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM from a checked folder; weights from safetensors only."""
    from transformers import AutoModelForCausalLM

    from greentune.heap import limit_heap_retention

    model_dir = check_model_dir(model_dir)
    config = load_config(model_dir, trust_remote_code)
    dtype = dtype or compute_dtype(device)
    limit_heap_retention()  # for the load and the training that follows (see heap.py)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except ValueError as err:
        raise UserError(
            f"{model_dir}: not a causal language model this transformers can load "
            f"({str(err).splitlines()[0]})"
        ) from None
    check_loading_info(model_dir, model, info)
    return model.to(device)


def check_loading_info(model_dir: Path, model, info: dict) -> None:
    """The completeness rule (`completeness.require_complete`) on transformers' loading report.

    transformers already leaves out a tied head the checkpoint omits and non-persistent buffers."""
    mismatched = [(k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys") or []]
    require_complete(
        model_dir,
        info.get("missing_keys") or [],
        info.get("unexpected_keys") or [],
        mismatched,
        expected_count=len(model.state_dict()),
        ignore_unexpected=ignorable_unexpected(model),
    )


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
