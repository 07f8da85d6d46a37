import logging
import os

import pytest
from fakes import make_zone, set_energy

from greentune.energy.rapl import rapl_components


def _by_name(comps):
    return {c.name: c for c in comps}


def test_package_and_dram_counted_core_uncore_psys_mmio_skipped(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    core = make_zone(tmp_path, "intel-rapl:0:0", "core", 500_000)
    uncore = make_zone(tmp_path, "intel-rapl:0:1", "uncore", 100_000)
    dram = make_zone(tmp_path, "intel-rapl:0:2", "dram", 2_000_000)
    psys = make_zone(tmp_path, "intel-rapl:1", "psys", 0)
    mmio = make_zone(tmp_path, "intel-rapl-mmio:0", "package-0", 0)
    comps = _by_name(rapl_components(tmp_path))
    assert sorted(comps) == ["cpu", "dram"]
    assert all(c.source == "rapl" for c in comps.values())
    assert comps["cpu"].read() == 0.0
    set_energy(pkg, 4_000_000)  # +3 J
    set_energy(core, 2_500_000)  # parts of the package: must not add
    set_energy(uncore, 900_000)
    set_energy(psys, 50_000_000)
    set_energy(mmio, 50_000_000)
    set_energy(dram, 2_250_000)  # +0.25 J
    assert comps["cpu"].read() == pytest.approx(3.0)
    assert comps["dram"].read() == pytest.approx(0.25)


def test_wrap_around(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000, max_uj=1_000_000_000)
    cpu = rapl_components(tmp_path)[0]
    set_energy(pkg, 999_500_000)  # +0.5 J
    assert cpu.read() == pytest.approx(0.5)
    set_energy(pkg, 1_500_000)  # wrapped: +0.5 J to the top, +1.5 J after
    assert cpu.read() == pytest.approx(2.5)
    set_energy(pkg, 2_500_000)
    assert cpu.read() == pytest.approx(3.5)


def test_multi_package_summed_and_mirrors_counted_once(tmp_path):
    p0 = make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    p1 = make_zone(tmp_path, "intel-rapl:1", "package-1", 0)
    d0 = make_zone(tmp_path, "intel-rapl:0:0", "dram", 0)
    d1 = make_zone(tmp_path, "intel-rapl:1:0", "dram", 0)
    mirror = make_zone(tmp_path, "intel-rapl:2", "package-0", 0)  # same package seen twice
    comps = _by_name(rapl_components(tmp_path))
    assert len(comps["cpu"].zones) == 2 and len(comps["dram"].zones) == 2
    for z, uj in ((p0, 10_000_000), (p1, 20_000_000), (d0, 1_000_000), (d1, 2_000_000), (mirror, 10_000_000)):
        set_energy(z, uj)
    assert comps["cpu"].read() == pytest.approx(30.0)
    assert comps["dram"].read() == pytest.approx(3.0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a mode-000 file")
def test_permission_denied_warns_once_and_falls_back(tmp_path, caplog):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (pkg / "energy_uj").chmod(0)
    with caplog.at_level(logging.WARNING):
        assert rapl_components(tmp_path) == []
    assert len([r for r in caplog.records if "root-only" in r.getMessage()]) == 1


def test_permission_denied_simulated(tmp_path, caplog, monkeypatch):
    """Same path as above for root: the read itself raises PermissionError."""
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    from greentune.energy import rapl

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self.path / "energy_uj"))

    monkeypatch.setattr(rapl._Zone, "_raw", deny)
    with caplog.at_level(logging.WARNING):
        assert rapl_components(tmp_path) == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CVE-2020-8694" in warnings[0].getMessage()


def test_no_tree_means_no_components(tmp_path):
    assert rapl_components(tmp_path / "missing") == []
    assert rapl_components(tmp_path) == []
