"""minilora.safetensors against the reference implementation (when installed) and bad files."""

import numpy as np
import pytest

from minilora import safetensors


def test_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f64": rng.standard_normal((3, 4)), "f32": rng.standard_normal(5).astype("f4"),
               "i64": np.arange(6).reshape(2, 3), "scalar": np.array(2.5),
               "empty": np.zeros((0, 3), np.float32), "b": np.array([True, False])}
    safetensors.save(tmp_path / "t.safetensors", tensors, {"k": "v"})
    loaded, meta = safetensors.load(tmp_path / "t.safetensors")
    assert meta == {"k": "v"}
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        np.testing.assert_array_equal(loaded[name], value)


def test_agrees_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": np.arange(5.0)}
    safetensors.save(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    for k in tensors:
        np.testing.assert_array_equal(theirs[k], tensors[k])
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"x": "1"})
    ours, meta = safetensors.load(tmp_path / "theirs.safetensors")
    assert meta == {"x": "1"}
    for k in tensors:
        np.testing.assert_array_equal(ours[k], tensors[k])


def _file(header, body=b""):
    return len(header).to_bytes(8, "little") + header + body


@pytest.mark.parametrize(("data", "pattern"), [
    (b"\x01\x02", "too short"),
    ((10**9).to_bytes(8, "little") + b"{}", "header length"),
    (_file(b"[]"), "must be a JSON object"),
    (_file(b"{not json"), "not valid JSON"),
    (_file(b'{"a":{"dtype":"F32","shape":[2]}}'), "missing field 'data_offsets'"),
    (_file(b'{"a":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}}', b"\x00" * 8),
     "no NumPy equivalent"),
    (_file(b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\x00" * 8),
     "needs 12 bytes"),
    (_file(b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}', b"\x00" * 8),
     "non-negative integer"),
    (_file(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\x00" * 8),
     "cover 16 bytes of a 8-byte data section"),
])
def test_malformed_files_raise_a_named_error(tmp_path, data, pattern):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(safetensors.SafetensorsError, match=pattern):
        safetensors.load(path)
