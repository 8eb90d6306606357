"""Losses as forward/backward pairs: softmax cross-entropy and mean squared error.

The library's pattern, ``loss(...) -> (value, cache)`` and ``loss_backward(cache)``: a loss is
the last op, so its upstream gradient is 1 and the backward takes the cache alone. Both average
over the batch, so their gradients carry a 1/N.
"""

import numpy as np


def softmax_cross_entropy(logits, labels):
    """L = −(1/N) Σ_n log softmax(z_n)[y_n].

    logits (N, C), labels (N,) integers in [0, C). Returns (loss, cache). The softmax subtracts
    each row's maximum first, so large logits do not overflow.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and labels (N,), got {logits.shape} and "
                         f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {labels.min()}.."
                         f"{labels.max()}")
    shifted = logits - logits.max(axis=1, keepdims=True)  # (N, C)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (N, C)
    N = max(len(labels), 1)
    loss = -log_p[np.arange(len(labels)), labels].sum() / N
    return float(loss), (log_p, labels)


def softmax_cross_entropy_backward(cache):
    """∂L/∂z = (softmax(z) − onehot(y)) / N   (N, C)."""
    log_p, labels = cache
    dz = np.exp(log_p)  # (N, C) softmax
    dz[np.arange(len(labels)), labels] -= 1
    return dz / max(len(labels), 1)


def mse(pred, target):
    """L = mean((pred − target)²) over every entry. Returns (loss, cache)."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {pred.shape} and "
                         f"{target.shape}")
    diff = pred - target
    return float(np.mean(diff * diff)), diff


def mse_backward(cache):
    """∂L/∂pred = 2 (pred − target) / size."""
    diff = cache
    return 2 * diff / max(diff.size, 1)


def accuracy(logits, labels):
    """The fraction of rows whose largest logit is at the label."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))
