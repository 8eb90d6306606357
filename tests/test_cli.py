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
