"""RMSNorm's forward and backward as Numba kernels (``rmsnorm`` with ``backend="numba"``): one
loop over each row instead of NumPy's three or four whole-array passes and their temporaries.
The row's sums accumulate in float64. ``minilora.models.rmsnorm``'s NumPy passes are the
reference these kernels are tested against; single-threaded, as every kernel in minilora is
(``minilora.ops._jit`` says why).
"""

import numpy as np

from minilora.ops._jit import jit


@jit
def _check(x, weight, a, b, r):
    """a and b must be (N, d) like x, weight (d,), r (N, ·): what the loops index."""
    if weight.shape[0] != x.shape[1] or a.shape != x.shape or b.shape != x.shape \
            or r.shape[0] != x.shape[0]:
        raise ValueError("rmsnorm kernel: the arrays must be (N, d) like x, weight (d,), "
                         "r (N, 1)")


@jit
def _forward(x, weight, eps, y, x_hat, r, keep_x_hat):
    """x (N, d) -> y = x̂ ⊙ weight, x̂ = x ⊙ r, r = 1 / sqrt(mean(x²) + eps) (N, 1); x̂ written
    to x_hat only with ``keep_x_hat`` (else x_hat may be y itself: it is not touched)."""
    _check(x, weight, y, x_hat, r)
    N, d = x.shape
    for n in range(N):
        ms = 0.0
        for i in range(d):
            ms += x[n, i] * x[n, i]
        rn = 1.0 / np.sqrt(ms / d + eps)
        r[n, 0] = rn
        for i in range(d):
            xh = x[n, i] * rn
            if keep_x_hat:
                x_hat[n, i] = xh
            y[n, i] = weight[i] * xh


@jit
def _backward(dy, kept, r, weight, dx, from_y, accumulate):
    """dx = r ⊙ (g − x̂ ⊙ mean(g ⊙ x̂)), g = dy ⊙ weight, all (N, d), where ``kept`` is x̂, or
    with ``from_y`` the output y = x̂ ⊙ weight (then g ⊙ x̂ = dy ⊙ y and x̂ = y / weight); with
    ``accumulate`` added to dx's values instead (dx += ...)."""
    _check(dy, weight, kept, dx, r)
    N, d = dy.shape
    for n in range(N):
        proj = 0.0
        for i in range(d):
            proj += dy[n, i] * kept[n, i] if from_y else dy[n, i] * weight[i] * kept[n, i]
        proj /= d
        for i in range(d):
            x_hat = kept[n, i] / weight[i] if from_y else kept[n, i]
            t = r[n, 0] * (dy[n, i] * weight[i] - x_hat * proj)
            dx[n, i] = dx[n, i] + t if accumulate else t


def forward(x, weight, eps, keep_x_hat=True):
    """(y, x_hat, r) for x (..., d): new arrays of x's dtype, r (..., 1); x_hat None without
    ``keep_x_hat``."""
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (N, d)
    y = np.empty_like(x2)
    x_hat = np.empty_like(x2) if keep_x_hat else y  # y: a stand-in the kernel leaves alone
    r = np.empty((x2.shape[0], 1), x.dtype)  # (N, 1)
    _forward(x2, weight, eps, y, x_hat, r, keep_x_hat)
    lead = x.shape[:-1]
    return y.reshape(x.shape), x_hat.reshape(x.shape) if keep_x_hat else None, \
        r.reshape(lead + (1,))


def backward(dy, kept, r, weight, from_y=False, add_to=None):
    """dx (..., d), a new array of dy's dtype, from ``kept`` = x̂ (or y with ``from_y``); or,
    given ``add_to`` (a C-ordered (..., d) array of dy's dtype), dx added into it in place,
    and add_to returned."""
    d = dy.shape[-1]
    dy2 = np.ascontiguousarray(dy).reshape(-1, d)  # (N, d)
    dx = np.empty_like(dy2) if add_to is None else add_to.reshape(-1, d)  # a view of add_to
    _backward(dy2, np.ascontiguousarray(kept).reshape(-1, d),
              np.ascontiguousarray(r).reshape(-1, 1), weight, dx, from_y, add_to is not None)
    return dx.reshape(dy.shape) if add_to is None else add_to
