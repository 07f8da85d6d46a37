"""Training data: read (`sources`, `shapes`, `hf_datasets`), tokenise with loss masks
(`templates`), cache (`token_cache`), pack and batch (`packing`).

The names below are imported on first use, so that the recipe can import the light
`hf_datasets.DatasetSpec` without pulling in torch.
"""

from importlib import import_module

_HOMES = {
    "build_datasets": "build",
    "split_documents": "build",
    "IGNORE_INDEX": "packing",
    "BatchStream": "packing",
    "PackedData": "packing",
    "pack": "packing",
    "ChatSample": "samples",
    "PromptSample": "samples",
    "Sample": "samples",
    "TextSample": "samples",
    "read_samples": "sources",
    "Tokenized": "templates",
    "tokenize": "templates",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
