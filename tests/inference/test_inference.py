"""`greentune eval --engine llamacpp|torch`: numbers present and labelled, the ledger row, the report,
llama.cpp's perplexity against PyTorch's, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from greentune.cli import main

pytest.importorskip("xllamacpp", reason="llama.cpp binding (pip install xllamacpp, in the test extra)")

FAST = [
    "--threads",
    "1",
    "--prompt-tokens",
    "32",
    "--gen-tokens",
    "8",
    "--seconds",
    "0",
    "--max-seq-len",
    "64",
]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, corpus_texts):
    p = tmp_path_factory.mktemp("held") / "eval.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[-12:]))
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir):
    """A finished run's layout: recipe.yaml, merged/ and export/model-f32.gguf (f32: PyTorch's exact
    weights)."""
    from greentune.export.gguf import export_gguf

    d = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_llama_dir, d / "merged")
    (d / "recipe.yaml").write_text(
        yaml.safe_dump({"base_model": str(tiny_llama_dir), "data": {"max_seq_len": 64}})
    )
    (d / "export").mkdir()
    export_gguf(d / "merged", d / "export" / "model-f32.gguf", "f32")
    return d


def _eval(capsys, *argv):
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def _check_numbers(r: dict, engine: str, fmt: str) -> None:
    assert r["engine"] == engine and r["format"] == fmt
    assert r["perplexity"] > 1 and math.isclose(r["perplexity"], math.exp(r["loss"]))
    for phase, tokens in (("prompt", 32), ("generate", 8)):
        p = r[phase]
        assert p["tokens"] == tokens * p["repeats"] and p["tokens_per_s"] > 0 and p["seconds"] > 0
        assert p["joules"] > 0 and math.isclose(p["j_per_token"], p["joules"] / p["tokens"])
    assert math.isclose(r["j_per_1k_generated"], 1000 * r["generate"]["j_per_token"])
    assert r["peak_rss_bytes"] > 0 and r["model_bytes"] > 0
    assert r["estimate"] == ("estimate" in r["energy_source"].values())  # labelled as the meter saw it


def test_llamacpp_eval_json_and_ledger_row(capsys, run_dir, held_out):
    code, out, err = _eval(
        capsys, str(run_dir), "--data", str(held_out), "--engine", "llamacpp", *FAST, "--json"
    )
    assert code == 0, err
    r = json.loads(out)
    _check_numbers(r, "llamacpp", "f32")
    assert r["file"].endswith("model-f32.gguf") and r["prompt"]["engine_tokens_per_s"] > 0
    m = r["modelled"]
    assert m["this"]["basis"] == m["Apple M2"]["basis"] == "modelled" and m["this_bandwidth_probe_gbs"] > 0
    assert m["this"]["bandwidth_gbs"] == pytest.approx(m["this_bandwidth_probe_gbs"])
    rows = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    row = rows[-1]
    assert row["phase"] == "inference" and row["details"]["engine"] == "llamacpp"
    assert row["seconds"] > 0 and sum(row["joules"].values()) > 0
    assert row["details"]["generate"]["j_per_token"] == r["generate"]["j_per_token"]


def test_llamacpp_perplexity_is_pytorchs(run_dir, held_out):
    """f32 GGUF: llama.cpp's log-probabilities of the held-out tokens give PyTorch's perplexity."""
    from greentune.evaluate import evaluate_path
    from greentune.inference import evaluate_inference

    lc = evaluate_inference(
        run_dir,
        held_out,
        engine="llamacpp",
        prompt_tokens=16,
        gen_tokens=4,
        threads=1,
        min_seconds=0,
        record=False,
    )
    pt = evaluate_path(run_dir / "merged", held_out, max_seq_len=64)
    assert lc["tokens"] == pt["tokens"]
    assert math.isclose(lc["perplexity"], pt["perplexity"], rel_tol=1e-4), (
        lc["perplexity"],
        pt["perplexity"],
    )


def test_torch_engine_numbers(capsys, run_dir, held_out):
    code, out, err = _eval(capsys, str(run_dir / "merged"), "--data", str(held_out), *FAST, "--json")
    assert code == 0, err
    r = json.loads(out)
    _check_numbers(r, "torch", "fp32")
    assert r["file"] is None and "ledger" not in r  # a model folder has no ledger


def test_text_output_labels_energy(capsys, run_dir, held_out):
    code, out, err = _eval(
        capsys,
        str(run_dir / "export" / "model-f32.gguf"),
        "--data",
        str(held_out),
        "--engine",
        "llamacpp",
        *FAST,
    )
    assert code == 0, err
    assert "J/token" in out and "J per 1,000 generated tokens" in out and "(phase inference)" in out
    assert "modelled (plan.inference): here" in out and "Apple M2" in out
    if "estimate" in out:
        assert "no energy counter" in out


def test_report_has_serving_table_chart_and_cost(run_dir, held_out):
    from greentune.inference import evaluate_inference
    from greentune.report import write_report

    evaluate_inference(
        run_dir, held_out, engine="torch", prompt_tokens=16, gen_tokens=4, threads=1, min_seconds=0
    )
    json_path, html_path = write_report(run_dir)
    html = html_path.read_text()
    assert 'id="table-inference"' in html and 'id="chart-inference-j-per-token"' in html
    assert 'id="serve-j-per-1k-here"' in html and 'id="serve-j-per-1k-laptop"' in html
    serving = json.loads(json_path.read_text())["serving"]
    assert {(m["engine"], m["format"]) for m in serving["measured"]} >= {("torch", "fp32")}
    assert serving["projected"]["device"] == "Apple M2" and serving["projected"]["basis"] == "modelled"
    assert (
        serving["cost_to_serve"]["projected_j_per_1k"] > 0
        and serving["cost_to_serve"]["measured_j_per_1k"] > 0
    )
    for m in serving["measured"]:
        assert f'data-label="{m["engine"]} {m["format"]}"' in html


def _one_line(code, out, err, needle):
    assert code == 2, err
    assert err.startswith("greentune: error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err


def test_bad_input_one_line(capsys, tmp_path, run_dir, held_out, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    _one_line(
        *_eval(capsys, str(fake), "--data", str(held_out), "--engine", "llamacpp", *FAST), "not a GGUF file"
    )
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    _one_line(*_eval(capsys, str(txt), "--data", str(held_out), "--engine", "llamacpp"), "neither a run dir")
    _one_line(
        *_eval(capsys, str(run_dir), "--data", str(held_out), "--engine", "llamacpp", "--gen-tokens", "0"),
        "--gen-tokens must be at least 1",
    )
    _one_line(
        *_eval(
            capsys,
            str(run_dir),
            "--data",
            str(held_out),
            "--engine",
            "llamacpp",
            "--prompt-tokens",
            "250",
            "--gen-tokens",
            "100",
        ),
        "exceed the model's context",
    )
    from greentune.export import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    _one_line(
        *_eval(capsys, str(run_dir), "--data", str(held_out), "--engine", "llamacpp"), "pip install xllamacpp"
    )


def test_llamacpp_eval_stores_the_streaming_rate_of_a_file_bigger_than_the_caches(
    capsys, run_dir, held_out, monkeypatch, tmp_path
):
    """A file that streams from memory calibrates this machine's serving projection; a cache-sized one does
    not."""
    from greentune.inference import run as inference_run
    from greentune.plan.calibrate import load_streaming_rate
    from greentune.plan.hardware import detect_this

    monkeypatch.setenv("GREENTUNE_CACHE", str(tmp_path / "cache"))
    this = detect_this()
    code, out, err = _eval(
        capsys, str(run_dir), "--data", str(held_out), "--engine", "llamacpp", *FAST, "--json"
    )
    assert code == 0, err
    assert load_streaming_rate(this, "f32") is None  # the tiny file is cache-resident
    monkeypatch.setattr(inference_run, "STREAMING_MIN_BYTES", 0)
    code, out, err = _eval(
        capsys, str(run_dir), "--data", str(held_out), "--engine", "llamacpp", *FAST, "--json"
    )
    assert code == 0, err
    r = json.loads(out)
    stored = load_streaming_rate(this, "f32")
    assert (
        stored is not None
        and stored["gbs"] == pytest.approx(r["streaming_gbs"])
        and stored["threads"] == r["threads"]
    )
