"""The planner's serving projection: the arithmetic against hand-computed values, GGUF profiles, `plan`
output."""

from __future__ import annotations

import math

import pytest

from greentune.plan.hardware import find_hardware
from greentune.plan.inference import InferenceProfile, profile_from_facts, profile_from_gguf, project


def test_projection_arithmetic_apple_m2():
    """Apple M2: 100 GB/s, 3.6 TFLOP/s, 50 W (catalogue). A 1 GB-per-token model, 256 + 128 tokens."""
    prof = InferenceProfile(
        "m",
        "q4_0",
        weight_bytes_per_token=1.0e9,
        kv_bytes_per_context_token=1.0e5,
        matmul_params=2.0e9,
        attn_flops_per_context_token=1.0e4,
        file_bytes=1.2e9,
    )
    p = project(prof, find_hardware("M2"), prompt_tokens=256, gen_tokens=128)
    # decode: bytes = 1e9 + 1e5 × (256 + 64) = 1.032e9 B; ÷ 100e9 B/s = 10.32 ms  (FLOPs: 4.0032e9 / 3.6e12 =
    # 1.1 ms)
    assert p.decode_bound == "memory"
    assert math.isclose(p.decode_tokens_per_s, 1 / 0.01032, rel_tol=1e-9)
    assert math.isclose(p.decode_j_per_token, 50 * 0.01032, rel_tol=1e-9)
    assert math.isclose(p.j_per_1k_generated, 516.0, rel_tol=1e-9)
    # prompt: 256 × (4e9 + 1e4 × 128.5) FLOPs ÷ (0.5 × 3.6e12) = 0.56907 s → 449.86 tokens/s
    t = 256 * (4.0e9 + 1.0e4 * 128.5) / 1.8e12
    assert math.isclose(p.prompt_tokens_per_s, 256 / t, rel_tol=1e-9)
    assert math.isclose(p.prompt_j_per_token, 50 * t / 256, rel_tol=1e-9)
    assert p.fits and p.basis == "modelled"


def test_profile_of_facts_by_hand():
    """Llama-shaped facts, f16, untied: body weights + the head in full + one embedding row per token."""
    from greentune.models.facts import arch_facts
    from greentune.models.tiny import tiny_config

    f = arch_facts(
        tiny_config("llama", vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    )
    per_layer = (
        64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    )  # q, o; k, v (2 KV heads × 16); mlp; 2 norms
    body = 2 * per_layer + 64  # + final norm
    prof = profile_from_facts(f, "f16")
    assert prof.weight_bytes_per_token == pytest.approx(2 * (body + 512 * 64 + 64))
    assert prof.kv_bytes_per_context_token == 2 * 2 * 2 * (16 + 16)
    assert prof.attn_flops_per_context_token == 2 * 2 * 4 * (16 + 16)


def test_gguf_profile_reads_only_routed_experts(tmp_path, tiny_llama_dir, tiny_mixtral_dir):
    """Dense f16 file: the profile agrees with the nominal one; Mixtral (4 experts, top-2): half the expert
    bytes in place of the dense MLP, plus the f32 router."""
    from greentune.export.gguf import export_gguf
    from greentune.models.facts import arch_facts, load_config_dict

    dense = profile_from_gguf(export_gguf(tiny_llama_dir, tmp_path / "dense.gguf", "f16").path)
    nominal = profile_from_facts(arch_facts(load_config_dict(tiny_llama_dir)), "f16")
    assert dense.weight_bytes_per_token == pytest.approx(nominal.weight_bytes_per_token, rel=0.01)
    assert dense.matmul_params == nominal.matmul_params
    moe_summary = export_gguf(tiny_mixtral_dir, tmp_path / "moe.gguf", "f16")
    moe = profile_from_gguf(moe_summary.path)
    from gguf import GGUFReader

    exps = sum(t.n_bytes for t in GGUFReader(str(moe_summary.path)).tensors if "_exps." in t.name)
    assert moe.weight_bytes_per_token == pytest.approx(
        dense.weight_bytes_per_token + exps / 2 - 2 * 3 * 64 * 128 * 2 + 2 * 4 * 64 * 4, rel=0.01
    )


def test_plan_prints_serving_beside_training(capsys):
    from greentune.plan.command import plan_command

    assert plan_command(["--model", "llama-3.1-8b", "--hardware", "H100"]) == 0
    out = capsys.readouterr().out
    assert "serving the exported model (q4_k_m" in out
    for device in ("Apple M2", "Apple M3", "Apple M4", "NVIDIA H100 SXM5 80GB"):
        assert device in out.split("serving the exported model")[1]


def test_effective_bandwidth_inverts_the_memory_term():
    """Calibrating on a measured decode and projecting the same model gives the measured rate back."""
    from greentune.plan.inference import effective_bandwidth_gbs

    prof = InferenceProfile("m", "q8_0", 5.0e7, 1.0e4, 5.0e7, 1.0e3, 5.5e7)
    bw = effective_bandwidth_gbs(prof, 200.0, 256, 64)
    assert bw == pytest.approx((5.0e7 + 1.0e4 * 288) * 200.0 / 1e9)
    p = project(prof, find_hardware("laptop"), 256, 64, bandwidth_gbs=bw)
    assert p.decode_bound == "memory" and p.decode_tokens_per_s == pytest.approx(200.0)


def test_plan_json_has_serving(capsys):
    import json

    from greentune.plan.command import plan_command

    assert plan_command(["--model", "llama-3.1-8b", "--hardware", "M2 Max", "--json"]) == 0
    serving = json.loads(capsys.readouterr().out)["serving"]
    assert serving["profile"]["format"] == "q4_k_m"
    devices = [p["device"] for p in serving["projections"]]
    assert devices == ["Apple M2", "Apple M3", "Apple M4", "Apple M2 Max"]
    assert all(p["basis"] == "modelled" and p["decode_tokens_per_s"] > 0 for p in serving["projections"])


def test_a_stored_streaming_rate_calibrates_the_plan_for_that_device(capsys, monkeypatch, tmp_path):
    """`greentune plan` projects a device with the rate a llama.cpp decode measured there, others from the
    catalogue."""
    import json

    monkeypatch.setenv("GREENTUNE_CACHE", str(tmp_path / "cache"))
    from greentune.plan.calibrate import store_streaming_rate
    from greentune.plan.command import plan_command

    h100 = find_hardware("H100")
    store_streaming_rate(h100, "q4_k_m", 123.0, threads=4)
    assert plan_command(["--model", "llama-3.1-8b", "--hardware", "H100", "--json"]) == 0
    serving = json.loads(capsys.readouterr().out)["serving"]
    by_device = {p["device"]: p for p in serving["projections"]}
    assert by_device[h100.name]["bandwidth_gbs"] == pytest.approx(123.0)
    assert by_device["Apple M2"]["bandwidth_gbs"] == pytest.approx(find_hardware("Apple M2").bandwidth_gbs)
    assert (
        serving["calibrated"]
        and "123.0 GB/s measured by llama.cpp at 4 thread(s)" in serving["calibrated"][0]
    )
    with pytest.raises(ValueError):
        store_streaming_rate(h100, "q4_k_m", 0.0, threads=1)
