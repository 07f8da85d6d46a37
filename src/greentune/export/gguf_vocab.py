"""Tokenizer metadata for GGUF: what llama.cpp needs to tokenize exactly like the HF tokenizer.

Two tokenizer families are written:

- **byte-level BPE** (GPT-2, Llama-3, Qwen2, greentune's own) → `tokenizer.ggml.model = "gpt2"`
  with `tokens` (the byte-to-unicode strings of tokenizer.json, in id order), `token_type`,
  `merges` ("a b") and `tokenizer.ggml.pre`;
- **SentencePiece-style** (BPE with byte fallback and a "▁" space marker, as Llama-2 and
  Mistral ship in tokenizer.json; or Unigram) → `"llama"` with `scores`. For BPE the score
  of a token is −(rank of the merge that creates it), so llama.cpp's SPM tokenizer, which
  repeatedly merges the adjacent pair whose result scores highest, applies the merges in
  the same order as HF; for Unigram the score is the piece's log-probability (llama.cpp's
  "llama" tokenizer then merges greedily by score, as for SentencePiece BPE, which is not
  Unigram's Viterbi search: tokenization of Unigram vocabularies can differ).

`tokenizer.ggml.pre` (how llama.cpp splits text before BPE) is decided from the
tokenizer's *structure*, not its vocabulary: llama.cpp's own converter hashes the token
ids of a test string, which only recognises published tokenizers, never one trained by the
user. greentune reads tokenizer.json's `pre_tokenizer`:
  - `ByteLevel(use_regex=true)` alone → "gpt-2" (llama.cpp applies the same GPT-2 regex);
  - `Sequence[Split(regex R), ByteLevel(use_regex=false)]` → looked up in `PRE_BY_REGEX`
    (Llama-3's regex → "llama-bpe", Qwen2's → "qwen2", Qwen3.5's → "qwen35", gpt-oss's
    o200k → "gpt-4o");
  - `Sequence[Split(R1), Split(R2), Split(R3), ByteLevel(use_regex=false)]` with DeepSeek-V3's
    three regexes → "deepseek-v3" (`PRE_BY_SPLITS`).
Anything else raises `UserError` naming the fix (pass `tokenizer_pre=`), because a wrong
name silently tokenizes differently in llama.cpp, Ollama and LM Studio.

Token types: 1 normal, 2 unknown, 3 control (special added tokens: BOS/EOS/PAD, chat
markers), 4 user-defined (non-special added tokens), 5 unused (padding up to the
embedding's row count), 6 byte (`<0xNN>` in SentencePiece vocabularies).
"""

from __future__ import annotations

import json
import logging
import re

from gguf import GGUFWriter, TokenType

from greentune.errors import UserError

log = logging.getLogger(__name__)

LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# Qwen3.5's: Qwen2's with marks (\p{M}) kept inside words; llama.cpp "qwen35"
QWEN35_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
# gpt-oss's o200k_harmony (tiktoken's o200k_base split, as its tokenizer.json spells it): llama.cpp "gpt-4o"
O200K_REGEX = (
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
PRE_BY_REGEX = {
    LLAMA3_REGEX: "llama-bpe",
    QWEN2_REGEX: "qwen2",
    QWEN35_REGEX: "qwen35",
    GPT2_REGEX: "gpt-2",
    O200K_REGEX: "gpt-4o",
}
# DeepSeek-V3's three isolating splits (digits in threes, CJK runs, then words/punctuation), the
# regexes of llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM ("deepseek-v3")
DEEPSEEK3_REGEXES = (
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
PRE_BY_SPLITS = {DEEPSEEK3_REGEXES: "deepseek-v3"}


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"GGUF export needs a fast tokenizer (tokenizer.json); got {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def detect_pre(tj: dict) -> str:
    """llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json (see module docstring)."""
    pre = tj.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"  # llama.cpp's BPE never adds a prefix space, so that variant is refused
    if kind == "Sequence":
        items = pre.get("pretokenizers", [])
        if (
            len(items) == 2
            and items[0].get("type") == "Split"
            and items[1].get("type") == "ByteLevel"
            and not items[1].get("use_regex", True)
        ):
            pattern = items[0].get("pattern", {})
            regex = pattern.get("Regex", pattern.get("String"))
            if regex in PRE_BY_REGEX:
                return PRE_BY_REGEX[regex]
        splits = tuple(_split_regex(p) for p in items[:-1])
        if (
            len(items) > 2
            and items[-1].get("type") == "ByteLevel"
            and not items[-1].get("use_regex", True)
            and splits in PRE_BY_SPLITS
        ):
            return PRE_BY_SPLITS[splits]
    raise UserError(
        "cannot tell which llama.cpp pre-tokenizer matches this tokenizer's pre_tokenizer "
        f"({json.dumps(pre)[:120]}...); pass tokenizer_pre=NAME (e.g. 'gpt-2', 'llama-bpe', 'qwen2')"
    )


def _split_regex(item: dict) -> str | None:
    """The regex of an isolating, non-inverted `Split` pre-tokenizer, else None."""
    if item.get("type") != "Split" or item.get("invert") or item.get("behavior", "Isolated") != "Isolated":
        return None
    return item.get("pattern", {}).get("Regex")


def _is_spm(tj: dict) -> bool:
    model = tj.get("model", {})
    if model.get("type") == "Unigram":
        return True
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _merge_pairs(merges) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _tokens_by_id(tj: dict, tokenizer) -> dict[int, str]:
    model = tj["model"]
    by_id: dict[int, str] = {}
    if model["type"] == "Unigram":
        for i, (piece, _score) in enumerate(model["vocab"]):
            by_id[i] = piece
    else:
        for tok, i in model["vocab"].items():
            by_id[int(i)] = tok
    for a in tj.get("added_tokens", []):
        by_id[int(a["id"])] = a["content"]
    return by_id


def end_tokens(tokenizer) -> list[str]:
    """Strings that end a turn: EOS plus the special token the chat template puts after a message."""
    out = []
    if tokenizer.eos_token:
        out.append(tokenizer.eos_token)
    after = _token_after_content(tokenizer)
    if after and after not in out:
        out.append(after)
    return out


def _token_after_content(tokenizer) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\u2063greentune\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 — a template that fails here simply gives no end token
        return None
    rest = text.split(marker, 1)[1] if marker in text else ""
    specials = {str(v) for v in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    specials = sorted(specials | set(tokenizer.all_special_tokens), key=len, reverse=True)
    rest = rest.lstrip(" ")
    for s in specials:
        if s and rest.startswith(s):
            return s
    return None


def add_vocab(w: GGUFWriter, tokenizer, n_vocab: int, pre: str | None = None) -> dict:
    """Write `tokenizer.*` keys for `tokenizer` padded to `n_vocab` tokens; return a summary dict."""
    tj = tokenizer_json(tokenizer)
    by_id = _tokens_by_id(tj, tokenizer)
    if max(by_id) >= n_vocab:
        raise UserError(f"tokenizer has token id {max(by_id)} but the embedding has only {n_vocab} rows")
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    spm = _is_spm(tj)
    unk_id = tokenizer.unk_token_id

    tokens, types, scores = [], [], []
    rank = {}
    if spm and tj["model"]["type"] == "BPE":
        for r, (a, b) in enumerate(_merge_pairs(tj["model"].get("merges", []))):
            rank.setdefault(a + b, r)
    unigram = (
        {i: s for i, (_p, s) in enumerate(tj["model"]["vocab"])} if tj["model"]["type"] == "Unigram" else {}
    )
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            scores.append(-1e4)
            continue
        tokens.append(tok)
        if spm and i == unk_id:
            types.append(TokenType.UNKNOWN)
        elif i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif i == unk_id:
            types.append(TokenType.UNKNOWN)
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
        if unigram:
            scores.append(float(unigram.get(i, -1e4)))
        else:
            scores.append(-float(rank[tok]) if tok in rank else 0.0)

    if spm:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(_adds_space_prefix(tj))
        if unk_id is not None:
            w.add_unk_token_id(unk_id)
    else:
        pre = pre or detect_pre(tj)
        merges = [f"{a} {b}" for a, b in _merge_pairs(tj["model"].get("merges", []))]
        if not merges:
            raise UserError("byte-level BPE tokenizer has no merges; llama.cpp cannot tokenize with it")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)

    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    if ids["bos"] is not None:
        w.add_bos_token_id(ids["bos"])
    if ids["eos"] is not None:
        w.add_eos_token_id(ids["eos"])
    if ids["pad"] is not None:
        w.add_pad_token_id(ids["pad"])
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = ids["bos"] is not None and len(probe) > 0 and probe[0] == ids["bos"]
    add_eos = ids["eos"] is not None and len(probe) > 0 and probe[-1] == ids["eos"]
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    ends = end_tokens(tokenizer)
    eot = None
    if len(ends) > 1:
        eot = tokenizer.convert_tokens_to_ids(ends[1])
        w.add_eot_token_id(eot)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)
    return {
        "model": "llama" if spm else "gpt2",
        "pre": None if spm else pre,
        "n_tokens": len(tokens),
        "add_bos": add_bos,
        "eot": eot,
    }


def _adds_space_prefix(tj: dict) -> bool:
    """Whether the SentencePiece normaliser/pre-tokenizer prepends "▁" (Llama-2 style): a
    `Prepend("▁")` normaliser, or a `Metaspace` pre-tokenizer with prepend_scheme always/first."""
    blob = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    return (
        '"Prepend"' in blob
        or '"prepend_scheme": "always"' in blob
        or '"prepend_scheme": "first"' in blob
        or '"add_prefix_space": true' in blob
    )
