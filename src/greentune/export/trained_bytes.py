"""The quantised base's block bytes as training used them, kept beside the run.

A base trained in a GGUF block format (q8_0, q4_0, q4_k) is exported in that format from
these bytes, byte for byte, instead of being quantised a second time: "train on what you
ship" (`formats.reuses_training_bytes`). The file (`RunDir.trained_bytes`) is safetensors of uint8 blocks with
each tensor's GGML type in the metadata.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
from safetensors import safe_open
from safetensors.torch import save_file

from greentune.errors import UserError, user_os_error
from greentune.faults import maybe_fault
from greentune.fsutil import fsync_dir, temp_file_beside
from greentune.models.safetensors_header import read_header


def save_trained_bytes(path: Path, packed: dict[str, tuple]) -> None:
    """The quantised base's block bytes (uint8) with their GGML types in the metadata. Written
    from the tensors to a temporary file and renamed (no in-memory copy of the whole file)."""
    tensors = {k: v.contiguous() for k, (_, v) in packed.items()}
    tmp = temp_file_beside(path)
    try:
        save_file(tensors, str(tmp), metadata={k: t.name for k, (t, _) in packed.items()})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        maybe_fault(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise user_os_error(err, path) from None
        raise
    fsync_dir(path.parent)


def load_trained_bytes(path: Path) -> dict[str, tuple]:
    header = read_header(path)  # a corrupt file is one line naming it
    unknown = [
        k for k in header.tensors if header.metadata.get(k) not in gguf.GGMLQuantizationType.__members__
    ]
    if unknown:
        raise UserError(f"{path}: corrupt training bytes (no GGML type for {unknown[0]})")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        return {k: (gguf.GGMLQuantizationType[meta[k]], f.get_tensor(k)) for k in f.keys()}
