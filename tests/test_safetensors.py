"""minilora.formats.safetensors against the reference implementation (when installed) and bad
files."""

import numpy as np
import pytest
from _helpers import assert_safetensors_refused, requires, safetensors_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora.formats import safetensors


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


@requires("safetensors")
def test_agrees_with_the_safetensors_package(tmp_path):
    import safetensors.numpy as package  # the package (``safetensors`` here is minilora's module)

    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": np.arange(5.0)}
    safetensors.save(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    theirs = package.load_file(str(tmp_path / "ours.safetensors"))
    for k in tensors:
        np.testing.assert_array_equal(theirs[k], tensors[k])
    package.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"x": "1"})
    ours, meta = safetensors.load(tmp_path / "theirs.safetensors")
    assert meta == {"x": "1"}
    for k in tensors:
        np.testing.assert_array_equal(ours[k], tensors[k])


@pytest.mark.parametrize(("data", "pattern"), [
    (b"\x01\x02", "too short"),
    ((10**9).to_bytes(8, "little") + b"{}", "header length"),
    (safetensors_file(b"[]"), "must be a JSON object"),
    (safetensors_file(b"{not json"), "not valid JSON"),
    (safetensors_file(b'{"a":{"dtype":"F32","shape":[2]}}'), "missing field 'data_offsets'"),
    (safetensors_file(b'{"a":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}}', b"\x00" * 8),
     "no NumPy equivalent"),
    (safetensors_file(b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\x00" * 8),
     "needs 12 bytes"),
    (safetensors_file(b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}', b"\x00" * 8),
     "non-negative integer"),
    (safetensors_file(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\x00" * 8),
     "cover 16 bytes of a 8-byte data section"),
])
def test_malformed_files_raise_a_named_error(tmp_path, data, pattern):
    assert_safetensors_refused(tmp_path / "bad.safetensors", data, pattern)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_header_and_read_tensor_agree_with_loads(tmp_path, data):
    """Header first, then tensor by tensor (what load_weights does): the same verdict and the same
    arrays as ``loads`` on the whole file, for valid files and for mutated ones."""
    tensors = {}
    for i in range(data.draw(st.integers(0, 3))):
        kind = data.draw(st.sampled_from(["<f4", "<f8", "<i4", "u1", "<f2"]))
        shape = data.draw(st.lists(st.integers(0, 3), max_size=2))
        raw = data.draw(st.binary(min_size=int(np.prod(shape)) * np.dtype(kind).itemsize,
                                  max_size=int(np.prod(shape)) * np.dtype(kind).itemsize))
        tensors[f"t{i}"] = np.frombuffer(raw, kind).reshape(shape)
    blob = bytearray(safetensors.dumps(tensors))
    kind = data.draw(st.sampled_from(["none", "flip", "cut", "append"]))
    if kind == "flip":
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "cut":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "append":
        blob += b"\0" * data.draw(st.integers(1, 8))
    path = tmp_path / "t.safetensors"
    path.write_bytes(bytes(blob))
    try:
        whole, meta = safetensors.loads(bytes(blob), str(path))
    except safetensors.SafetensorsError:
        whole = None
    with open(path, "rb") as f:
        try:
            entries, meta2, start = safetensors.read_header(f, str(path))
        except safetensors.SafetensorsError as e:
            assert whole is None, e
            assert str(path) in str(e)
            return
        assert whole is not None and meta2 == meta and set(entries) == set(whole)
        for name, entry in entries.items():
            a = safetensors.read_tensor(f, entry, start)
            assert a.dtype == whole[name].dtype and a.shape == whole[name].shape
            assert a.tobytes() == whole[name].tobytes()  # bit for bit, NaNs included
