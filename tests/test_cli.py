"""The command line."""

import pytest

from minilora.cli import main


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
        assert all(v > 0 for v in ratios.values())
    assert "numba/floor" in capsys.readouterr().out
