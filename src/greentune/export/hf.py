"""HF export: a merged Hugging Face folder (config + safetensors + tokenizer) plain transformers loads.

`write_hf(source, out_dir)` accepts a model directory (validated, then its safetensors,
config, generation config, tokenizer and chat-template files are copied) or an in-memory
model with its tokenizer (`save_pretrained` with safetensors). Pickled weights
(`*.bin`, `*.pt`) are never read or copied. The folder is written atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from greentune.errors import UserError
from greentune.fsutil import atomic_dir

log = logging.getLogger(__name__)

COPY = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors.index.json",
)


def validate_hf_dir(model_dir: str | Path) -> list[Path]:
    """Check `model_dir` is a loadable HF folder; return its safetensors files."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{model_dir}/config.json is not valid JSON: {e}") from None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no *.safetensors weights (greentune never copies pickles)")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing = sorted(wanted - {f.name for f in files})
        if missing:
            raise UserError(f"{model_dir} lacks shard {missing[0]} named in model.safetensors.index.json")
    return files


def write_hf(model, out_dir: str | Path, *, tokenizer=None) -> Path:
    """Write a merged HF folder at `out_dir`; return its path.

    Args:
        model: a model directory, or an in-memory `transformers` model (adapters merged).
        tokenizer: the tokenizer to save with an in-memory model (required then).
    """
    out_dir = Path(out_dir)
    if isinstance(model, (str, Path)):
        src = Path(model)
        files = validate_hf_dir(src)
        if src.resolve() == out_dir.resolve():
            return out_dir
        with atomic_dir(out_dir) as tmp:
            for f in files:
                shutil.copy2(f, tmp / f.name)
            for name in COPY:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
        log.info("copied HF model %s → %s", src, out_dir)
        return out_dir
    if tokenizer is None:
        raise UserError("writing an in-memory model as HF needs its tokenizer (tokenizer=...)")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.info("saved HF model → %s", out_dir)
    return out_dir
