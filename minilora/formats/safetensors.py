"""Reading and writing ``.safetensors`` files with NumPy alone.

The format (huggingface/safetensors): an 8-byte little-endian header length n, n bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
tensors' bytes, little-endian and C-ordered, offsets relative to the end of the header. BF16 and
F16 tensors are widened to float32 on reading (NumPy has no bfloat16).

The reader accepts exactly the files the ``safetensors`` package (its Rust core) accepts, and
refuses the rest with ``SafetensorsError`` naming the problem (tests/test_hostile_files.py checks
the two against each other on generated and mutated files):

* the header: at most 100,000,000 bytes, strict UTF-8 (no byte-order mark), JSON as serde_json
  reads it: no NaN or Infinity, no lone surrogates, numbers within range, nesting at most 127
  deep; a tensor entry is an object with dtype, shape and data_offsets, each once (other keys
  are ignored), or the list [dtype, shape, data_offsets]; shapes and offsets are non-negative
  integers below 2⁶⁴; ``__metadata__`` is null or an object of strings and appears at most once;
  a tensor name given twice keeps its last entry;
* the data: sorted by offsets, the tensors tile the data section exactly, with no hole, no
  overlap and no trailing byte, and each spans shape × dtype size bytes (computed without
  overflow).

Dtypes the package knows but NumPy cannot hold (F8, F6, F4) are refused by name.
"""

import json
import math
import os
import re
import struct

import numpy as np

from minilora.formats._io import write_atomic

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
           "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
           "BOOL": "?", "C64": "<c8"}
_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
         "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
         "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
         "I64": 64, "U64": 64}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}
MAX_HEADER = 100_000_000  # the package's limit
MAX_DEPTH = 127  # serde_json's nesting limit
USIZE_MAX = 2**64 - 1


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file."""


class _Object(list):
    """A JSON object as its list of (key, value) pairs, duplicates kept (serde decides per
    context whether a duplicate is an error or the last one wins)."""


class _Float(float):
    """A JSON number written with a fraction or exponent (never a usize for serde)."""


def _parse_int(text):
    if text.startswith("-") or len(text) > 20 or int(text) > USIZE_MAX:
        value = float(text)  # serde_json reads it as a float: fine where ignored, not a usize
        if math.isinf(value):
            raise ValueError("number out of range")
        return _Float(value)
    return int(text)


def _parse_float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return _Float(value)


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _check_strings(value):
    """serde_json refuses lone surrogates (Python's json allows them)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)
    elif isinstance(value, tuple):
        for v in value:
            _check_strings(v)


_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _nesting_depth(text):
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), computed
    without recursion so that 200,000 nested brackets cost nothing."""
    depth = deepest = 0
    for match in _STRUCTURE.finditer(text):
        c = match.group()[:1]
        if c in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def _usize(value, what):
    if type(value) is not int or not 0 <= value <= USIZE_MAX:
        raise SafetensorsError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _tensor_info(name, info):
    """(dtype, shape, (begin, end)) from a header entry, as serde would deserialize it."""
    if isinstance(info, _Object):
        fields = {}
        for key, value in info:
            if key in ("dtype", "shape", "data_offsets"):
                if key in fields:
                    raise SafetensorsError(f"tensor {name!r}: duplicate field {key!r}")
                fields[key] = value
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in fields]
        if missing:
            raise SafetensorsError(f"tensor {name!r}: missing field {missing[0]!r}")
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    elif isinstance(info, list) and len(info) == 3:
        dtype, shape, offsets = info
    else:
        raise SafetensorsError(f"tensor {name!r}: expected an object with dtype, shape and "
                               f"data_offsets, got {type(info).__name__}")
    if isinstance(dtype, _Object) and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]  # serde's map form of a unit variant: {"F32": null}
    if not isinstance(dtype, str) or dtype not in _BITS:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list):
        raise SafetensorsError(f"tensor {name!r}: shape must be a list, got {shape!r}")
    shape = [_usize(d, f"tensor {name!r}: a dimension of its shape") for d in shape]
    if not (isinstance(offsets, list) and len(offsets) == 2):
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end], "
                               f"got {offsets!r}")
    begin, end = (_usize(o, f"tensor {name!r}: data_offsets") for o in offsets)
    return dtype, shape, (begin, end)


def parse_header(raw):
    """``(entries, metadata)`` from the header bytes: entries ``{name: (dtype, shape,
    (begin, end))}``, metadata ``{str: str}``. SafetensorsError if the package would refuse it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"header is not valid UTF-8 ({e})") from None
    if _nesting_depth(raw) > MAX_DEPTH:
        raise SafetensorsError(f"header nests deeper than {MAX_DEPTH} levels")
    try:
        top = json.loads(text, object_pairs_hook=_Object, parse_int=_parse_int,
                         parse_float=_parse_float, parse_constant=_reject_constant)
        _check_strings(top)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, surrogates, number range
        raise SafetensorsError(f"header is not valid JSON ({e})") from None
    if not isinstance(top, _Object):
        raise SafetensorsError(f"header must be a JSON object, got {type(top).__name__}")
    entries, metadata, seen_metadata = {}, {}, False
    for key, value in top:
        if key == "__metadata__":
            if seen_metadata:
                raise SafetensorsError("header has __metadata__ twice")
            seen_metadata = True
            if value is None:
                continue
            if not isinstance(value, _Object):
                raise SafetensorsError("__metadata__ must be an object of strings")
            metadata = {}
            for k, v in value:
                if not isinstance(v, str):
                    raise SafetensorsError(f"__metadata__ value of {k!r} must be a string, "
                                           f"got {v!r}")
                metadata[k] = v
        else:
            entries[key] = _tensor_info(key, value)  # a repeated name keeps its last entry
    return entries, metadata


def check_layout(entries, data_size):
    """The package's validation: sorted by offsets, the tensors tile ``data_size`` bytes."""
    start = 0
    for name, (dtype, shape, (begin, end)) in sorted(entries.items(), key=lambda e: e[1][2]):
        if begin != start or end < begin:
            raise SafetensorsError(f"tensor {name!r}: data_offsets [{begin}, {end}] leave a hole "
                                   f"or overlap (expected it to begin at {start})")
        count = 1
        for d in shape:
            count *= d
            if count > USIZE_MAX:
                raise SafetensorsError(f"tensor {name!r}: shape {shape} overflows")
        bits = count * _BITS[dtype]
        if bits > USIZE_MAX:
            raise SafetensorsError(f"tensor {name!r}: shape {shape} overflows")
        if bits % 8:
            raise SafetensorsError(f"tensor {name!r}: {dtype} of shape {shape} does not end "
                                   f"on a byte boundary")
        if end - begin != bits // 8:
            raise SafetensorsError(f"tensor {name!r} of shape {shape} and dtype {dtype} needs "
                                   f"{bits // 8} bytes, its offsets give {end - begin}")
        start = end
    if start != data_size:
        raise SafetensorsError(f"the tensors cover {start} bytes of a {data_size}-byte data "
                               f"section (truncated file, or bytes beyond the last tensor)")


def _validated_header(read, size, name):
    """``(entries, metadata, data_start)`` of a file of ``size`` bytes whose bytes ``read(offset,
    n)`` returns, with every check the package makes (the layout against the file's size)."""
    try:
        if size < 8:
            raise SafetensorsError(f"too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", read(0, 8))
        if n > MAX_HEADER:
            raise SafetensorsError(f"header length {n} exceeds the format's {MAX_HEADER}")
        if 8 + n > size:
            raise SafetensorsError(f"header length {n} does not fit a {size}-byte file")
        entries, metadata = parse_header(read(8, n))
        check_layout(entries, size - 8 - n)
        unreadable = sorted({dtype for dtype, _, _ in entries.values()} - set(_DTYPES))
        if unreadable:
            raise SafetensorsError(f"dtype {unreadable[0]} is valid safetensors but has no "
                                   f"NumPy equivalent")
    except SafetensorsError as e:
        raise SafetensorsError(f"{name}: {e}") from None
    return entries, metadata, 8 + n


def loads(data, name="<bytes>"):
    """``(tensors, metadata)`` from the bytes of a safetensors file (see the module docstring)."""
    entries, metadata, start = _validated_header(lambda o, n: bytes(data[o:o + n]), len(data),
                                                 name)
    body = memoryview(data)[start:]
    return {k: _array(dtype, shape, body[b:e]) for k, (dtype, shape, (b, e)) in
            entries.items()}, metadata


def _array(dtype, shape, raw):
    if dtype == "BF16":  # the high half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    array = np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape)
    if dtype == "F16":
        return array.astype(np.float32)
    return array.astype(array.dtype.newbyteorder("="))  # a writable native-order copy


def load(path):
    """Read a safetensors file: returns ``(tensors, metadata)``, dicts of arrays and of strings."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read: {e.strerror or e}") from None
    return loads(data, str(path))


def read_header(f, name):
    """``(entries, metadata, data_start)`` of the open safetensors file ``f``, validated as
    ``loads`` validates a whole file (the layout against the file's size) while reading only
    the header: the data is then read tensor by tensor (``read_tensor``)."""
    def read(offset, n):
        f.seek(offset)
        raw = f.read(n)
        if len(raw) != n:  # the file shrank since its size was taken
            raise SafetensorsError("ended inside its header")
        return raw

    return _validated_header(read, os.fstat(f.fileno()).st_size, name)


def read_tensor(f, entry, data_start):
    """One tensor of the open file ``f`` from its header ``entry`` (as ``read_header`` gives
    it), as ``loads`` would return it."""
    dtype, shape, (begin, end) = entry
    f.seek(data_start + begin)
    stored = np.dtype(_DTYPES[dtype])
    count = (end - begin) // stored.itemsize
    # np.fromfile reads straight into the array: the tensor is in memory once, not as bytes too
    flat = np.fromfile(f, dtype=stored, count=count) if count else np.empty(0, stored)
    if flat.size != count:  # the file shrank since its header was read
        raise SafetensorsError(f"{f.name}: ended inside a tensor's data")
    if dtype == "BF16":  # the high half of a float32
        return (flat.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype == "F16":
        return flat.astype(np.float32).reshape(shape)
    return flat.astype(stored.newbyteorder("="), copy=False).reshape(shape)


def dumps(tensors, metadata=None):
    """The bytes of a safetensors file holding ``tensors`` (name -> array) and ``metadata``."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])  # (ascontiguousarray would turn a 0-d array into 1-d)
        if a.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes(order="C")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes, as the reference does
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def save(path, tensors, metadata=None):
    """Write a safetensors file atomically."""
    write_atomic(path, dumps(tensors, metadata))
