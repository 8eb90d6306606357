"""Text that every machine has, and a byte-level tokenizer: the data of the language-model demo.

No download: the Python standard library's own files are the corpus.

- ``"code"``: the source of the standard library's top-level modules (``Lib/*.py``), in name
  order: Python code, comments and docstrings.
- ``"prose"``: English reference text: the help topics that ``help("assert")`` prints
  (``pydoc_data.topics``), or, where a distribution strips that module, the docstrings of the
  standard library's modules, functions and classes (read with ``ast``, never imported).

A token is a byte (vocabulary 256), so any text round-trips and nothing is learnt before the
model is: ``decode(encode(s)) == s`` for every string.
"""

import ast
import sysconfig
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
KINDS = ("code", "prose")


def encode(text):
    """The UTF-8 bytes of ``text`` as token ids, int64 (n,)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # (n,)


def decode(ids):
    """Token ids back to text (bytes that are not valid UTF-8 become U+FFFD)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must be in [0, {VOCAB_SIZE}), got {ids.min()}..{ids.max()}")
    return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")


def _stdlib():
    return Path(sysconfig.get_paths()["stdlib"])


def _code(limit):
    parts, size = [], 0
    for path in sorted(_stdlib().glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "\n".join(parts)


def _docstrings(limit):
    parts, size = [], 0
    for path in sorted(_stdlib().glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:  # pragma: no cover - the standard library parses
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
                    size += len(doc)
        if size >= limit:
            break
    return "\n\n".join(parts)


def _prose(limit):
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave pydoc_data out
        return _docstrings(limit)
    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus(kind, *, max_chars=2_000_000):
    """The first ``max_chars`` characters of the ``kind`` corpus ("code" or "prose")."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")
    text = (_code if kind == "code" else _prose)(max_chars)
    return text[:max_chars]


def split(ids, *, val_fraction=0.1):
    """(train, validation): the last ``val_fraction`` of the tokens held out, contiguous."""
    n_val = max(1, int(len(ids) * val_fraction))
    return ids[:-n_val], ids[-n_val:]


def windows(ids, batch, seq, rng):
    """``batch`` random windows of ``seq`` tokens: int64 (batch, seq)."""
    if len(ids) < seq:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than seq = {seq}")
    starts = rng.integers(0, len(ids) - seq + 1, size=batch)  # (batch,)
    return np.stack([ids[s:s + seq] for s in starts])  # (batch, seq)
