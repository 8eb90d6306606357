"""Every example runs to completion (each asserts what it prints)."""

import pathlib
import subprocess
import sys

import pytest

FOLDER = pathlib.Path(__file__).parent.parent / "examples"
EXAMPLES = sorted(FOLDER.glob("[0-9][0-9]_*.py"))


def test_the_examples_are_chapters_numbered_from_01():
    """examples/NN_*.py, NN = 01, 02, ... without a gap or a repeat (STYLE.md: numbered
    chapters), so the glob above misses none."""
    assert len(EXAMPLES) >= 11  # the chapters the README lists (01 to 11)
    assert [int(p.name[:2]) for p in EXAMPLES] == list(range(1, len(EXAMPLES) + 1))
    assert sorted(FOLDER.glob("*.py")) == EXAMPLES, "a .py outside the numbered chapters"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()
