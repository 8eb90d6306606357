"""Hostile files: every reader accepts exactly what it should and refuses the rest with one
named error, never a traceback, a silently wrong array, a modified model or a lost file.

The safetensors reader is checked against the ``safetensors`` package on generated and mutated
files (the package is installed in CI)."""

import errno
import importlib
import io
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from _helpers import assert_adapters_equal, assert_safetensors_refused, requires
from _helpers import safetensors_file as _file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora.formats import npz, safetensors
from minilora.oracle import OracleInputError
from minilora.toolkit import checkpoint
from minilora.tools.cli import main

# -- safetensors: the same verdict as the package, on every file -------------------------------

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
          "I8": "i1", "U8": "u1", "U16": "<u2", "BOOL": "u1", "C64": "<c8"}
TOKENS = [b" ", b",", b'"', b"{", b"}", b"[", b"]", b":", b"0", b"7", b"-", b"-0", b"1e2", b".5",
          b"NaN", b"null", b"true", b"\xef\xbb\xbf", b"\\ud800", b"\x00", b"\n",
          b'"__metadata__":{"k":"v"},', b'"__metadata__":null,', b'"__metadata__":[],',
          b'"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},',
          b'"dtype":"F32",', b'"shape":[1],', b'"x":' + b"[" * 130 + b"]" * 130 + b",",
          b"18446744073709551616", b"1" + b"0" * 400, b'"BF16"', b'"F8_E4M3"']


@st.composite
def safetensors_files(draw):
    """A valid file written by the package itself, then (usually) mutated: bytes flipped,
    inserted, deleted, the file cut or extended, or a token put into the JSON header with the
    length prefix fixed up so that the header's parser is reached."""
    from safetensors.numpy import save as package_save  # the package, not minilora's module

    tensors = {}
    for i in range(draw(st.integers(0, 3))):
        dtype = np.dtype(DTYPES[draw(st.sampled_from(sorted(set(DTYPES) - {"BF16"})))])
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = draw(st.binary(min_size=size, max_size=size))
        tensors[f"t{i}"] = np.frombuffer(raw, dtype).reshape(shape)
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                max_size=2))
    data = bytearray(package_save(tensors, metadata))
    n = struct.unpack("<Q", data[:8])[0]
    kind = draw(st.sampled_from(["none", "flip", "insert", "delete", "cut", "append", "header",
                                 "header", "header"]))
    if kind == "header":
        at = draw(st.integers(8, 8 + n))
        head = data[8:at] + draw(st.sampled_from(TOKENS)) + data[at:8 + n]
        if draw(st.booleans()):  # or replace a digit: offsets and shapes move
            digits = [i for i, c in enumerate(head) if 48 <= c <= 57]
            if digits:
                head[draw(st.sampled_from(digits))] = draw(st.integers(48, 57))
        data = bytearray(struct.pack("<Q", len(head))) + head + data[8 + n:]
    elif kind != "none" and data:
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data.insert(at, draw(st.integers(0, 255)))
        elif kind == "delete":
            del data[at]
        elif kind == "cut":
            data = data[:at]
        else:
            data += draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def _expected_array(dtype, shape, raw):
    """What minilora should return for a tensor the package accepted (BF16, F16 widened)."""
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    a = np.frombuffer(raw, {"BOOL": "?"}.get(dtype, DTYPES[dtype])).reshape(shape)
    return a.astype(np.float32) if dtype == "F16" else a


# MINILORA_HOSTILE_EXAMPLES raises the number of generated files for a longer hunt.
HOSTILE = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   max_examples=int(os.environ.get("MINILORA_HOSTILE_EXAMPLES", 600)))


@requires("safetensors")
@HOSTILE
@given(data=safetensors_files())
def test_the_safetensors_reader_agrees_with_the_package(data):
    pkg = importlib.import_module("safetensors")  # the package (the name is minilora's module)
    try:
        theirs = pkg.deserialize(data)
    except Exception as e:  # the package's verdict: refused
        theirs = e
    try:
        ours, _ = safetensors.loads(data)
    except safetensors.SafetensorsError as e:
        ours = e
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"we accepted what the package refuses ({theirs})"
        return
    assert not isinstance(ours, Exception), f"we refused what the package accepts: {ours}"
    assert sorted(ours) == sorted(name for name, _ in theirs)
    for name, info in theirs:
        expected = _expected_array(info["dtype"], info["shape"], bytes(info["data"]))
        got = ours[name]
        assert got.shape == expected.shape
        assert got.tobytes() == expected.astype(got.dtype).tobytes(), name


def _mutated(draw, data):
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif kind == "delete":
            del data[at]
        else:
            data = data[:at]
    return bytes(data)


CASE_OPTIONS = st.fixed_dictionaries({
    "d_in": st.integers(1, 4), "d_out": st.integers(1, 4), "r": st.integers(1, 3),
    "batch": st.integers(0, 2), "dora": st.booleans(), "bias": st.booleans(),
    "dropout": st.sampled_from([0.0, 0.5]), "fan_in_fan_out": st.booleans()})


@HOSTILE
@given(options=CASE_OPTIONS, ext=st.sampled_from(["npz", "safetensors"]), data=st.data())
def test_mutated_case_and_output_files_give_one_named_error_or_a_valid_case(tmp_path_factory,
                                                                             options, ext,
                                                                             data):
    """Any byte of a case or output file changed, inserted, deleted or cut: reading it either
    gives a case that passes every check (a byte in a value still makes a valid case) or raises
    OracleInputError naming the file, never another exception."""
    folder = tmp_path_factory.mktemp("mutated")
    case = ml.oracle.make_case(seed=0, **options)
    good, bad = folder / f"good.{ext}", folder / f"bad.{ext}"
    ml.oracle.save_case(good, case)
    bad.write_bytes(_mutated(data.draw, good.read_bytes()))
    reference = ml.oracle.reference(case)
    try:
        loaded = ml.oracle.load_case(bad)
    except OracleInputError as e:
        assert str(bad) in str(e)
    else:
        with np.errstate(all="ignore"):  # a mutated value may be huge: it must still compute
            got = ml.oracle.reference(loaded)
        assert set(got) == set(reference)
        if _same_case(loaded, case):  # the mutation missed every value: the same reference
            for name, value in reference.items():
                assert got[name].tobytes() == value.tobytes(), name
    ml.oracle.save_outputs(good, reference)
    bad.write_bytes(_mutated(data.draw, good.read_bytes()))
    try:
        outputs = ml.oracle.load_outputs(bad, case)
    except OracleInputError as e:
        assert str(bad) in str(e)
    else:
        try:
            report = ml.oracle.compare(case, outputs, outputs=list(outputs))
        except OracleInputError:  # a named refusal of what was read (a non-finite value, ...)
            return
        if all(outputs[k].tobytes() == reference[k].tobytes() for k in outputs):
            assert report.passed  # the reference's own bits, read back, pass


def _same_case(a, b):
    """The same problem: every tensor bit for bit, and the options."""
    return (sorted(a.tensors) == sorted(b.tensors)
            and all(a.tensors[k].dtype == b.tensors[k].dtype
                    and a.tensors[k].tobytes() == b.tensors[k].tobytes() for k in a.tensors)
            and (a.scaling, a.fan_in_fan_out, a.detach_norm, a.block)
            == (b.scaling, b.fan_in_fan_out, b.detach_norm, b.block))


@HOSTILE
@given(data=st.data())
def test_mutated_adapter_folders_give_an_adapter_error_or_a_valid_adapter(tmp_path_factory,
                                                                         data):
    folder = _adapter_folder(tmp_path_factory.mktemp("adapter") / "a")
    name = data.draw(st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]))
    (folder / name).write_bytes(_mutated(data.draw, (folder / name).read_bytes()))
    try:
        adapters = ml.peft.load_adapter(folder)
    except ml.peft.AdapterError:
        return
    # a valid adapter: save_adapter accepts it and it reads back the same
    ml.peft.save_adapter(folder.parent / "again", adapters)
    assert_adapters_equal(ml.peft.load_adapter(folder.parent / "again"), adapters)
    for a in adapters.values():
        assert a.A.ndim == 2 and a.B.shape[1] == a.A.shape[0] and np.isfinite(a.scaling)


GOOD = b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}'
DATA = np.array([1, 2, 3], "<f4").tobytes()


@pytest.mark.parametrize(("data", "pattern"), [
    (_file(GOOD, b"\x00" + DATA[:-1]) + DATA[-1:], None),  # a byte inserted: see below
    (_file(GOOD, DATA + b"\x00"), "bytes beyond the last tensor"),
    (_file(b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}}', b"\0" * 4 + DATA),
     "hole or overlap"),
    (_file(b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},'
           b'"b":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}', DATA), "hole or overlap"),
    (_file(b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[false,12]}}', DATA),
     "non-negative integer"),
    (_file(b'{"__metadata__":[1],"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}', DATA),
     "__metadata__ must be an object"),
    (_file(b'{"__metadata__":{},"__metadata__":{}}'), "__metadata__ twice"),
    (_file(b"\xef\xbb\xbf" + GOOD, DATA), "not valid JSON"),
    (_file(GOOD.decode().encode("utf-16"), DATA), "not valid UTF-8|not valid JSON"),
    (_file(b"[" * 200_000 + b"]" * 200_000), "nests deeper"),
    (_file(b'{"a":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,12]}}', DATA),
     "non-negative integer"),
    (_file(b'{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,12]}}',
           DATA), "overflows"),
    (_file(b'{"a":{"dtype":["F32"],"shape":[3],"data_offsets":[0,12]}}', DATA),
     "unknown dtype"),
    (_file(b'{"a":{"dtype":"F32","shape":[1' + b"0" * 5000 + b'],"data_offsets":[0,12]}}',
           DATA), "number out of range"),
    (_file(b'{"a":{"dtype":"F32","dtype":"F32","shape":[3],"data_offsets":[0,12]}}', DATA),
     "duplicate field"),
])
def test_malformed_safetensors_are_refused_by_name(tmp_path, data, pattern):
    if pattern is None:  # the length prefix no longer matches the shifted data
        data, pattern = _file(GOOD, b"\x00" + DATA), "bytes beyond the last tensor"
    assert_safetensors_refused(tmp_path / "bad.safetensors", data, pattern)


def test_a_repeated_tensor_name_keeps_its_last_entry_as_the_package_does():
    data = _file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                 b'"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}', DATA)
    tensors, _ = safetensors.loads(data)
    assert tensors["a"].tolist() == [1.0, 2.0, 3.0]


# -- npz ----------------------------------------------------------------------------------------

def _npz(members):
    """An .npz built member by member (names as given, so duplicates and odd names are kept)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, payload in members:
            if isinstance(payload, np.ndarray):
                b = io.BytesIO()
                np.save(b, payload)
                payload = b.getvalue()
            z.writestr(name, payload)
    return buffer.getvalue()


def _write_npz(path, members):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we want
        path.write_bytes(_npz(members))
    return path


@pytest.mark.parametrize(("members", "pattern"), [
    ([("x.npy", np.ones(2)), ("x.npy", np.zeros(2))], "two arrays named 'x'"),
    ([("x", b"raw bytes")], "not a .npy array"),
    ([("x.npy", b"\x93NUMPY\x01\x00" + b"garbage")], "no valid .npy header"),
    ([("x.npy", np.array([object()], dtype=object))], "only plain arrays"),
])
def test_malformed_npz_are_refused_by_name(tmp_path, members, pattern):
    path = _write_npz(tmp_path / "bad.npz", members)
    with pytest.raises(npz.NpzError, match=pattern) as e:
        npz.load(path)
    assert str(path) in str(e.value)


def _declares(shape, payload):
    """A .npy member whose header declares ``shape`` (float32) over ``payload`` bytes."""
    b = io.BytesIO()
    npy = np.lib.format
    npy.write_array_header_1_0(b, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return b.getvalue() + payload


def test_a_small_npz_declaring_a_huge_array_is_refused_before_decompressing(tmp_path):
    """A 1 GiB x of zeros compresses to about 1 MB. Its shape does not fit the case's W, so
    the refusal comes from the headers alone: the process never holds the gigabyte."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:  # written in chunks: 1 GiB of zeros
            f.write(_declares((2**28, 1), b""))  # (2**28, 1) float32
            chunk = b"\x00" * 2**24
            for _ in range(2**30 // len(chunk)):
                f.write(chunk)
        for name, shape in (("W", (3, 4)), ("A", (2, 4)), ("B", (3, 2)), ("dy", (5, 3))):
            b = io.BytesIO()
            np.save(b, np.zeros(shape, np.float32))
            z.writestr(f"{name}.npy", b.getvalue())
    assert path.stat().st_size < 5 * 2**20
    code = ("import minilora as ml, sys\n"
            "try:\n    ml.oracle.load_case(sys.argv[1])\nexcept ml.oracle.OracleInputError as e:\n"
            "    print(e)\n"
            "status = open('/proc/self/status').read()\n"
            "print(int(status.split('VmHWM:')[1].split()[0]))  # peak RSS of this process, KiB")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    message, peak_kib = out.stdout.strip().rsplit("\n", 1)
    assert "d_in" in message and str(path) in message
    assert int(peak_kib) < 600 * 1024  # well below the gigabyte


def test_a_member_whose_header_lies_about_its_size_is_refused(tmp_path):
    path = _write_npz(tmp_path / "lie.npz", [("x.npy", _declares((1000,), b"\x00" * 40))])
    with pytest.raises(npz.NpzError, match="declares shape"):
        npz.load(path)


@pytest.mark.parametrize("metadata", ["[1, 2]", "7", "null", '{"a": [1]}', "[" * 200_000,
                                      '{"scaling": ' + "9" * 5000 + "}"])
def test_case_metadata_that_is_not_an_object_of_scalars_is_refused(tmp_path, metadata):
    case = ml.oracle.make_case(d_in=4, d_out=3, r=2, seed=0)
    path = tmp_path / "case.npz"
    np.savez(path, __metadata__=np.array(metadata), **case.tensors)
    with pytest.raises(OracleInputError, match="__metadata__"):
        ml.oracle.load_case(path)


# -- checkpoints --------------------------------------------------------------------------------

def _model():
    from minilora.toolkit.modules import ReLU, Sequential

    return Sequential(ml.LoRALinear(4, 3, r=2, seed=0, use_dora=True), ReLU(),
                      ml.LoRALinear(3, 2, r=1, seed=1))


@pytest.mark.parametrize(("change", "pattern"), [
    ("float64", r"0\.m is float64\(3,\), the model's is float32\(3,\)"),
    ("int", r"0\.m is int32"), ("complex", r"0\.m is complex64"), ("string", r"0\.m is <U1"),
    ("nan", r"0\.m holds NaN or infinity"), ("inf", r"0\.m holds NaN or infinity"),
    ("missing m", r"missing \['0\.m'\]"), ("extra", r"unexpected \['9\.Z'\]"),
    ("shape", r"0\.m is float32\(7,\)")])
def test_load_trainable_validates_everything_before_assigning_anything(tmp_path, change,
                                                                       pattern):
    model = _model()
    saved = {k: v.copy() + 1 for k, v in model.parameters().items()}
    name = "0.m"
    if change == "float64":
        saved[name] = saved[name].astype(np.float64)
    elif change == "int":
        saved[name] = saved[name].astype(np.int32)
    elif change == "complex":
        saved[name] = saved[name].astype(np.complex64)
    elif change == "string":
        saved[name] = np.array(["a"] * saved[name].size)
    elif change in ("nan", "inf"):
        saved[name][0] = np.nan if change == "nan" else np.inf
    elif change == "missing m":
        del saved[name]
    elif change == "extra":
        saved["9.Z"] = np.zeros(2, np.float32)
    else:
        saved[name] = np.zeros(7, np.float32)
    np.savez(tmp_path / "t.npz", **saved)
    before = {k: v.copy() for k, v in model.parameters().items()}
    with pytest.raises(ValueError, match=pattern) as e:  # the array and what is wrong, by name
        checkpoint.load_trainable(tmp_path / "t.npz", model)
    assert str(tmp_path / "t.npz") in str(e.value)
    for k, v in model.parameters().items():
        np.testing.assert_array_equal(v, before[k])


# -- PEFT adapter folders -----------------------------------------------------------------------

def _adapter_folder(path, config=None, tensors=None):
    layer = ml.LoRALinear(6, 4, r=2, alpha=4, seed=0)
    layer.B[...] = 1.0
    ml.peft.save_adapter(path, {"q": layer})
    if config is not None:
        base = json.loads((path / "adapter_config.json").read_text())
        base.update(config)
        (path / "adapter_config.json").write_text(json.dumps(base))
    if tensors is not None:
        t, meta = safetensors.load(path / "adapter_model.safetensors")
        t.update(tensors)
        safetensors.save(path / "adapter_model.safetensors", t, meta)
    return path


P = "base_model.model.q."


@pytest.mark.parametrize(("config", "tensors", "pattern"), [
    (None, {P + "lora_B.bias": np.zeros(4, np.float32)}, "lora_B.bias"),
    (None, {P + "lora_A.weight": np.zeros((2, 6), np.int32)}, "not a float"),
    (None, {P + "lora_B.weight": np.full((4, 2), np.nan, np.float32)}, "NaN"),
    (None, {"base_model.model.q.lora_A.other.weight": np.zeros((2, 6), np.float32)},
     "lora_A.other.weight"),
    (None, {P + "lora_magnitude_vector": np.ones(4, np.float32)}, "use_dora: false"),
    ({"bias": "all"}, None, "bias='all'"),
    ({"modules_to_save": ["classifier"]}, None, "modules_to_save"),
    ({"target_modules": ["k_proj"]}, None, "not among target_modules"),
    ({"target_modules": "k.*"}, None, "not among target_modules"),
    ({"fan_in_fan_out": "false"}, None, "fan_in_fan_out must be true or false"),
    ({"use_dora": 1}, None, "use_dora must be true or false"),
    ({"lora_alpha": [8]}, None, "lora_alpha must be a finite number"),
    ({"r": 2.0}, None, "r must be a positive integer"),
    ({"r": True}, None, "r must be a positive integer"),
    ({"lora_bias": True}, None, "lora_bias"),
    ({"rank_pattern": {"(a|a)+b": 2}}, None, "alternation"),
    ({"rank_pattern": {"(a+)+b": 2}}, None, "nests quantifiers"),
    ({"rank_pattern": {"(": 2}}, None, "not a valid regular expression"),
    ({"alpha_pattern": {"q": "8"}}, None, "finite numbers"),
    ({"rank_pattern": {"q": 0}}, None, "positive integers"),
])
def test_adapters_minilora_cannot_represent_are_refused_naming_the_key(tmp_path, config,
                                                                      tensors, pattern):
    path = _adapter_folder(tmp_path / "adapter", config, tensors)
    with pytest.raises(ml.peft.AdapterError, match=pattern):
        ml.peft.load_adapter(path)


@pytest.mark.parametrize("text", ["[]", "null", "3", '"LORA"', "[" * 200_000,
                                  '{"lora_alpha": NaN}', '{"lora_alpha": Infinity}',
                                  '{"r": 1' + "0" * 5000 + "}"])
def test_malformed_adapter_configs_are_adapter_errors(tmp_path, text):
    path = _adapter_folder(tmp_path / "adapter")
    (path / "adapter_config.json").write_text(text)
    with pytest.raises(ml.peft.AdapterError, match=r"adapter_config\.json"):
        ml.peft.load_adapter(path)


def test_a_catastrophic_pattern_is_refused_at_once_not_matched_for_minutes(tmp_path):
    """rank_pattern {"(a|a)+b": 4} against a 34-character name backtracks for minutes in
    Python's re: the reader refuses the pattern before matching (here in a subprocess with a
    generous limit, so a regression fails instead of hanging the suite)."""
    path = tmp_path / "adapter"
    layer = ml.LoRALinear(6, 4, r=2, seed=0)
    ml.peft.save_adapter(path, {"a" * 34: layer})
    config = json.loads((path / "adapter_config.json").read_text())
    config["rank_pattern"] = {"(a|a)+b": 4}
    (path / "adapter_config.json").write_text(json.dumps(config))
    code = ("import minilora as ml, sys\ntry:\n    ml.peft.load_adapter(sys.argv[1])\n"
            "except ml.peft.AdapterError as e:\n    print('refused:', e)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "refused" in out.stdout, out


def test_real_peft_patterns_are_accepted(tmp_path):
    path = _adapter_folder(tmp_path / "adapter", {
        "rank_pattern": {r"model\.layers\.\d+\.mlp": 4, "(q|k)": 2},
        "alpha_pattern": {r"^q$": 4.0}, "target_modules": r".*(q|v)"})
    assert ml.peft.load_adapter(path)["q"].r == 2


def test_save_adapter_validates_before_touching_the_old_folder(tmp_path):
    path = _adapter_folder(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    layer = ml.LoRALinear(6, 4, r=2, seed=1)
    adapter = ml.peft.Adapter.from_layer(layer)
    adapter.alpha = tmp_path  # a Path is no number
    with pytest.raises(TypeError, match="alpha must be a real number, got PosixPath"):
        ml.peft.save_adapter(path, {"q": adapter})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    adapter.alpha = np.float32(6.0)  # a NumPy number is written as a JSON number
    ml.peft.save_adapter(path, {"q": adapter})
    assert ml.peft.load_adapter(path)["q"].alpha == 6.0


@pytest.mark.parametrize("failure", ["fsync", "second rename"])
def test_save_adapter_interrupted_leaves_the_old_adapter_whole(tmp_path, monkeypatch, failure):
    path = _adapter_folder(tmp_path / "adapter")
    (path / "README.md").write_text("the user's notes")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    layer = ml.LoRALinear(6, 4, r=2, alpha=16, seed=7)
    if failure == "fsync":
        def broken(fd):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(os, "fsync", broken)
        with pytest.raises(OSError, match=str(path)):
            ml.peft.save_adapter(path, {"q": layer})
        monkeypatch.undo()
    else:
        real, calls = os.rename, []

        def interrupted(src, dst):
            calls.append(src)
            if len(calls) == 2:
                raise KeyboardInterrupt
            real(src, dst)
        monkeypatch.setattr(os, "rename", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ml.peft.save_adapter(path, {"q": layer})
        monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporaries left
    ml.peft.save_adapter(path, {"q": layer})  # and a good save keeps the user's file
    assert (path / "README.md").read_text() == "the user's notes"
    assert ml.peft.load_adapter(path)["q"].alpha == 16.0


def test_save_adapter_makes_missing_parent_folders(tmp_path):
    layer = ml.LoRALinear(6, 4, r=2, seed=0)
    path = tmp_path / "new" / "nested" / "adapter"
    ml.peft.save_adapter(path, {"q": layer})
    assert set(ml.peft.load_adapter(path)) == {"q"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]


def test_written_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = _adapter_folder(tmp_path / "adapter")
        ml.oracle.save_case(tmp_path / "c.npz", ml.oracle.make_case(d_in=3, d_out=2, r=1))
    finally:
        os.umask(old)
    for f in (path / "adapter_config.json", path / "adapter_model.safetensors",
              tmp_path / "c.npz"):
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert path.stat().st_mode & 0o777 == 0o755


# -- the command line ---------------------------------------------------------------------------

def _one_line_error(capsys, argv, expect):
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and expect in lines[-1], err
    return out


@pytest.mark.parametrize(("argv", "expect"), [
    (["demo", "--r", "0"], "positive integer"),
    (["demo", "--epochs", "-1"], "positive integer"),
    (["demo", "--json", "missing/d.json"], "no folder"),
    (["bench", "--json", "missing/b.json"], "no folder"),
    (["oracle", "case", "--d-in", "4", "--d-out", "3", "--r", "1", "--alpha", "nan", "--seed",
      "0", "-o", "c.npz"], "finite"),
    (["oracle", "case", "--d-in", "4", "--d-out", "3", "--r", "1", "--dropout", "1", "--seed",
      "0", "-o", "c.npz"], "[0, 1)"),
    (["oracle", "case", "--d-in", "100000", "--d-out", "100000", "--r", "1", "--seed", "0",
      "-o", "c.npz"], "GiB"),
    (["oracle", "case", "--d-in", "4", "--d-out", "3", "--r", "1", "--seed", "0", "-o",
      "c.txt"], ".npz or .safetensors"),
])
def test_bad_arguments_fail_up_front_with_one_line(tmp_path, monkeypatch, capsys, argv, expect):
    monkeypatch.chdir(tmp_path)
    out = _one_line_error(capsys, argv, expect)
    assert "epoch" not in out  # nothing ran before the refusal
    assert not (tmp_path / "c.npz").exists()


def test_demo_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = _one_line_error(capsys, ["demo", "--plot", str(tmp_path / "p.png")], "matplotlib")
    assert "epoch" not in out


def test_reference_refuses_to_write_over_its_case(tmp_path, capsys):
    case = tmp_path / "case.npz"
    assert main(["oracle", "case", "--d-in", "4", "--d-out", "3", "--r", "1", "--seed", "0",
                 "-o", str(case)]) == 0
    before = case.read_bytes()
    _one_line_error(capsys, ["oracle", "reference", str(case), "-o", str(case)], "input")
    assert case.read_bytes() == before
    _one_line_error(capsys, ["oracle", "compare", str(case), str(case), "--json", str(case)],
                    "input")
    assert case.read_bytes() == before


def test_write_errors_name_the_users_path_not_a_temporary(tmp_path, monkeypatch):
    from minilora.formats._io import write_atomic

    def broken(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken)
    target = tmp_path / "out.npz"
    with pytest.raises(OSError) as e:
        write_atomic(target, b"data")
    assert e.value.filename == str(target) and ".tmp-" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
