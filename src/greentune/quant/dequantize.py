"""Back from the quantised training form to plain float modules, keeping the block bytes.

After training (and merging the adapters into the quantised base, which re-quantises in
place), the run needs two things from the same weights:

* a plain float model for `merged/` (HF safetensors that transformers loads), and
* the exact GGUF block bytes the base was trained in, so the GGUF export writes them byte
  for byte instead of quantising a second time ("train on what you ship").

`dequantize_model_` does both in one pass: it swaps every `QuantLinear` for an `nn.Linear`,
every `QuantEmbedding` for an `nn.Embedding`, every `QuantExperts3D` for a frozen 3D
parameter, and a `QuantTiedHead` for an `nn.Linear` sharing the new embedding's weight (tied
again, as transformers ties them), and returns the bytes keyed by the float model's own
state-dict names (a tied pair's bytes once, under the embedding: GGUF's tied models store
only `token_embd`).
"""

from __future__ import annotations

import torch
from torch import nn

from greentune.quant.embedding import QuantEmbedding, QuantTiedHead
from greentune.quant.experts import QuantExperts3D
from greentune.quant.linear import QuantLinear


@torch.no_grad()
def dequantize_model_(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, tuple]:
    """Replace quantised modules by float ones in place; return {state-dict name: (ggml_type, uint8 bytes)}.

    Weights whose format has no GGUF type (NF4) are dequantised but not returned.
    """
    packed: dict[str, tuple] = {}
    embeddings: dict[int, nn.Embedding] = {}  # id(QuantEmbedding) → its replacement
    tied_heads: list[tuple[nn.Module, str, QuantTiedHead]] = []
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, QuantLinear):
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.qweight.device,
                dtype=dtype,
            )
            linear.weight.copy_(module.dequantize().to(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
            linear.requires_grad_(False)
            if module.fmt.ggml_type is not None:
                packed[f"{name}.weight"] = (module.fmt.ggml_type, module.raw_bytes().detach().cpu().clone())
            setattr(parent, leaf, linear)
        elif isinstance(module, QuantEmbedding):
            emb = nn.Embedding(
                module.num_embeddings,
                module.embedding_dim,
                padding_idx=module.padding_idx,
                device=module.qweight.device,
                dtype=dtype,
            )
            emb.weight.copy_(module.dequantize().to(dtype))
            emb.requires_grad_(False)
            if module.fmt.ggml_type is not None:
                packed[f"{name}.weight"] = (module.fmt.ggml_type, module.raw_bytes().detach().cpu().clone())
            embeddings[id(module)] = emb
            setattr(parent, leaf, emb)
        elif isinstance(module, QuantTiedHead):
            tied_heads.append((parent, leaf, module))
        elif isinstance(module, QuantExperts3D):
            w = module.dequantize().to(dtype)
            if getattr(parent, "is_transposed", False):  # gpt-oss: back to HF's [E, in, out]
                w = w.transpose(1, 2).contiguous()
            weight = nn.Parameter(w, requires_grad=False)
            if module.fmt.ggml_type is not None:
                packed[name] = (module.fmt.ggml_type, module.qweight.detach().cpu().clone())
            del parent._modules[leaf]
            if hasattr(parent, "_set"):  # greentune.moe.SparseExperts
                parent._set(leaf, weight)
            else:
                parent.register_parameter(leaf, weight)
    for parent, leaf, head in tied_heads:
        emb = embeddings.get(id(head.embedding))
        if emb is None:  # the embedding is not in `model`: untie
            emb = nn.Embedding(head.out_features, head.in_features, device=head.qweight.device, dtype=dtype)
            emb.weight.copy_(head.dequantize().to(dtype))
        linear = nn.Linear(
            head.in_features, head.out_features, bias=False, device=emb.weight.device, dtype=dtype
        )
        linear.weight = emb.weight
        linear.requires_grad_(False)
        setattr(parent, leaf, linear)
    return packed
