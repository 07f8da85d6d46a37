import pytest

from greentune.energy.factors import Factors, load_rows, regions
from greentune.errors import UserError


def test_file_has_world_and_30_regions_each_with_source_and_year():
    rows = load_rows()
    grid = [r for r in rows if r.kind == "grid"]
    assert len(grid) >= 31 and "WORLD" in {r.region for r in grid}
    for r in rows:
        assert r.source and 1990 < r.year < 2030 and r.value >= 0, r
    assert {r.kind for r in rows} == {"grid", "offsite_water", "pue", "wue_onsite"}


def test_reference_values():
    expected = {
        "FR": 56,
        "SE": 41,
        "NO": 30,
        "BR": 98,
        "CA": 170,
        "GB": 238,
        "IE": 291,
        "US": 369,
        "DE": 381,
        "JP": 485,
        "AU": 549,
        "CN": 582,
        "PL": 662,
        "IN": 713,
    }
    for code, g in expected.items():
        assert Factors.for_region(code).grid_g_per_kwh == g


def test_defaults_and_world_water_marked():
    f = Factors.for_region("fr")
    assert (f.region, f.region_name, f.pue, f.wue_onsite_l_per_kwh, f.offsite_l_per_kwh) == (
        "FR",
        "France",
        1.58,
        1.8,
        0.82,
    )
    assert f.offsite_source.startswith("world figure (no source for France)")
    assert Factors.for_region("US").offsite_l_per_kwh == 3.14
    assert Factors.for_region(None).region == "WORLD"
    assert Factors.for_region("uk").region == "GB"


def test_overrides_are_labelled_recipe():
    f = Factors.for_region("DE", pue=1.1, wue_onsite=0.3, grid_g_per_kwh=100, offsite_l_per_kwh=2)
    assert (f.pue, f.wue_onsite_l_per_kwh, f.grid_g_per_kwh, f.offsite_l_per_kwh) == (1.1, 0.3, 100, 2)
    assert {f.pue_source, f.wue_source, f.grid_source, f.offsite_source} == {"recipe"}


def test_unknown_region_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown energy.region 'Atlantis'.*WORLD, AE"):
        Factors.for_region("Atlantis")


def test_bad_override():
    with pytest.raises(UserError, match="energy.pue must be >= 1"):
        Factors.for_region("FR", pue=0.9)
    assert regions()[0] == "WORLD"
