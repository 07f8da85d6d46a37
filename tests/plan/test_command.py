"""`greentune plan` from the command line: recipe, --model, --json, --list-models, --calibrate, errors."""

from __future__ import annotations

import json

import pytest
import yaml

from greentune.cli_types import OneLineParser
from greentune.errors import UserError
from greentune.models import tiny
from greentune.plan import calibrate
from greentune.plan.command import add_plan_arguments, read_recipe, run_plan
from greentune.plan.hardware import find_hardware

TINY = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=64, seq=16, batch=2)


def _run(*argv) -> int:
    return run_plan(add_plan_arguments(OneLineParser()).parse_args(list(argv)))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan-llama")
    tiny.build_tiny_model("llama", d, vocab_size=300)
    return d


def _recipe(tmp_path, model_dir, **over):
    r = {
        "base_model": str(model_dir),
        "data": {"train": "x.jsonl", "max_seq_len": 128},
        "method": {
            "quant_base": "q4_k",
            "lora": {"rank": 8, "targets": ["attn"]},
            "relora": {"merge_every": 50},
        },
        "train": {"steps": 100, "batch_size": 4, "grad_accum": 2},
        "energy": {"region": "FR", "pue": 1.2},
    }
    r.update(over)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_read_recipe(tmp_path, model_dir):
    rec = read_recipe(_recipe(tmp_path, model_dir, moe={"upcycle": {"experts": 4, "top_k": 1}}))
    assert rec.tokens == 100 * 4 * 2 * 128
    assert (rec.rank, rec.targets, rec.quant_base, rec.relora_merge_every, rec.upcycle) == (
        8,
        ("attn",),
        "q4_k",
        50,
        (4, 1),
    )
    assert (rec.region, rec.pue, rec.wue_onsite) == ("FR", 1.2, None)
    t = rec.technique()
    assert (t.name, t.method, t.quant_base, t.merge_every) == (
        "recipe: upcycle-relora-q4_k",
        "relora",
        "q4_k",
        50,
    )


def test_plan_recipe_json(tmp_path, model_dir, cache, capsys):
    assert _run(str(_recipe(tmp_path, model_dir)), "--hardware", "H100", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe_technique"] == "recipe: relora-q4_k"
    assert out["estimates"][0]["technique"]["name"] == "recipe: relora-q4_k"
    assert out["workload"]["tokens"] == 100 * 4 * 2 * 128 and out["site"]["pue"] == 1.2
    assert out["recommended"] is not None and out["hardware"]["name"] == "NVIDIA H100 SXM5 80GB"


def test_plan_model_table(cache, capsys):
    assert (
        _run("--model", "mixtral-8x7b", "--hardware", "H100", "--power-cap-w", "1000", "--deadline-h", "10")
        == 0
    )
    out = capsys.readouterr().out
    assert "plan: mixtral-8x7b (mixtral, 46.70 B parameters, 8 experts top-2, 12.88 B active)" in out
    assert "recommended: " in out and "assumptions:" in out and "no: memory" in out


def test_list_models(capsys):
    assert _run("--list-models") == 0
    assert "mixtral-8x22b" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, msg",
    [
        ((), "give a recipe YAML or --model"),
        (("--model", "mixtral", "--hardware", "tpu"), "unknown hardware 'tpu'"),
        (("--model", "mixtral", "--hardware", "M1"), "nothing fits mixtral-8x7b on Apple M1"),
        (("--model", "mixtral", "--gpus", "2", "--hardware", "M2 Max"), "needs GPUs"),
        (("--model", "mixtral", "--deadline-h", "-1", "--hardware", "H100"), "--deadline-h must be positive"),
        (("no-such-recipe.yaml",), "no recipe file"),
    ],
)
def test_bad_input_is_one_line(argv, msg, cache, capsys):
    with pytest.raises(UserError, match=msg) as err:
        _run(*argv)
    assert "\n" not in str(err.value)


def test_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UserError, match="not a decoder-only causal LM"):
        _run("--model", str(tmp_path))


def test_calibrate_stores_and_plans_use_it(cache, monkeypatch, capsys):
    monkeypatch.setattr(calibrate, "_sizes", lambda on_gpu: TINY)
    assert _run("--calibrate", "--calibrate-seconds", "0.2") == 0
    assert "calibrated this:" in capsys.readouterr().out
    data = json.loads((cache / "calibration.json").read_text())
    hw = find_hardware("this")
    row = data["machines"][hw.key]
    assert row["utilisation"] > 0 and row["power_w"] >= 0 and row["tokens"] >= 32
    # the stored figures are what the plan uses
    assert row["tokens_per_second"] * row["flops_per_token"] / row["peak_flops"] == pytest.approx(
        row["utilisation"]
    )
    with pytest.raises(UserError):
        _run("--model", "qwen2.5-0.5b", "--deadline-h", "0.001")
    assert "calibrated on this hardware" in capsys.readouterr().out


def test_calibrate_only_this_machine(cache):
    with pytest.raises(UserError, match="measures this machine"):
        _run("--calibrate", "--hardware", "H100")


def test_record_observation_from_a_run(tmp_path):
    from greentune.models.facts import arch_facts
    from greentune.models.tiny import tiny_config
    from greentune.plan.cost import Technique, flops_per_token

    hw = find_hardware("H100")
    facts = arch_facts(tiny_config("llama", vocab_size=300))
    t = Technique("lora")
    path = tmp_path / "cal.json"
    cal = calibrate.record_observation(
        hw, facts, t, calibrate.ObservedRun(tokens=10_000, seconds=2.0, joules=1000.0, seq_len=128), path=path
    )
    assert cal.utilisation == pytest.approx(5000 * flops_per_token(facts, t, 128, False) / 989.4e12)
    assert cal.power_w == 500.0
    assert calibrate.load_calibration(hw, path) == cal


def test_calibration_measures_widths_families_and_dequantisation(cache, monkeypatch):
    monkeypatch.setattr(calibrate, "_sizes", lambda on_gpu: TINY)
    assert _run("--calibrate", "--calibrate-seconds", "0.3") == 0
    data = json.loads((cache / "calibration.json").read_text())
    hw = find_hardware("this")
    obs = {(o["family"], o["hidden"]) for o in data["observations"][hw.key]}
    assert obs == {("dense", 16), ("dense", 32), ("moe", 16)}
    rates = data["machines"][hw.key]["dequant_s_per_weight"]
    assert set(rates) == {"q8_0", "q4_0", "q4_k", "nf4", "mxfp4"} and all(r > 0 for r in rates.values())


def _obs(family, hidden, u, t=0.0):
    return {
        "family": family,
        "hidden": hidden,
        "utilisation": u,
        "power_w": 10.0,
        "source": "calibrate",
        "measured_at": t,
    }


def test_utilisation_follows_family_and_width(tmp_path):
    from greentune.models.facts import arch_facts
    from greentune.models.tiny import tiny_config
    from greentune.plan.cost import Technique

    hw = find_hardware("H100")
    path = tmp_path / "cal.json"
    base = calibrate.Calibration(
        hw.key,
        hw.name,
        0.25,
        10.0,
        "estimate",
        1.0,
        1.0,
        1.0,
        1.0,
        1,
        0.0,
        "test",
        observations=[_obs("dense", 256, 0.2), _obs("dense", 1024, 0.4), _obs("moe", 256, 0.1)],
    )
    calibrate.store_calibration(base, path)

    def facts(arch, hidden):
        return arch_facts(tiny_config(arch, vocab_size=300, hidden=hidden, heads=4, kv_heads=2))

    lora = Technique("lora", targets=("attn", "mlp"))
    u, how = calibrate.utilisation_for(hw, facts("llama", 512), lora, path)
    assert u == pytest.approx(0.2 * 2**0.5)  # halfway in log width between 0.2 and 0.4, log-log
    u, how = calibrate.utilisation_for(hw, facts("mixtral", 512), lora, path)
    assert u == pytest.approx(0.1 * 2**0.5) and "rescaled" in how  # MoE's own, moved along the dense curve
    u, _ = calibrate.utilisation_for(hw, facts("llama", 4096), Technique("up", upcycle=(4, 2)), path)
    assert u == pytest.approx(0.1 * 2)  # upcycling trains an MoE; flat beyond the curve's end
    assert calibrate.utilisation_for(find_hardware("4090"), facts("llama", 512), lora, path) is None


def test_a_run_replaces_the_observation_of_its_family_and_width(tmp_path):
    from greentune.models.facts import arch_facts
    from greentune.models.tiny import tiny_config
    from greentune.plan.cost import Technique, Workload, dequant_weights

    hw = find_hardware("H100")
    path = tmp_path / "cal.json"
    rates = {"q4_k": 1e-9}
    calibrate.store_calibration(
        calibrate.Calibration(
            hw.key,
            hw.name,
            0.25,
            10.0,
            "estimate",
            1.0,
            1.0,
            1.0,
            1.0,
            1,
            0.0,
            "test",
            dequant_s_per_weight=rates,
            observations=[_obs("dense", 64, 0.5), _obs("moe", 64, 0.3)],
        ),
        path,
    )
    facts = arch_facts(tiny_config("llama", vocab_size=300))
    t = Technique("qlora", quant_base="q4_k")
    cal = calibrate.record_observation(
        hw,
        facts,
        t,
        calibrate.ObservedRun(tokens=4096, seconds=2.0, joules=100.0, seq_len=128, micro_batch=4),
        path=path,
    )
    dq = dequant_weights(facts, t, Workload(4096, 128, 4), False) * 1e-9
    from greentune.plan.cost import flops_per_token

    assert cal.utilisation == pytest.approx(
        4096 * flops_per_token(facts, t, 128, False) / ((2.0 - dq) * 989.4e12)
    )
    obs = calibrate.load_observations(hw, path)
    assert {(o.family, o.hidden, o.source) for o in obs} == {("moe", 64, "calibrate"), ("dense", 64, "run")}
    assert calibrate.load_calibration(hw, path).dequant_s_per_weight == rates  # kept from the calibration
