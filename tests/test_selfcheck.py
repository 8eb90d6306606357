"""minilora.tools.selfcheck: the sweep covers every op, shape and option, passes on the library, and
reports a wrong gradient as a failing row and a False result."""

import functools

import pytest

from minilora.ops import functional
from minilora.tools import selfcheck


def test_the_sweep_passes_and_covers_every_configuration():
    rows = list(selfcheck.rows(backends=("numpy",)))
    assert len(rows) == len(selfcheck.OPS) * len(selfcheck.SHAPES) * len(selfcheck.OPTIONS)
    assert all(row["passed"] and row["detail"] == "" for row in rows)
    assert {row["op"] for row in rows} == set(selfcheck.OPS)
    assert max(row["worst_rel_err"] for row in rows) < 1e-6
    dora = [row for row in rows if row["op"] != "lora"]
    assert all("m" in row["checked"].split(",") for row in dora)


def test_a_wrong_gradient_fails_its_rows_and_the_run(monkeypatch):
    def wrong_backward(dy, cache, **kw):
        g = functional.lora_backward(dy, cache, **kw)
        return g._replace(dB=g.dB * 1.01)  # a 1 % error in dB

    monkeypatch.setattr(selfcheck, "lora_backward", wrong_backward)
    monkeypatch.setattr(selfcheck, "OPS", ["lora"])
    rows = list(selfcheck.rows(backends=("numpy",)))
    failed = [row for row in rows if not row["passed"]]
    for row in failed:  # B's line alone is marked, and its error is the 1 % planted
        marked = [line for line in row["detail"].splitlines() if line.endswith("FAILED")]
        assert [line.split("(")[0] for line in marked] == ["B"], row["detail"]
        assert row["worst_rel_err"] == pytest.approx(0.01, rel=0.05)
    empty_batch = [row for row in rows if "x(0," in row["config"]]
    assert all(row["passed"] for row in empty_batch)  # N = 0: dB is 0, so 1 % of it is too
    assert len(failed) == len(rows) - len(empty_batch)
    lines = []
    monkeypatch.setattr(selfcheck, "rows", functools.partial(selfcheck.rows, ("numpy",)))
    assert selfcheck.run(out=lines.append) is False
    assert lines[-1] == "SOME GRADIENTS ARE WRONG"
    assert sum(line.rstrip().endswith(" NO") for line in lines) == len(failed)  # a row each
