"""Strict JSON files: what a stranger's config file may hold before minilora reads a value of it.

UTF-8 text of bounded size and nesting, one JSON value, no NaN/Infinity constants (Python's
``json`` accepts them; JSON does not), no key twice in one object (``json`` keeps the last one
silently, so two readers could see two different configs).
"""

import json
import re

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


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def read_json(path, error=ValueError, *, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH):
    """The JSON value in the file ``path``; ``error(message)`` (naming the file) for a file that
    cannot be read, is too large, is not UTF-8, nests too deep or is not strict JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: larger than {max_bytes} bytes: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 ({e})") from None
    if nesting_depth(text) > max_depth:
        raise error(f"{path}: nests deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
