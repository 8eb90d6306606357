"""Token embedding: a row lookup and, backward, a scatter-add of rows.

    h[b, t] = weight[ids[b, t]]                              (B, T, d)
    dweight[v] = Σ_{(b, t): ids[b, t] = v} dh[b, t]          (V, d)

The lookup is linear in weight with a 0/1 matrix (one 1 per token, in row ids[b, t]), so its
backward is that matrix transposed: each token's gradient row goes back to the row it read, and
a token id that occurs n times collects n rows. ids carry no gradient.
"""

from typing import NamedTuple

import numpy as np

from minilora.ops._checks import check_dtypes, plain_array


def check_ids(ids, name, V, *, allowed=None):
    """Check that ``ids`` is an integer ndarray with every entry in [0, V) (or equal to
    ``allowed``, e.g. an ignore_index); return it as a plain ndarray. TypeError for a non-integer
    dtype, ValueError naming the first offending id and its position."""
    ids = plain_array(ids, name)
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= V)  # ids' shape
    if allowed is not None:
        bad &= ids != allowed
    if np.any(bad):
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        also = "" if allowed is None else f" or equal to {allowed}"
        raise ValueError(f"{name}[{', '.join(map(str, pos))}] = {int(ids[pos])} is out of range: "
                         f"ids must be in [0, {V}){also}")
    return ids


class EmbeddingCache(NamedTuple):
    """What ``embedding_backward`` needs: a copy of the ids (so changing the caller's array
    cannot change the gradient) and the table's shape and dtype."""

    ids: np.ndarray  # (B, T), a copy
    V: int
    d: int
    dtype: np.dtype


def embedding_forward(ids, weight):
    """Token embedding, forward pass.

    Parameters
    ----------
    ids : (B, T) integer array, each in [0, V)
    weight : (V, d) float32 or float64 embedding table

    Returns
    -------
    h : (B, T, d), a new array (rows copied, never a view of weight)
    cache : EmbeddingCache for ``embedding_backward``

    Notes
    -----
    h[b, t] = weight[ids[b, t]].
    """
    _, arrays = check_dtypes(weight=weight)
    weight = arrays["weight"]
    if weight.ndim != 2:
        raise ValueError(f"weight must be (V, d), got weight {weight.shape}")
    V, d = weight.shape
    ids = check_ids(ids, "ids", V)
    if ids.ndim != 2:
        raise ValueError(f"ids must be (B, T), got ids {ids.shape}")
    h = weight[ids]  # (B, T, d), fancy indexing copies
    return h, EmbeddingCache(ids.copy(), V, d, weight.dtype)


def embedding_backward(dh, cache):
    """Token embedding, backward pass.

    Parameters
    ----------
    dh : (B, T, d), ∂L/∂h, the forward's dtype
    cache : EmbeddingCache from ``embedding_forward``

    Returns
    -------
    dweight : (V, d), a new array, zero in the rows no token used

    Notes
    -----
    dweight[v] = Σ_{(b, t): ids[b, t] = v} dh[b, t]  (np.add.at: repeated ids accumulate).
    """
    if type(cache) is not EmbeddingCache:
        raise TypeError(f"cache must be the EmbeddingCache from embedding_forward, "
                        f"got {type(cache).__name__}")
    dh = plain_array(dh, "dh")
    expected = cache.ids.shape + (cache.d,)
    if dh.shape != expected or dh.dtype != cache.dtype:
        raise ValueError(f"dh must be {cache.dtype}{expected} like the forward's h, "
                         f"got dh {dh.dtype}{dh.shape}")
    dweight = np.zeros((cache.V, cache.d), dtype=cache.dtype)  # (V, d)
    np.add.at(dweight, cache.ids.ravel(), dh.reshape(-1, cache.d))  # rows scatter-added
    return dweight
