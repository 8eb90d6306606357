"""Causal softmax attention with grouped-query heads (GQA), without copies of k and v, and
without keeping the probabilities P.

H query heads share Hkv key/value heads in groups of g = H / Hkv: query head j reads kv head
j // g. Viewing q (B, H, T, D) as (B, Hkv, g, T, D) puts each group's queries beside its kv
head, so every product is one batched matmul and repeat_kv's copies never exist.

Query t sits at absolute position q_offset + t (q_offset: the tokens already in a KV cache) and
sees the keys s ≤ q_offset + t:

    S_ = q kᵀ / √D + M,   M = 0 where s ≤ q_offset + t, −∞ elsewhere      (B, H, T, S)
    P  = softmax(S_) over s  (the row max subtracted before exp)            (B, H, T, S)
    out = P v                                                               (B, H, T, D)
    backward:  dP = dout vᵀ,   dS = P ⊙ (dP − rowsum(dP ⊙ P)),
               dq = dS k / √D,  dk = dSᵀ q / √D,  dv = Pᵀ dout   (dk, dv summed over the group)

Both passes walk the queries in blocks of ``BLOCK`` (FlashAttention's order, Dao et al. 2022,
with whole key rows per block): a block of queries t0 ≤ t < t1 sees only the keys
s < q_offset + t1, so the keys past the block's diagonal are never multiplied, and the scores
of one block at a time exist. The forward keeps, per query row, the log of its softmax
denominator, lse = max + log Σ exp(S_ − max) (B, H, T); the backward recomputes a block's
P = exp(S_ − lse) from q and k instead of keeping B·H·T·S probabilities (134 MB for the
benchmark model's 8 layers), at the price of the block's q kᵀ and exp a second time.

The products are NumPy's (BLAS); the passes over a block's rows are NumPy here, the reference,
and one Numba loop each with ``backend="numba"`` (``minilora.models.attention_numba``).

The outputs out, dq, dk and dv are laid out in memory as (B, T, heads, D), the projections'
layout (token-major), and returned as (B, heads, T, D) views of it: the model's transposes to
(B, T, heads·D) are then free, not copies.
"""

from typing import NamedTuple

import numpy as np

from minilora.ops._checks import (
    FLOAT_DTYPES,
    check_dtypes,
    check_positive_int,
    is_plain,
    plain_array,
)
from minilora.ops.backends import BACKENDS, resolve_backend

BLOCK = 64  # query rows per block: (B, Hkv, g·64, S) scores at a time


class AttentionCache(NamedTuple):
    """What ``attention_backward`` needs: q, k, v and each query row's log-sum-exp."""

    q: np.ndarray  # (B, Hkv, g, T, D), a view of the forward's q
    k: np.ndarray  # (B, Hkv, S, D)
    v: np.ndarray  # (B, Hkv, S, D)
    lse: np.ndarray  # (B, Hkv, g, T), log Σ_s exp(S_) of each query row
    scale: float  # 1 / √D
    q_offset: int  # absolute position of query 0
    block: int  # query rows per block
    q_shape: tuple  # (B, H, T, D)
    backend: str  # "numpy" or "numba": who runs the row passes


def causal_bias(T, S, q_offset, dtype):
    """The additive causal mask M (T, S): 0 where query t (absolute position q_offset + t) may
    see key s (s ≤ q_offset + t), −∞ where it may not. Adding it is one broadcast pass over the
    scores (a boolean-index assignment costs several times more)."""
    hidden = np.arange(S)[None, :] > q_offset + np.arange(T)[:, None]  # (T, S)
    return np.where(hidden, -np.inf, 0.0).astype(dtype)  # (T, S)


def _blocks(T, block):
    """(t0, t1) of each query block."""
    return [(t0, min(t0 + block, T)) for t0 in range(0, T, block)]


def _token_major(*shape, dtype, zero=False):
    """A new (B, heads..., T, D) array laid out in memory as (B, T, heads..., D)."""
    B, *heads, T, D = shape
    a = (np.zeros if zero else np.empty)((B, T, *heads, D), dtype)  # (B, T, heads..., D)
    n = len(heads)
    return a.transpose(0, *range(2, 2 + n), 1, 2 + n)  # (B, heads..., T, D)


# -- a block's row passes: s (R, S₁) holds R = B·Hkv·g·n rows of raw q kᵀ; row ρ is query
#    t = ρ mod n of the block, at absolute position first + t, seeing the keys j ≤ first + t.
#    The NumPy reference in whole-array passes; minilora.models.attention_numba's kernels do
#    each in one two-thread pass.

def _masked_scores(s, scale, n, first):
    """S_ = scale·s + M in place, viewed as (R / n, n, S₁)."""
    S1 = s.shape[1]
    x = s.reshape(-1, n, S1)  # (R / n, n, S₁)
    x *= scale
    x += causal_bias(n, S1, first, s.dtype)  # exp(−∞) = 0 exactly past the diagonal
    return x


def _softmax_block(s, scale, n, first):
    """P = softmax(S_) in place of s, and each row's lse = max + log Σ exp(S_ − max) (R,)."""
    x = _masked_scores(s, scale, n, first)  # (R / n, n, S₁)
    m = x.max(axis=-1, keepdims=True)  # (R / n, n, 1), the row max
    x -= m
    np.exp(x, out=x)
    den = x.sum(axis=-1, keepdims=True)  # (R / n, n, 1)
    x /= den
    return s, (m + np.log(den)).reshape(-1)


def _probabilities_block(s, scale, n, first, lse):
    """P = exp(S_ − lse) in place of s: the forward's P, recomputed."""
    x = _masked_scores(s, scale, n, first)  # (R / n, n, S₁)
    x -= lse.reshape(-1, n, 1)
    return np.exp(s, out=s)


def _softmax_grad_block(P, dP, n, first):
    """dS = P ⊙ (dP − rowsum(dP ⊙ P)) in place of dP."""
    dP -= np.sum(dP * P, axis=-1, keepdims=True)
    dP *= P
    return dP


def _row_passes(backend):
    """(softmax, probabilities, softmax_grad) of a block, by backend."""
    if backend == "numba":
        from minilora.models import attention_numba as k
        return k.softmax_block, k.probabilities_block, k.softmax_grad_block
    return _softmax_block, _probabilities_block, _softmax_grad_block


def attention_forward(q, k, v, *, q_offset=0, block=BLOCK, backend=None):
    """Causal grouped-query attention, forward pass.

    Parameters
    ----------
    q : (B, H, T, D) queries (rope already applied)
    k : (B, Hkv, S, D) keys, S = q_offset + T (past keys first)
    v : (B, Hkv, S, D) values
    q_offset : int ≥ 0, the absolute position of query 0 (the KV cache's length)
    block : int ≥ 1, query rows per block (memory of the scores against the size of a product)
    backend : "numpy", "numba" or None (``minilora.ops.backends``): who runs the row passes

    Returns
    -------
    out : (B, H, T, D), a new array of q's dtype, laid out as (B, T, H, D)
    cache : AttentionCache for ``attention_backward``

    Notes
    -----
    out = softmax(q kᵀ / √D + M) v, with M = −∞ where s > q_offset + t, and query head j using
    kv head j // (H / Hkv).
    """
    _, arrays = check_dtypes(q=q, k=k, v=v)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, Hkv, S, D), got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, Hkv, S, D) with q's B = {B} and D = {D}, "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if T < 1 or D < 1 or Hkv < 1 or H % Hkv:
        raise ValueError(f"need T ≥ 1, D ≥ 1 and H a multiple of Hkv, got q {q.shape} "
                         f"(H = {H}) and k {k.shape} (Hkv = {Hkv})")
    q_offset = check_positive_int(q_offset, "q_offset", minimum=0)
    block = check_positive_int(block, "block", minimum=1)
    backend = resolve_backend(backend)
    if S != q_offset + T:
        raise ValueError(f"k and v must hold S = q_offset + T = {q_offset} + {T} keys, "
                         f"got k {k.shape}")
    softmax = _row_passes(backend)[0]
    g = H // Hkv
    scale = D ** -0.5
    qg = q.reshape(B, Hkv, g, T, D)  # (B, Hkv, g, T, D), a view: head j = group j // g
    out = _token_major(B, Hkv, g, T, D, dtype=q.dtype)  # (B, Hkv, g, T, D) = (B, H, T, D)
    lse = np.empty((B, Hkv, g, T), q.dtype)  # (B, Hkv, g, T)
    for t0, t1 in _blocks(T, block):
        n, S1 = t1 - t0, q_offset + t1  # the block's queries and the keys they see
        q2 = qg[:, :, :, t0:t1].reshape(B, Hkv, g * n, D)  # (B, Hkv, g·n, D), a copy
        s = q2 @ k[:, :, :S1].swapaxes(-1, -2)  # (B, Hkv, g·n, S₁), raw scores
        P, lse_b = softmax(s.reshape(-1, S1), scale, n, q_offset + t0)  # (R, S₁), (R,)
        out[:, :, :, t0:t1] = (P.reshape(B, Hkv, g * n, S1) @ v[:, :, :S1]).reshape(
            B, Hkv, g, n, D)  # (B, Hkv, g, n, D)
        lse[:, :, :, t0:t1] = lse_b.reshape(B, Hkv, g, n)
    return out.reshape(B, H, T, D), AttentionCache(qg, k.view(), v.view(), lse, scale,
                                                   q_offset, block, q.shape, backend)


def _check_cache(cache):
    """The cache's fields as ``attention_forward`` made them (shapes, dtypes, offsets), or
    ValueError: a backward pass on other ones would not be this forward's gradient."""
    q, k, v, lse = cache.q, cache.k, cache.v, cache.lse
    if not all(is_plain(a) for a in (q, k, v, lse)) or q.ndim != 5 or k.ndim != 4 \
            or q.dtype not in FLOAT_DTYPES or any(a.dtype != q.dtype for a in (k, v, lse)):
        raise ValueError("the attention cache was modified after the forward pass")
    B, Hkv, g, T, D = q.shape
    offset, block = cache.q_offset, cache.block
    if k.shape != v.shape or k.shape != (B, Hkv, k.shape[2], D) or lse.shape != q.shape[:-1] \
            or type(offset) is not int or offset < 0 or k.shape[2] != offset + T \
            or type(block) is not int or block < 1 or cache.scale != D ** -0.5 \
            or cache.q_shape != (B, Hkv * g, T, D) or cache.backend not in BACKENDS:
        raise ValueError("the attention cache was modified after the forward pass")


def attention_backward(dout, cache):
    """Causal grouped-query attention, backward pass.

    Parameters
    ----------
    dout : (B, H, T, D), ∂L/∂out, the forward's dtype
    cache : AttentionCache from ``attention_forward``

    Returns
    -------
    dq : (B, H, T, D), laid out as (B, T, H, D)
    dk, dv : (B, Hkv, S, D), each kv head's gradient summed over the g query heads that read
        it, laid out as (B, S, Hkv, D)

    Notes
    -----
    Per query block, P = exp(S_ − lse) (recomputed), then dP = dout vᵀ,
    dS = P ⊙ (dP − rowsum(dP ⊙ P)), dq = dS k / √D, and the block's share of dk = dSᵀ q / √D
    and dv = Pᵀ dout. In the (B, Hkv, g·n, ·) layout the group sums are the products' own sums
    over the g·n rows.
    """
    if type(cache) is not AttentionCache:
        raise TypeError(f"cache must be the AttentionCache from attention_forward, "
                        f"got {type(cache).__name__}")
    _check_cache(cache)
    dout = plain_array(dout, "dout")
    if dout.shape != cache.q_shape or dout.dtype != cache.lse.dtype:
        raise ValueError(f"dout must be {cache.lse.dtype}{cache.q_shape} like the forward's "
                         f"out, got dout {dout.dtype}{dout.shape}")
    _, probabilities, softmax_grad = _row_passes(cache.backend)
    q, k, v, scale, offset = cache.q, cache.k, cache.v, cache.scale, cache.q_offset
    B, Hkv, g, T, D = q.shape
    do = dout.reshape(q.shape)  # (B, Hkv, g, T, D)
    dq = _token_major(*q.shape, dtype=q.dtype)  # (B, Hkv, g, T, D)
    dk = _token_major(*k.shape, dtype=k.dtype, zero=True)  # (B, Hkv, S, D)
    dv = _token_major(*v.shape, dtype=v.dtype, zero=True)  # (B, Hkv, S, D)
    for t0, t1 in _blocks(T, cache.block):
        n, S1 = t1 - t0, offset + t1
        q2 = q[:, :, :, t0:t1].reshape(B, Hkv, g * n, D)  # (B, Hkv, g·n, D), a copy
        s = q2 @ k[:, :, :S1].swapaxes(-1, -2)  # (B, Hkv, g·n, S₁), raw scores
        lse_b = np.ascontiguousarray(cache.lse[:, :, :, t0:t1]).reshape(-1)  # (R,)
        P = probabilities(s.reshape(-1, S1), scale, n, offset + t0, lse_b)  # (R, S₁)
        P = P.reshape(B, Hkv, g * n, S1)  # (B, Hkv, g·n, S₁)
        do2 = do[:, :, :, t0:t1].reshape(B, Hkv, g * n, D)  # (B, Hkv, g·n, D), a copy
        dv[:, :, :S1] += P.swapaxes(-1, -2) @ do2  # (B, Hkv, S₁, D)
        dP = do2 @ v[:, :, :S1].swapaxes(-1, -2)  # (B, Hkv, g·n, S₁)
        dS = softmax_grad(P.reshape(-1, S1), dP.reshape(-1, S1), n, offset + t0)  # (R, S₁)
        dS = dS.reshape(B, Hkv, g * n, S1)
        dq[:, :, :, t0:t1] = ((dS @ k[:, :, :S1]) * scale).reshape(B, Hkv, g, n, D)
        dk[:, :, :S1] += (dS.swapaxes(-1, -2) @ q2) * scale  # (B, Hkv, S₁, D)
    return dq.reshape(cache.q_shape), dk, dv
