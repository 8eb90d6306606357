"""Strict JSON files (config.json, model.safetensors.index.json, adapter_config.json): what a
stranger's file may hold before a value of it is read.

A regular file of bounded size, UTF-8 text of bounded nesting, one JSON value, no NaN/Infinity
constants (Python's ``json`` accepts them; JSON does not). A key given twice in one object keeps
its last value, as the reference readers (Python's ``json``, which transformers and PEFT use)
keep it.
"""

import json
import os
import re
import stat

MAX_DEPTH = 100  # nesting of arrays and objects beyond which a file is refused
MAX_BYTES = 16 * 2**20  # a config or an index larger than this is not one
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def nesting_depth(text):
    """The deepest nesting of arrays and objects in a JSON text (strings skipped), computed
    without recursion so that 200,000 nested brackets cost nothing."""
    depth = deepest = 0
    for match in _STRUCTURE.finditer(text):
        c = match.group()[0]
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def no_constant(name):
    """``json.loads``'s parse_constant: NaN, Infinity and -Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def read_json(path, error=ValueError, *, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH):
    """The JSON value in the file ``path``; ``error(message)`` (naming the file) for a file that
    is not a regular file, cannot be read, is too large, is not UTF-8, nests too deep or is not
    strict JSON."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, a device never end
            raise error(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise error(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: larger than {max_bytes} bytes: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 ({e})") from None
    if nesting_depth(text) > max_depth:
        raise error(f"{path}: nests deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
