"""The family matrix: every row of rows.ROWS trained, merged, exported and run by the real consumers.

Per family, through the CLI (`greentune train`, `greentune export`):
- fp32 base, LoRA on [attn, mlp] (dense) or [attn, experts] (MoE), 4 steps with a ReLoRA
  merge after step 2; exported to GGUF f32 / q8_0 / q4_k_m and to MLX.
  llama.cpp (xllamacpp) on the f32 GGUF matches the merged PyTorch model within 1e-4 in
  log-probability (greedy, 12 tokens); on q8_0 / q4_k_m it matches PyTorch run on the GGUF's
  own dequantised weights (`gguf_inverse`) within row.q_atol (0.3 dense) — llama.cpp
  quantises activations to 8 bits there; for MoE on a prompt whose routing has no near-tie
  (`_untied_prompt`). mlx_lm loads the float32 MLX export and matches the merged model
  within row.mlx_atol (1e-4; 3e-4 for the hybrids, see rows._hybrid), and the CLI's 4-bit
  one within float16 rounding of PyTorch on its dequantised weights (row.mlx_q_frac of the
  largest logit: 0.05; 0.3 for the hybrids), and within 10 × row.mlx_atol once mlx_lm computes
  those same stored values in float32.
- q4_k base (Q4_K blocks trained on), 2 steps; `greentune export --quant q4_k_m` writes the
  trained base bytes unchanged, and llama.cpp runs the file as PyTorch does on its weights.

Gemma's GELU: ggml evaluates GELU through an f16 lookup table, which alone moves Gemma's
log-probabilities by ~2e-3; for those rows PyTorch evaluates GELU the same way
(`ggml_gelu`), which brings an untrained hidden-64 Gemma to 5e-5 and these hidden-256 ones
to ~3.5e-4 (row.f32_atol 5e-4; 2e-3 for the 6-layer Gemma-3, ~1e-3 measured). Gemma's ×sqrt(hidden) embedding
scale and soft-capping also magnify llama.cpp's 8-bit activation rounding in quantised files (row.q_atol
0.75). The Qwen3-Next / Qwen3.5 hybrids' delta net magnifies it far more (~1 in log-probability
from rounding alone: q·k of unit vectors that nearly cancel, per-head RMS-normalised after), so
for them PyTorch rounds its matmul inputs as llama.cpp does (`ggml_activations`, row.ggml_activations).

A row with `arch = None` has no GGUF export yet: `greentune export` says so in one line,
and the rest (training, MLX) is checked.
"""

from __future__ import annotations

import contextlib
import json

import gguf_inverse
import helpers
import numpy as np
import pytest
import torch
import yaml
from rows import ROWS

pytest.importorskip("xllamacpp", reason="llama.cpp binding (pip install xllamacpp, in the test extra)")
pytestmark = pytest.mark.slow

PROMPT = [5, 6, 7, 8, 9, 10, 40, 41]
N_GEN = 12
PARAMS = [pytest.param(r, id=r.model_type) for r in ROWS]


@contextlib.contextmanager
def ggml_gelu(enabled: bool):
    """Within: transformers' tanh-GELU rounds its input and output to f16 as ggml's table does."""
    import transformers.activations as acts

    if not enabled:
        yield
        return
    cls = acts.GELUTanh if hasattr(acts, "GELUTanh") else acts.PytorchGELUTanh
    original = cls.forward

    def forward(self, x):
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def _train(tmp_path, base, data, row, quant_base, steps, relora):
    from greentune.cli import main

    method = {
        "quant_base": quant_base,
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": row.targets},
    }
    if relora:
        method["relora"] = {"merge_every": 2, "optimizer_prune": 0.9, "restart_warmup": 1}
    train, held_out = data
    recipe = {
        "base_model": str(base),
        "data": {"train": str(train), "eval": str(held_out), "max_seq_len": 32},
        "method": method,
        "train": {"steps": steps, "batch_size": 2, "lr": 1e-3, "warmup": 1, "checkpoint_every": steps},
        "energy": {"measure_savings": False},
    }
    path = tmp_path / f"{quant_base}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / f"run-{quant_base}"
    assert main(["train", str(path), "--run-dir", str(run), "--quiet"]) == 0
    return run


def _export(run, fmt, quant, out):
    from greentune.cli import main

    assert main(["export", str(run), "--format", fmt, "--quant", quant, "--out", str(out)]) == 0
    return out


def _merged(run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()


def _untied_prompt(model, banned, llama, margin: float = 0.02) -> list[int]:
    """The first of a fixed series of 8-token prompts whose llama.cpp greedy continuation (the
    sequence that gets compared) routes no token, in PyTorch, within `margin` of a top-k
    boundary: there llama.cpp's 8-bit activation rounding may pick another expert, and
    everything after differs by more than rounding. (Judging by PyTorch's own continuation
    instead left the choice to the last bits of the trained weights: llama.cpp's continuation
    can leave it after a step or two and meet a near-tie there.)"""
    for start in range(5, 400, 8):
        ids = list(range(start, start + 8))
        ids += [g["id"] for g in llama.greedy(ids, N_GEN, banned)]
        if helpers.first_routing_tie(model, ids, margin) is None:
            return ids[:8]
    pytest.fail("every candidate prompt has a routing near-tie")


def _compare(path, model, banned, row, atol, quantised):
    moe_q = row.moe and quantised
    llama = helpers.Llama(path)
    try:
        prompt = _untied_prompt(model, banned, llama) if moe_q else PROMPT
        with ggml_gelu(row.model_type.startswith("gemma")):
            worst, agree, n = helpers.compare_with_torch(
                llama,
                model,
                prompt,
                banned,
                n=N_GEN,
                atol=atol,
                tie=atol,
                router_margin=0.02 if moe_q else None,
            )
    finally:
        llama.close()
    return worst, agree, n


@pytest.mark.parametrize("row", PARAMS)
def test_fp32_base_relora_to_gguf_and_mlx(tmp_path, row, family_base, small_data, banned):
    run = _train(tmp_path, family_base(row.model_type), small_data, row, "none", steps=4, relora=True)
    phases = [json.loads(line)["phase"] for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert phases.count("merge") >= 2, phases  # the ReLoRA merge and the final one
    merged = _merged(run)
    if row.arch is None:
        _gguf_refused(run, tmp_path)
        _check_mlx(run, merged, row, tmp_path)
        return

    f32 = _export(run, "gguf", "f32", tmp_path / "x") / "model-f32.gguf"
    meta, _, types = helpers.read_gguf(f32)
    assert meta["general.architecture"] == row.arch
    # transformers v5 loads the saved tokenizer as the family's class (Qwen2's and Qwen3.5's set
    # their own regex)
    assert meta["tokenizer.ggml.pre"] in ("gpt-2", "qwen2", "qwen35") and meta["tokenizer.chat_template"]
    assert meta["tokenizer.ggml.eos_token_id"] == merged.config.eos_token_id
    if row.moe:
        assert meta[f"{row.arch}.expert_count"] == 4 and meta[f"{row.arch}.expert_used_count"] == 2
    _, agree, _ = _compare(f32, merged, banned, row, row.f32_atol, quantised=False)
    assert agree == N_GEN
    assert (tmp_path / "x" / "model-f32.Modelfile").read_text().startswith("FROM ./model-f32.gguf")

    for quant in ("q8_0", "q4_k_m"):
        path = _export(run, "gguf", quant, tmp_path / "x") / f"model-{quant}.gguf"
        _, _, types = helpers.read_gguf(path)
        assert types[_first_attn_output(types)] == {"q8_0": "Q8_0", "q4_k_m": "Q4_K"}[quant]
        _compare(
            path,
            gguf_inverse.hf_model_from_gguf(path, run / "merged", row),
            banned,
            row,
            row.q_atol,
            quantised=True,
        )

    _check_mlx(run, merged, row, tmp_path)


def _first_attn_output(names, start: int = 0) -> str:
    """`blk.N.attn_output.weight` of the first full-attention layer from `start` (the hybrids'
    first layers are delta nets, without one)."""
    return next(
        f"blk.{i}.attn_output.weight" for i in range(start, 64) if f"blk.{i}.attn_output.weight" in names
    )


def _gguf_refused(run, tmp_path):
    from greentune.cli import main

    out = tmp_path / "x"
    assert main(["export", str(run), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 2
    assert not out.exists() or not list(out.glob("*.gguf"))


def _check_mlx(run, merged, row, tmp_path):
    from greentune.cli import main
    from greentune.export import write_mlx

    if not row.mlx:
        out = tmp_path / "m"
        assert main(["export", str(run), "--format", "mlx", "--quant", "4bit", "--out", str(out)]) == 2
        assert not out.exists() or not list(out.iterdir())
        return

    out = _export(run, "mlx", "4bit", tmp_path / "m") / "model-mlx-4bit"
    exact = write_mlx(run / "merged", tmp_path / "mlx-f32", bits=None, dtype="float32")
    try:
        import mlx.core as mx
        from mlx_lm import load
    except ImportError:
        return
    with torch.no_grad():
        want = merged(torch.tensor([PROMPT])).logits[0].numpy()
    model, _ = load(str(exact))
    got = np.array(model(mx.array([PROMPT])).astype(mx.float32))[0]
    np.testing.assert_allclose(got, want, atol=row.mlx_atol, rtol=0)
    model, _ = load(str(out))
    got4 = np.array(model(mx.array([PROMPT])).astype(mx.float32))[0]
    with torch.no_grad():
        want4 = gguf_inverse.hf_model_from_mlx(out, run / "merged")(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(want4 - want).max() > 0.05  # 4 bits do change the model ...
    scale = np.abs(want4).max()
    np.testing.assert_allclose(got4, want4, atol=row.mlx_q_frac * scale, rtol=0)  # ... mlx runs them
    model.set_dtype(mx.float32)  # the same stored values, computed in float32: no float16 rounding
    got4 = np.array(model(mx.array([PROMPT])).astype(mx.float32))[0]
    np.testing.assert_allclose(got4, want4, atol=10 * row.mlx_atol, rtol=0)


@pytest.mark.parametrize("row", PARAMS)
def test_q4_k_base_ships_its_training_bytes(tmp_path, row, family_base, small_data, banned):
    from gguf import GGUFReader
    from safetensors import safe_open

    run = _train(tmp_path, family_base(row.model_type), small_data, row, "q4_k", steps=2, relora=False)
    if row.arch is None:
        _gguf_refused(run, tmp_path)
        return
    path = _export(run, "gguf", "q4_k_m", tmp_path / "x") / "model-q4_k_m.gguf"
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    gname = _first_attn_output(tensors, start=1)
    with safe_open(str(run / "trained-base.safetensors"), "pt") as f:
        name = f"model.layers.{gname.split('.')[1]}.self_attn.o_proj.weight"
        assert f.metadata()[name] == "Q4_K"
        trained = f.get_tensor(name).numpy()
    written = np.asarray(tensors[gname].data).view(np.uint8).reshape(trained.shape)
    assert np.array_equal(written, trained)
    _compare(
        path,
        gguf_inverse.hf_model_from_gguf(path, run / "merged", row),
        banned,
        row,
        row.q_atol,
        quantised=True,
    )
