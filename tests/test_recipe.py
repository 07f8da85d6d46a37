import pytest

from greentune.errors import UserError
from greentune.recipe import Recipe, load_recipe, recipe_from_dict

BASE = {"base_model": "m", "data": {"train": "t.jsonl"}}


def test_defaults_fill_every_section():
    r = recipe_from_dict(BASE)
    assert r.method.lora.rank == 16 and r.method.lora.alpha == 32 and r.method.quant_base == "none"
    assert r.train.schedule == "cosine" and r.data.max_seq_len == 512 and r.data.pack is True


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            {**BASE, "train": {"stepz": 3}},
            "unknown key 'train.stepz' (allowed here: activation_checkpointing, batch_size,",
        ),
        (
            {**BASE, "method": {"lora": {"rnk": 3}}},
            "unknown key 'method.lora.rnk' (allowed here: alpha, dropout, rank, targets)",
        ),
        ({**BASE, "colour": 1}, "unknown key 'colour'"),
        (
            {**BASE, "method": {"quant_base": "q3"}},
            "method.quant_base: Input should be 'none', 'q8_0', 'q4_0', 'q4_k', 'nf4' or 'mxfp4'",
        ),
        (
            {**BASE, "method": {"lora": {"targets": ["attention"]}}},
            "method.lora.targets.0: Input should be 'attn', 'mlp' or 'experts'",
        ),
        ({**BASE, "train": {"steps": 0}}, "train.steps: Input should be greater than or equal to 1"),
        ({"data": {"train": "x"}}, "missing required key 'base_model'"),
    ],
)
def test_bad_recipes_are_one_line_naming_the_key(data, expected):
    with pytest.raises(UserError) as err:
        recipe_from_dict(data)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg


def test_relative_paths_resolve_against_the_recipe_file(tmp_path):
    (tmp_path / "d").mkdir()
    p = tmp_path / "r.yaml"
    p.write_text("base_model: ./m\ndata: {train: d/t.jsonl}\n")
    r = load_recipe(p)
    assert (
        r.data.train == tmp_path / "d" / "t.jsonl" and r.base_model == str(tmp_path / "m") and r.name == "r"
    )


def test_invalid_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("base_model: m\ndata: [unclosed\n")
    with pytest.raises(UserError, match=r"r\.yaml:\d+: not valid YAML"):
        load_recipe(p)


def test_identity_ignores_only_the_energy_budget_and_name():
    a = recipe_from_dict({**BASE, "energy": {"budget_kwh": 1.0}})
    b = recipe_from_dict({**BASE, "energy": {"budget_kwh": 2.0}})
    c = recipe_from_dict({**BASE, "train": {"lr": 1.0}})
    assert a.identity() == b.identity() and a.identity() != c.identity()
    assert Recipe.model_validate(a.dump()) == a
