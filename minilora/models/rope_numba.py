"""RoPE's forward and backward as one Numba kernel (``rope`` with ``backend="numba"``): one pass
over the heads instead of NumPy's four whole-array passes and their temporaries
(``x ⊙ cos``, ``rotate_half(x)``, its product with sin, the sum).

Both passes are the same rotation of each pair (i, i + D/2) of a head's row:

    out_i       = a_i cos_i        − a_{i+D/2} σ_i
    out_{i+D/2} = a_{i+D/2} cos_{i+D/2} + a_i σ_{i+D/2}

with σ = sin for the forward (y = x ⊙ cos + rotate_half(x) ⊙ sin) and σ = cat(−sin_hi, −sin_lo)
for the backward (dx = dy ⊙ cos − rotate_half(dy ⊙ sin), ``rope``'s docstring), where sin_lo
and sin_hi are the table's halves. ``minilora.models.rope``'s NumPy passes are the reference this
kernel is tested against; single-threaded, as every kernel in minilora is (``minilora.ops._jit``
says why).

The arrays may have any strides (the projections' (B, T, h, D) layout seen as (B, h, T, D)):
a head's row of D numbers is read and written where it lies, so no transposing copy is made
on either side.
"""

import numpy as np

from minilora.ops._jit import jit


@jit
def _rotate(a, cos, sigma, out):
    """out = the rotation above of a, all (B, h, T, D); cos, sigma (T, D)."""
    B, H, T, D = a.shape
    if out.shape != a.shape or cos.shape[0] != T or cos.shape[1] != D \
            or sigma.shape != cos.shape or D % 2:
        raise ValueError("rope kernel: a and out must be (B, h, T, D), cos and sin (T, D), "
                         "D even")
    half = D // 2
    for b in range(B):
        for j in range(H):
            for t in range(T):
                row, dst, c, s = a[b, j, t], out[b, j, t], cos[t], sigma[t]
                for i in range(half):
                    lo, hi = row[i], row[i + half]
                    dst[i] = lo * c[i] - hi * s[i]
                    dst[i + half] = hi * c[i + half] + lo * s[i + half]


def forward(x, cos, sin):
    """y (B, h, T, D), a new C-ordered array: x ⊙ cos + rotate_half(x) ⊙ sin."""
    y = np.empty(x.shape, x.dtype)  # (B, h, T, D)
    _rotate(x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), y)
    return y


def backward(dy, cos, sin, dx):
    """dx = dy ⊙ cos − rotate_half(dy ⊙ sin) into ``dx`` (B, h, T, D), any layout."""
    half = sin.shape[1] // 2
    sigma = -np.concatenate([sin[:, half:], sin[:, :half]], axis=1)  # (T, D)
    _rotate(dy, np.ascontiguousarray(cos), sigma, dx)
    return dx
