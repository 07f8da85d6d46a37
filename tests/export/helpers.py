"""Test helpers: read a GGUF back into an HF model, run it in llama.cpp, make models with structure.

`hf_model_from_gguf` is an independent inverse of the exporter: it dequantises every tensor
with `gguf.quants.dequantize` (the reference), undoes the q/k permutation and unstacks
experts, so PyTorch computes with exactly the weights llama.cpp sees.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch


def scale_weights(model_dir: Path, out_dir: Path, factor: float = 8.0, seed: int = 0):
    """Copy an HF dir with all matrices scaled by `factor` (std 0.02 → 0.16): logits are then
    spread out enough that greedy decoding is not a chain of near-ties."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.mul_(factor)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):  # Qwen2's q/k/v biases: make them matter
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    idx = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)
    inv = np.empty_like(idx)
    inv[idx] = np.arange(rows)
    return w[inv]


def read_gguf(path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """(metadata dict, dequantised float32 tensors in numpy order, GGML type name per tensor)."""
    from gguf import GGUFReader, GGUFValueType
    from gguf.quants import dequantize

    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        if f.types and f.types[0] == GGUFValueType.ARRAY:
            meta[k] = f.contents() if len(f.data) < 100_000 else f"<array {len(f.data)}>"
        else:
            meta[k] = f.contents()
    tensors, types = {}, {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        arr = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        tensors[t.name] = arr
        types[t.name] = t.tensor_type.name
    return meta, tensors, types


def hf_model_from_gguf(path, model_dir):
    """The HF model of `model_dir` with its weights replaced by the GGUF's (dequantised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    meta, t, _ = read_gguf(path)
    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    sd = {
        "model.embed_tokens.weight": t["token_embd.weight"],
        "model.norm.weight": t["output_norm.weight"],
        "lm_head.weight": t.get("output.weight", t["token_embd.weight"]),
    }
    for i in range(cfg.num_hidden_layers):
        b, p = f"blk.{i}", f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = t[f"{b}.attn_norm.weight"]
        sd[f"{p}.post_attention_layernorm.weight"] = t[f"{b}.ffn_norm.weight"]
        sd[f"{p}.self_attn.q_proj.weight"] = _unpermute(t[f"{b}.attn_q.weight"], nh)
        sd[f"{p}.self_attn.k_proj.weight"] = _unpermute(t[f"{b}.attn_k.weight"], nkv)
        sd[f"{p}.self_attn.v_proj.weight"] = t[f"{b}.attn_v.weight"]
        sd[f"{p}.self_attn.o_proj.weight"] = t[f"{b}.attn_output.weight"]
        for g, h, heads in (("attn_q", "q_proj", nh), ("attn_k", "k_proj", nkv), ("attn_v", "v_proj", None)):
            if f"{b}.{g}.bias" in t:
                v = t[f"{b}.{g}.bias"]
                sd[f"{p}.self_attn.{h}.bias"] = _unpermute(v, heads) if heads else v
        if f"{b}.ffn_gate_exps.weight" in t:
            sd[f"{p}.mlp.gate.weight"] = t[f"{b}.ffn_gate_inp.weight"]
            sd[f"{p}.mlp.experts.gate_up_proj"] = np.concatenate(
                [t[f"{b}.ffn_gate_exps.weight"], t[f"{b}.ffn_up_exps.weight"]], axis=1
            )
            sd[f"{p}.mlp.experts.down_proj"] = t[f"{b}.ffn_down_exps.weight"]
        else:
            sd[f"{p}.mlp.gate_proj.weight"] = t[f"{b}.ffn_gate.weight"]
            sd[f"{p}.mlp.up_proj.weight"] = t[f"{b}.ffn_up.weight"]
            sd[f"{p}.mlp.down_proj.weight"] = t[f"{b}.ffn_down.weight"]
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False
    )
    assert not unexpected, unexpected
    assert not [m for m in missing if "rotary" not in m], missing
    return model


class Llama:
    """One llama.cpp (xllamacpp) server on a GGUF file, in process. f32 KV cache, 2 threads."""

    def __init__(self, path, n_ctx: int = 128):
        import xllamacpp as x

        p = x.CommonParams()
        p.model.path = str(path)
        p.n_ctx = n_ctx
        p.cpuparams.n_threads = 2
        p.cpuparams_batch.n_threads = 2
        p.cache_type_k = x.ggml_type.GGML_TYPE_F32
        p.cache_type_v = x.ggml_type.GGML_TYPE_F32
        p.warmup = False
        # flash attention on CPU rounds Q·K through f16: off, so f32 exports compare at ~1e-4
        p.flash_attn_type = x.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            self.server = x.Server(p)

    def greedy(self, prompt_ids: list[int], n: int, banned: list[int] = (), n_probs: int = 5) -> list[dict]:
        """Greedy continuation: per generated token {id, logprob, top: {id: logprob}}.

        `banned` ids get a −inf bias (sampling only: the reported log-probabilities are
        llama.cpp's raw ones). Ban end-of-generation tokens and tokens that are not whole
        UTF-8 sequences: the server merges those into the next token's entry.
        """
        r = self.server.handle_completions(
            {
                "prompt": list(prompt_ids),
                "max_tokens": n,
                "temperature": 0,
                "n_probs": n_probs,
                "cache_prompt": False,
                "logit_bias": [[int(b), False] for b in banned],
            }
        )
        if "choices" not in r:
            raise RuntimeError(json.dumps(r)[:500])
        out = []
        for c in r["choices"][0]["logprobs"]["content"]:
            out.append(
                {
                    "id": c["id"],
                    "logprob": c["logprob"],
                    "top": {d["id"]: d["logprob"] for d in c["top_logprobs"]},
                }
            )
        return out

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's tokenization of `text` (the server's /tokenize endpoint on loopback)."""
        import urllib.request

        addr = self.server.listening_address
        addr = addr() if callable(addr) else addr
        req = urllib.request.Request(
            f"{addr}/tokenize",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"content": text, "add_special": add_special}).encode(),
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["tokens"]

    def close(self):
        del self.server


def banned_ids(tokenizer) -> list[int]:
    """Special tokens and tokens that do not decode to whole UTF-8 on their own."""
    bad = {i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])}
    bad |= {int(i) for i in tokenizer.added_tokens_decoder}
    return sorted(bad)


def first_routing_tie(model, ids: list[int], margin: float) -> int | None:
    """First position where some MoE layer's k-th and (k+1)-th router logits are within `margin`.

    There llama.cpp (whose quantised matmuls also round the activations to 8 bits) may pick
    another expert than PyTorch; that position and, through attention, every later one may
    then differ by far more than rounding. None for dense models or when no such position.
    """
    gaps, hooks = [], []
    for layer in model.model.layers:
        moe = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        gate = getattr(moe, "gate", None) or getattr(moe, "router", None)  # GraniteMoE/PhiMoE: router
        if gate is None or not hasattr(gate, "top_k"):
            continue
        k = gate.top_k
        if hasattr(gate, "e_score_correction_bias"):  # sigmoid + bias, group-limited (DeepSeek, GLM)
            hooks.append(
                gate.register_forward_hook(lambda mod, inp, out: gaps.append(_grouped_gap(mod, out[0])))
            )
            continue
        hooks.append(
            gate.register_forward_hook(
                lambda mod, inp, out, k=k: gaps.append(
                    (lambda s: s[:, k - 1] - s[:, k])(
                        out[0].detach().float().sort(-1, descending=True).values
                    )
                )
            )
        )
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    if not gaps:
        return None
    close = (torch.stack(gaps).min(0).values < margin).nonzero()
    return int(close[0, 0]) if len(close) else None


def _grouped_gap(gate, logits: torch.Tensor) -> torch.Tensor:
    """Per row, the smaller of two selection margins of a sigmoid, bias-corrected, group-limited
    router: between the topk_group-th and next group score, and between the k-th and next
    expert score within the chosen groups (the scores llama.cpp compares too)."""
    s = logits.detach().float().sigmoid() + gate.e_score_correction_bias.float()
    n, groups = s.shape[0], gate.num_group
    per = s.view(n, groups, -1)
    gap = torch.full((n,), float("inf"))
    if gate.topk_group < groups:
        gs = per.topk(2, dim=-1).values.sum(-1).sort(-1, descending=True).values
        gap = gs[:, gate.topk_group - 1] - gs[:, gate.topk_group]
    chosen = per.topk(2, dim=-1).values.sum(-1).topk(gate.topk_group, dim=-1).indices
    mask = torch.zeros(n, groups, dtype=torch.bool).scatter_(1, chosen, True)
    allowed = s.masked_fill(~mask.repeat_interleave(per.shape[-1], 1), float("-inf"))
    top = allowed.sort(-1, descending=True).values
    k = gate.top_k
    within = top[:, k - 1] - top[:, k] if top.shape[1] > k else torch.full((n,), float("inf"))
    return torch.minimum(
        gap, torch.where(torch.isfinite(within), within, torch.full_like(within, float("inf")))
    )


def compare_with_torch(
    llama: Llama,
    model,
    prompt: list[int],
    banned: list[int],
    n: int = 20,
    atol: float = 1e-3,
    tie: float = 1e-3,
    router_margin: float | None = None,
):
    """Greedy-decode in llama.cpp, teacher-force the same ids through `model`, compare.

    Returns (max |Δ logprob| over the top candidates, exact top-1 agreements, steps compared).
    Asserts every llama.cpp choice is PyTorch's argmax or within `tie` of it. With
    `router_margin`, steps from the first MoE routing near-tie on are not compared (and at
    least 6 steps must remain).
    """
    gen = llama.greedy(prompt, n, banned)
    assert len(gen) == n, len(gen)
    ids = prompt + [g["id"] for g in gen]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    allowed = torch.ones(logp.shape[-1], dtype=torch.bool)
    allowed[list(banned)] = False
    worst, agree = 0.0, 0
    if router_margin is not None:
        stop = first_routing_tie(model, ids, router_margin)
        if stop is not None:
            gen = gen[: max(0, stop - len(prompt) + 1)]
            assert len(gen) >= 6, f"routing near-tie at position {stop}: too few steps left to compare"
    for j, g in enumerate(gen):
        row = logp[len(prompt) - 1 + j]
        for tid, lp in g["top"].items():
            worst = max(worst, abs(float(row[tid]) - lp))
        best = int(torch.where(allowed, row, -torch.inf).argmax())
        if best == g["id"]:
            agree += 1
        else:
            assert float(row[best] - row[g["id"]]) <= tie, (j, best, g["id"], float(row[best] - row[g["id"]]))
    assert worst <= atol, worst
    return worst, agree, len(gen)
