"""The causal language-model loss: softmax cross-entropy of each position on the next token.

Position t's logits predict input_ids[t + 1] (transformers' ``ForCausalLMLoss`` with
labels = input_ids), so the last position predicts nothing; targets equal to ignore_index
(padding) are skipped, and the loss is the mean over the n targets left:

    z = logits[:, :-1] − max_v logits[:, :-1]                  (B, T−1, V)   for stability
    log p = z − log Σ_v exp(z)                                 (B, T−1, V)   log-softmax
    loss = −(1/n) Σ_{kept (b, t)} log p[b, t, y[b, t]],   y = input_ids[:, 1:]
    backward:  dlogits[:, :-1] = (softmax − onehot(y)) ⊙ kept / n,   dlogits[:, -1] = 0
"""

from typing import NamedTuple

import numpy as np

from minilora.models.embedding import check_ids
from minilora.ops._checks import check_dtypes


class LMLossCache(NamedTuple):
    """What ``causal_lm_loss_backward`` needs: log p (softmax = exp(log p) is one pass),
    the targets, which of them count, and n."""

    log_p: np.ndarray  # (B, T−1, V) log-softmax of logits[:, :-1]
    targets: np.ndarray  # (B, T−1) input_ids[:, 1:], ignored ones replaced by 0
    kept: np.ndarray  # (B, T−1) bool, target ≠ ignore_index
    n: int  # number of kept targets
    shape: tuple  # (B, T, V)


def causal_lm_loss(logits, input_ids, *, ignore_index=-100):
    """Causal language-model loss, forward pass.

    Parameters
    ----------
    logits : (B, T, V) float32 or float64
    input_ids : (B, T) integer array, each in [0, V) or equal to ignore_index
    ignore_index : int, targets with this value are skipped

    Returns
    -------
    loss : Python float, the mean negative log-likelihood of the kept targets
    cache : LMLossCache for ``causal_lm_loss_backward``

    Notes
    -----
    loss = −(1/n) Σ_{b, t < T−1, y[b,t] ≠ ignore_index} log softmax(logits[b, t])[y[b, t]],
    y = input_ids[:, 1:]. ValueError when no target is kept (n = 0: the mean is undefined).
    """
    _, arrays = check_dtypes(logits=logits)
    logits = arrays["logits"]
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got logits {logits.shape}")
    B, T, V = logits.shape
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    input_ids = check_ids(input_ids, "input_ids", V, allowed=int(ignore_index))
    if input_ids.shape != (B, T):
        raise ValueError(f"input_ids must be (B, T) = {(B, T)} like logits {logits.shape}, "
                         f"got input_ids {input_ids.shape}")
    y = input_ids[:, 1:]  # (B, T−1)
    kept = y != ignore_index  # (B, T−1)
    n = int(kept.sum())
    if n == 0:
        raise ValueError("the batch has no target: every input_ids[:, 1:] equals ignore_index "
                         f"({ignore_index}) or T < 2, so the mean loss is undefined")
    targets = np.where(kept, y, 0)  # (B, T−1), any valid index where ignored
    z = logits[:, :-1] - logits[:, :-1].max(axis=-1, keepdims=True)  # (B, T−1, V)
    log_p = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))  # (B, T−1, V)
    picked = np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # (B, T−1)
    loss = -float(np.sum(picked[kept])) / n
    return loss, LMLossCache(log_p, targets, kept, n, logits.shape)


def causal_lm_loss_backward(cache, dloss=1.0):
    """Causal language-model loss, backward pass.

    Parameters
    ----------
    cache : LMLossCache from ``causal_lm_loss``
    dloss : float, ∂L/∂loss (1.0 when the loss is L itself)

    Returns
    -------
    dlogits : (B, T, V), a new array of the logits' dtype, zero at the last position and at
        positions whose target is ignored

    Notes
    -----
    dlogits[b, t] = dloss · (softmax(logits[b, t]) − onehot(y[b, t])) · kept[b, t] / n for
    t < T − 1, and 0 at t = T − 1.
    """
    if type(cache) is not LMLossCache:
        raise TypeError(f"cache must be the LMLossCache from causal_lm_loss, "
                        f"got {type(cache).__name__}")
    if isinstance(dloss, bool) or not isinstance(dloss, (int, float, np.integer, np.floating)):
        raise TypeError(f"dloss must be a real number, got {type(dloss).__name__}")
    dlogits = np.zeros(cache.shape, dtype=cache.log_p.dtype)  # (B, T, V)
    d = np.exp(cache.log_p)  # (B, T−1, V), softmax
    np.put_along_axis(d, cache.targets[..., None],
                      np.take_along_axis(d, cache.targets[..., None], axis=-1) - 1, axis=-1)
    w = cache.kept * (float(dloss) / cache.n)  # (B, T−1), the weight of each position
    dlogits[:, :-1] = d * w[..., None].astype(d.dtype)  # (B, T−1, V)
    return dlogits


ROWS = 512  # token rows per block of the fused head and loss: (512, V) logits at a time


def lm_head_loss(h, head, input_ids, *, dhead=None, rows=ROWS):
    """The LM head, the causal loss and their backward in one pass over blocks of tokens,
    without the (B, T, V) logits: what a training step needs, in (rows, V) of memory.

    Parameters
    ----------
    h : (B, T, d) the final norm's output
    head : (V, d) the LM head's weight (the embedding when tied)
    input_ids : (B, T) integer array in [0, V): the labels (each position predicts the next)
    dhead : None or a (V, d) array to which dlogitsᵀ h is added (training the head)
    rows : int ≥ 1, token rows per block

    Returns
    -------
    loss : Python float, ``causal_lm_loss(h @ headᵀ, input_ids)``'s value
    dh : (B, T, d), ∂loss/∂h

    Notes
    -----
    Per block of flattened tokens i: z = h_i headᵀ (n, V), loss_i = log Σ exp(z) − z[y_i],
    dz = (softmax(z) − onehot(y_i)) / n_targets (0 at each sequence's last position),
    dh_i = dz head. The same equations as ``causal_lm_loss`` and its backward, summed in
    another order.
    """
    _, arrays = check_dtypes(h=h, head=head)
    h, head = arrays["h"], arrays["head"]
    if h.ndim != 3 or head.ndim != 2 or h.shape[-1] != head.shape[1]:
        raise ValueError(f"h must be (B, T, d) and head (V, d), got h {h.shape} and "
                         f"head {head.shape}")
    B, T, d = h.shape
    V = head.shape[0]
    input_ids = check_ids(input_ids, "input_ids", V)
    if input_ids.shape != (B, T):
        raise ValueError(f"input_ids must be (B, T) = {(B, T)} like h {h.shape}, "
                         f"got input_ids {input_ids.shape}")
    if T < 2:
        raise ValueError("the batch has no target: T < 2, so the mean loss is undefined")
    if dhead is not None and (dhead.shape != head.shape or dhead.dtype != head.dtype):
        raise ValueError(f"dhead must be {head.dtype}{head.shape}, got {dhead.dtype}"
                         f"{dhead.shape}")
    n = B * (T - 1)  # targets: every position but each sequence's last
    targets = np.zeros((B, T), np.int64)  # (B, T): position t's target input_ids[t + 1]
    targets[:, :-1] = input_ids[:, 1:]
    weight = np.full((B, T), 1.0 / n)  # (B, T): 1/n, 0 at the last position
    weight[:, -1] = 0.0
    h2, targets, weight = h.reshape(-1, d), targets.reshape(-1), weight.reshape(-1)  # (B·T, ·)
    dh = np.empty_like(h2)  # (B·T, d)
    total = 0.0
    for r0 in range(0, B * T, rows):
        r1 = min(r0 + rows, B * T)
        idx = np.arange(r1 - r0)  # rows of the block
        z = h2[r0:r1] @ head.T  # (n_i, V) logits of the block
        z -= z.max(axis=-1, keepdims=True)
        picked = z[idx, targets[r0:r1]]  # (n_i,)
        e = np.exp(z, out=z)  # (n_i, V)
        den = e.sum(axis=-1)  # (n_i,)
        w = weight[r0:r1]  # (n_i,)
        total += float(np.sum(w * (np.log(den) - picked)))
        e *= (w / den).astype(h.dtype)[:, None]  # w · softmax
        e[idx, targets[r0:r1]] -= w.astype(h.dtype)  # dz = w · (softmax − onehot)
        dh[r0:r1] = e @ head  # (n_i, d)
        if dhead is not None:
            dhead += e.T @ h2[r0:r1]  # (V, d)
    return total, dh.reshape(B, T, d)
