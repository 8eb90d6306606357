import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora.models import text


@given(st.text())
def test_bytes_round_trip(s):
    ids = text.encode(s)
    assert ids.dtype == np.int64 and len(ids) == len(s.encode("utf-8"))
    assert text.decode(ids) == s


def test_decode_refuses_out_of_vocabulary():
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        text.decode([1, 256])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        text.decode([-1])


@pytest.mark.parametrize("kind", text.KINDS)
def test_corpus_is_the_standard_library(kind):
    s = text.corpus(kind, max_chars=50_000)
    assert len(s) == 50_000
    marker = "def " if kind == "code" else " the "
    assert s.count(marker) > 20
    assert s == text.corpus(kind, max_chars=50_000)  # the same on every call


def test_corpora_differ_in_style():
    code, prose = text.corpus("code", max_chars=100_000), text.corpus("prose", max_chars=100_000)
    assert code.count("self.") > 10 * max(1, prose.count("self."))


def test_corpus_refuses_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        text.corpus("poetry")


def test_windows_and_split():
    ids = np.arange(100)
    train, val = text.split(ids, val_fraction=0.2)
    assert len(train) == 80 and val[0] == 80
    w = text.windows(train, 4, 10, np.random.default_rng(0))
    assert w.shape == (4, 10)
    assert (np.diff(w, axis=1) == 1).all() and w.max() < 80
    with pytest.raises(ValueError, match="fewer than seq"):
        text.windows(ids[:5], 1, 10, np.random.default_rng(0))
