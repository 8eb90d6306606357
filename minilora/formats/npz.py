"""Reading ``.npz`` files strictly, without pickle and without surprises.

``numpy.load`` is lenient where a test oracle must not be: two members of one name load as "the
last one wins", a member not ending in ``.npy`` comes back as raw bytes, and every member is
decompressed before anything is checked, so a 1 MB file can declare gigabytes. This reader
refuses the first two (``NpzError`` naming the file and the member), reads every member's
``.npy`` header first, checks each declared size against the zip directory, and hands the
declared shapes to the caller's ``check`` before a single data byte is decompressed.
"""

import math
import os
import struct
import zipfile
import zlib

import numpy as np
import numpy.lib.format as npy

MAX_HEADER = 10_000  # bytes of a .npy header (numpy.load's own default limit)


class NpzError(ValueError):
    """The file is not a well-formed .npz archive of plain arrays."""


def load(path, check=None):
    """``{name: array}`` from an .npz file.

    Parameters
    ----------
    path : the file
    check : callable or None, called with ``{name: (shape, dtype)}`` once every header is read
        and before any data is; it raises to refuse the file (its exceptions propagate).
    """
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as zf:
            headers = _headers(path, zf)
            if check is not None:
                check({k: (shape, dtype) for k, (_, shape, dtype, _) in headers.items()})
            return {name: _read(path, zf, *h) for name, h in headers.items()}
    except FileNotFoundError:
        raise NpzError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError,
            NotImplementedError, UnicodeDecodeError, zlib.error, struct.error) as e:
        # not a zip, truncated, encrypted, unknown compression, undecodable names, bad data
        raise NpzError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def _headers(path, zf):
    """name -> (ZipInfo, shape, dtype, Fortran order), every member checked."""
    headers = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise NpzError(f"{path}: member {info.filename!r} is not a .npy array")
        name = info.filename[:-4]
        if name in headers:
            raise NpzError(f"{path}: holds two arrays named {name!r}")
        with zf.open(info) as f:
            try:
                version = npy.read_magic(f)
                reader = npy.read_array_header_1_0 if version == (1, 0) else \
                    npy.read_array_header_2_0
                shape, fortran, dtype = reader(f, max_header_size=MAX_HEADER)
            except (ValueError, TypeError, SyntaxError, OverflowError, RecursionError) as e:
                raise NpzError(f"{path}: {name!r} has no valid .npy header ({e})") from None
            offset = f.tell() if f.seekable() else None
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise NpzError(f"{path}: {name!r} has dtype {dtype}; only plain arrays are read")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset is None or info.file_size != offset + nbytes:
            raise NpzError(f"{path}: {name!r} declares shape {shape} of {dtype} ({nbytes} bytes) "
                           f"but its member holds {info.file_size - (offset or 0)} bytes")
        headers[name] = (info, shape, dtype, fortran)
    return headers


def _read(path, zf, info, shape, dtype, fortran):
    with zf.open(info) as f:
        f.seek(info.file_size - math.prod(shape) * dtype.itemsize)
        data = f.read()
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise NpzError(f"{path}: {info.filename!r} is truncated")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(dtype.newbyteorder("="), order="C")  # a writable native-order copy
