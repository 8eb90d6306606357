"""The command line."""

import os

import pytest

from minilora.tools.cli import main


def test_gradcheck_prints_a_passing_table(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "every gradient matches finite differences" in out
    assert out.count(" yes") >= 50 and " NO" not in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_bench_quick_writes_ratios_as_json(tmp_path, capsys):
    """The benchmark's plumbing (no timing is asserted: this machine is shared and noisy)."""
    import json

    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--no-torch", "--json", str(path)]) == 0
    cases = json.loads(path.read_text())["cases"]
    assert set(cases) == {"fp32 N=10 128->64 r=4", "fp32 N=256 512->256 r=8"}
    for ratios in cases.values():
        assert {"numba/floor", "numpy/floor", "numba/numpy", "floor_ms"} <= set(ratios)
        assert ratios.pop("route") in ("small", "merged", "blocked")
        assert all(v > 0 for v in ratios.values())
    assert "numba/floor" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["r", "N", "d"])
def test_bench_sweep_prints_ratios_against_floor_and_ideal(tmp_path, capsys, name):
    """The sweep's plumbing at tiny sizes (no timing is asserted)."""
    import importlib.util
    import json

    path, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = main(["bench", "--sweep", name, "--quick", "--no-torch", "--json", str(path),
                 "--plot", str(png)])
    if importlib.util.find_spec("matplotlib") is None:  # the light install: one line, exit 2
        assert code == 2 and "matplotlib" in capsys.readouterr().err
        assert main(["bench", "--sweep", name, "--quick", "--no-torch", "--json",
                     str(path)]) == 0
    else:
        assert code == 0 and png.stat().st_size > 0
    rows = json.loads(path.read_text())["rows"]
    assert [row[name] for row in rows] == {"r": [1, 8], "N": [16, 64], "d": [32, 64]}[name]
    for row in rows:
        assert row["numba/floor"] > 0 and row["ideal"] >= 1
        assert row["numba/ideal"] == pytest.approx(row["numba/floor"] / row["ideal"])
        assert row["route"] in ("small", "merged", "blocked")
    assert main(["bench", "--plot", str(png)]) == 2  # --plot without --sweep


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's /proc only")
def test_peak_resident_set_counts_at_least_the_outputs():
    """The fresh-process memory probe sees y and dx, which are alive together at its end (a
    probe that missed the call's allocations would read about 0)."""
    from minilora.tools.bench import peak_rss_extra

    N, d, r = 2048, 512, 8
    outputs = 2 * N * d * 4
    assert peak_rss_extra(N, d, d, r, "floor", warm=True) >= 0.9 * outputs
    for backend in ("numba", "numpy"):
        assert peak_rss_extra(N, d, d, r, backend, warm=True) >= 0.9 * outputs


def test_the_ideal_counts_the_low_rank_products_at_the_floors_rate():
    from minilora.tools.bench import ideal_ratio

    # floor 2·N·d²; low-rank N·r·(3d + 3d) multiply-adds: 1 + 3·r·2d / (2d²) = 1 + 3r/d
    assert ideal_ratio(4096, 1024, 1024, 16) == pytest.approx(1 + 3 * 16 / 1024)
    assert ideal_ratio(10, 512, 256, 8) == pytest.approx(1 + 3 * 8 * 768 / (2 * 512 * 256))
