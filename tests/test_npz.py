"""minilora.formats.npz: what numpy.savez writes reads back equal; duplicate names, non-.npy
members, object dtypes and sizes that disagree with the header are refused before any data is
read."""

import contextlib
import io
import zipfile

import numpy as np
import numpy.lib.format as npy
import pytest

from minilora.formats import npz


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)


def _npy(a):
    buf = io.BytesIO()
    npy.write_array(buf, a, allow_pickle=True)
    return buf.getvalue()


def test_round_trip_keeps_values_dtypes_and_order(tmp_path):
    arrays = {"a": np.arange(6.0).reshape(2, 3), "f": np.asfortranarray(np.ones((3, 2))),
              "big": np.arange(4, dtype=">f4"), "i": np.array([1, 2], np.int64),
              "empty": np.zeros((0, 3), np.float32)}
    np.savez(tmp_path / "x.npz", **arrays)
    np.savez_compressed(tmp_path / "z.npz", **arrays)
    for f in ("x.npz", "z.npz"):
        got = npz.load(tmp_path / f)
        assert list(got) == list(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype.newbyteorder("=") and got[k].flags.writeable
            assert got[k].flags.c_contiguous


def test_check_sees_every_header_before_any_data(tmp_path, monkeypatch):
    np.savez(tmp_path / "x.npz", a=np.ones((2, 3)), b=np.zeros(4, np.float32))
    seen = {}

    def check(headers):
        seen.update(headers)
        raise ValueError("refused")

    monkeypatch.setattr(npz, "_read", lambda *a: pytest.fail("data read before the check"))
    with pytest.raises(ValueError, match="refused"):
        npz.load(tmp_path / "x.npz", check=check)
    assert seen == {"a": ((2, 3), np.dtype(np.float64)), "b": ((4,), np.dtype(np.float32))}


@pytest.mark.parametrize("members, message", [
    ([("a.npy", _npy(np.ones(2))), ("a.npy", _npy(np.ones(3)))], "two arrays named 'a'"),
    ([("a.txt", b"hello")], r"member .a\.txt. is not a \.npy array"),
    ([("a.npy", _npy(np.array([None], object)))], "only plain arrays are read"),
    ([("a.npy", _npy(np.ones(4))[:-8])], "declares shape \\(4,\\)"),
    ([("a.npy", _npy(np.ones(4)) + b"\0" * 8)], "declares shape \\(4,\\)"),
    ([("a.npy", b"\x93NUMPY garbage")], r"no valid \.npy header"),
])
def test_malformed_archives_raise_npz_error_naming_the_member(tmp_path, members, message):
    path = tmp_path / "bad.npz"
    with pytest.warns(UserWarning) if len(members) == 2 else contextlib.nullcontext():
        _zip(path, members)
    with pytest.raises(npz.NpzError, match=message):
        npz.load(path)


def test_missing_and_non_zip_files(tmp_path):
    with pytest.raises(npz.NpzError, match="no such file"):
        npz.load(tmp_path / "none.npz")
    (tmp_path / "t.npz").write_bytes(b"not a zip")
    with pytest.raises(npz.NpzError, match=r"not a readable \.npz file"):
        npz.load(tmp_path / "t.npz")
    assert issubclass(npz.NpzError, ValueError)
