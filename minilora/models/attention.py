"""Causal softmax attention with grouped-query heads (GQA), without copies of k and v.

H query heads share Hkv key/value heads in groups of g = H / Hkv: query head j reads kv head
j // g. Reshaping q (B, H, T, D) to (B, Hkv, g·T, D) puts each group's queries in one matrix
beside its kv head, so every product is one batched matmul and repeat_kv's copies never exist.
Query t sits at absolute position q_offset + t (q_offset: the tokens already in a KV cache) and
sees the keys s ≤ q_offset + t:

    S_ = q kᵀ / √D + M,   M = 0 where s ≤ q_offset + t, −∞ elsewhere      (B, H, T, S)
    P  = softmax(S_) over s  (the row max subtracted before exp)            (B, H, T, S)
    out = P v                                                               (B, H, T, D)
    backward:  dP = dout vᵀ,   dS = P ⊙ (dP − rowsum(dP ⊙ P)),
               dq = dS k / √D,  dk = dSᵀ q / √D,  dv = Pᵀ dout   (dk, dv summed over the group)

The cache keeps q, k, v and P: dv needs P, dq and dk need dS, which needs P. Recomputing P from
q and k in the backward would save B·H·T·S numbers at the price of the forward's product and
exp again; at the sizes this package trains (T ≤ a few hundred) keeping it is the better trade.
"""

from typing import NamedTuple

import numpy as np

from minilora._checks import check_dtypes, check_positive_int, plain_array


class AttentionCache(NamedTuple):
    """What ``attention_backward`` needs, grouped as the products use them."""

    q: np.ndarray  # (B, Hkv, g·T, D), a view of the forward's q
    k: np.ndarray  # (B, Hkv, S, D)
    v: np.ndarray  # (B, Hkv, S, D)
    P: np.ndarray  # (B, Hkv, g·T, S), the probabilities; (B, H, T, S) reshaped
    scale: float  # 1 / √D
    q_shape: tuple  # (B, H, T, D)


def causal_bias(T, S, q_offset, dtype):
    """The additive causal mask M (T, S): 0 where query t (absolute position q_offset + t) may
    see key s (s ≤ q_offset + t), −∞ where it may not. Adding it is one broadcast pass over the
    scores (a boolean-index assignment costs several times more)."""
    hidden = np.arange(S)[None, :] > q_offset + np.arange(T)[:, None]  # (T, S)
    return np.where(hidden, -np.inf, 0.0).astype(dtype)  # (T, S)


def attention_forward(q, k, v, *, q_offset=0):
    """Causal grouped-query attention, forward pass.

    Parameters
    ----------
    q : (B, H, T, D) queries (rope already applied)
    k : (B, Hkv, S, D) keys, S = q_offset + T (past keys first)
    v : (B, Hkv, S, D) values
    q_offset : int ≥ 0, the absolute position of query 0 (the KV cache's length)

    Returns
    -------
    out : (B, H, T, D), a new array of q's dtype
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
    if S != q_offset + T:
        raise ValueError(f"k and v must hold S = q_offset + T = {q_offset} + {T} keys, "
                         f"got k {k.shape}")
    g = H // Hkv
    scale = D ** -0.5
    qg = q.reshape(B, Hkv, g * T, D)  # (B, Hkv, g·T, D), a view when q is contiguous
    scores = (qg @ k.swapaxes(-1, -2)) * scale  # (B, Hkv, g·T, S)
    scores = scores.reshape(B, Hkv, g, T, S)  # (B, Hkv, g, T, S)
    scores += causal_bias(T, S, q_offset, q.dtype)  # + M (T, S): masked, exp(−∞) = 0 exactly
    scores -= scores.max(axis=-1, keepdims=True)  # (B, Hkv, g, T, S), every row's max is 0
    P = np.exp(scores, out=scores)  # (B, Hkv, g, T, S), in place of the scores
    P /= P.sum(axis=-1, keepdims=True)
    P = P.reshape(B, Hkv, g * T, S)  # (B, Hkv, g·T, S)
    out = (P @ v).reshape(B, H, T, D)  # (B, H, T, D)
    return out, AttentionCache(qg, k.view(), v.view(), P, scale, q.shape)


def attention_backward(dout, cache):
    """Causal grouped-query attention, backward pass.

    Parameters
    ----------
    dout : (B, H, T, D), ∂L/∂out, the forward's dtype
    cache : AttentionCache from ``attention_forward``

    Returns
    -------
    dq : (B, H, T, D)
    dk, dv : (B, Hkv, S, D), each kv head's gradient summed over the g query heads that read it

    Notes
    -----
    dP = dout vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dq = dS k / √D,  dk = dSᵀ q / √D,
    dv = Pᵀ dout. In the (B, Hkv, g·T, ·) layout the group sums are the products' own sums
    over the g·T rows.
    """
    if type(cache) is not AttentionCache:
        raise TypeError(f"cache must be the AttentionCache from attention_forward, "
                        f"got {type(cache).__name__}")
    dout = plain_array(dout, "dout")
    if dout.shape != cache.q_shape or dout.dtype != cache.P.dtype:
        raise ValueError(f"dout must be {cache.P.dtype}{cache.q_shape} like the forward's out, "
                         f"got dout {dout.dtype}{dout.shape}")
    q, k, v, P, scale = cache.q, cache.k, cache.v, cache.P, cache.scale
    do = dout.reshape(q.shape)  # (B, Hkv, g·T, D)
    dv = P.swapaxes(-1, -2) @ do  # (B, Hkv, S, D), summed over the group's g·T rows
    dP = do @ v.swapaxes(-1, -2)  # (B, Hkv, g·T, S)
    dS = P * (dP - np.sum(dP * P, axis=-1, keepdims=True))  # (B, Hkv, g·T, S)
    dq = ((dS @ k) * scale).reshape(cache.q_shape)  # (B, H, T, D)
    dk = (dS.swapaxes(-1, -2) @ q) * scale  # (B, Hkv, S, D)
    return dq, dk, dv
