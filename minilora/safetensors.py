"""Reading and writing ``.safetensors`` files with NumPy alone.

The format (huggingface/safetensors): an 8-byte little-endian header length n, n bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
tensors' bytes, little-endian and C-ordered, offsets relative to the end of the header. BF16 and
F16 tensors are widened to float32 on reading (NumPy has no bfloat16). Every offset, shape and
size is checked against the file before any byte is used: a truncated or malformed file raises
``SafetensorsError`` naming the problem, never a crash or a silently wrong array.
"""

import json
import struct

import numpy as np

from minilora._io import write_atomic

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file."""


def load(path):
    """Read a safetensors file: returns ``(tensors, metadata)``, dicts of arrays and of strings."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) < 8:
        raise SafetensorsError(f"{path}: too short to be a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise SafetensorsError(f"{path}: header length {n} does not fit a {len(data)}-byte file")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        tensors[name] = _tensor(path, name, info, body)
    return tensors, metadata


def _tensor(path, name, info, body):
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets") \
            from None
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(body)):
        raise SafetensorsError(
            f"{path}: tensor {name!r} data_offsets [{begin}, {end}] fall outside the "
            f"{len(body)}-byte data section (truncated file?)")
    if dtype == "BF16":
        np_dtype, itemsize = None, 2
    elif dtype in _DTYPES:
        np_dtype = np.dtype(_DTYPES[dtype])
        itemsize = np_dtype.itemsize
    else:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if (end - begin) != count * itemsize:
        raise SafetensorsError(
            f"{path}: tensor {name!r} of shape {shape} and dtype {dtype} needs "
            f"{count * itemsize} bytes, its offsets give {end - begin}")
    raw = body[begin:end]
    if dtype == "BF16":  # the high half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tuple(shape))
    array = np.frombuffer(raw, dtype=np_dtype).reshape(tuple(shape))
    if dtype == "F16":
        return array.astype(np.float32)
    return array.astype(np_dtype.newbyteorder("="))  # a writable native-order copy


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
