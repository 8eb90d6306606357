"""Rounding-error bounds for LoRA outputs, derived rather than guessed.

A dot product of K terms computed in floating point with unit roundoff u, in any summation order
and with or without fused multiply-adds, satisfies (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., §3.1)

    |fl(aᵀb) − aᵀb| ≤ γ_K · |a|ᵀ|b|,     γ_K = K·u / (1 − K·u).

Chaining products (h = x_d Aᵀ, then h Bᵀ) adds their lengths. So each output z of the LoRA layer
gets the bound γ_K · mag(z), where mag(z) is the same formula evaluated on absolute values: the
float64 reference run on |x|, |W|, |A|, |B|, |s|, |bias|, |mask| and |dy|. Cancellation cannot
make that tolerance too small, because mag(z) never cancels.

    output   reduction length K
    y        d_in + r + 4          x·W_j (d_in), then h·B_j (r); the mask, s and two additions
    dx       d_out + r + 3         dy·W (d_out), dy·B (d_out) then g·A (r); s, mask, addition
    dA       d_out + N + 2         g = dy B (d_out), then gᵀ x_d (N); the mask and s
    dB       d_in + N + 2          h = x_d Aᵀ (d_in), then dyᵀ h (N); the mask and s
    dW       N                     dyᵀ x
    dbias    N                     Σ_n dy

DoRA adds, for every output that c = m/n multiplies, the norms' own reduction length
(``dora_magnitudes``): every output but dbias, dW included (dW = (c ⊙ dy)ᵀ x_d + ...); dm has
the K of y plus N (it sums dy ⊙ u over the batch).
"""

import numpy as np

from minilora.ops.dora import inverse_norms, norm_bounds, row_norms
from minilora.ops.functional import lora_backward, lora_forward
from minilora.oracle.precision import PRECISIONS

UNIT_ROUNDOFF = {PRECISIONS[name].numpy_dtype: PRECISIONS[name].u for name in ("fp32", "fp64")}


def gamma(K, u):
    """γ_K = K·u / (1 − K·u), the relative error bound of a K-term dot product."""
    if K * u >= 1:
        return np.inf
    return K * u / (1 - K * u)


def lora_reduction_lengths(N, d_in, d_out, r):
    """The K of each LoRA output (see the module docstring)."""
    return {"y": d_in + r + 4, "dx": d_out + r + 3, "dA": d_out + N + 2, "dB": d_in + N + 2,
            "dW": N, "dbias": N}


def _abs(a):
    return None if a is None else np.abs(a).astype(np.float64)


def lora_magnitudes(x, W, A, B, *, scaling, dy, bias=None, dropout_mask=None,
                    fan_in_fan_out=False):
    """mag(z) for every LoRA output z: the float64 reference run on absolute values.

    Returns a dict ``{"y", "dx", "dA", "dB", "dW"}`` (and ``"dbias"`` with a bias) of float64
    arrays shaped like the outputs.
    """
    y_mag, cache = lora_forward(_abs(x), _abs(W), _abs(A), _abs(B), scaling=abs(scaling),
                                bias=_abs(bias), dropout_mask=_abs(dropout_mask),
                                fan_in_fan_out=fan_in_fan_out, backend="numpy")
    mags = lora_backward(_abs(dy), cache, need_dx=True, need_dW=True,
                         need_dbias=bias is not None)._asdict()
    mags["y"] = y_mag
    return {k: v for k, v in mags.items() if v is not None}


def lora_error_bounds(x, W, A, B, *, scaling, dy, bias=None, dropout_mask=None,
                      fan_in_fan_out=False, u):
    """Elementwise bounds on |computed − exact| for every LoRA output, at unit roundoff u.

    Returns a dict ``{"y", "dx", "dA", "dB", "dW", "dbias"}`` of float64 arrays (``dbias`` only
    with a bias), each γ_K · mag(output) with mag from the reference run on absolute values.
    """
    mags = lora_magnitudes(x, W, A, B, scaling=scaling, dy=dy, bias=bias,
                           dropout_mask=dropout_mask, fan_in_fan_out=fan_in_fan_out)
    K = lora_reduction_lengths(int(np.prod(x.shape[:-1])), A.shape[1], B.shape[0], A.shape[0])
    return {name: gamma(K[name], u) * mag for name, mag in mags.items()}


def cancellation_factors(W, A, B, scaling, fan_in_fan_out, n=None):
    """f_j, how much more than γ_K the computed n_j may be off, relatively, per row (d_out,).

    n_j² summed from the expansion is off by at most γ_K·t_j² (``minilora.ops.dora.row_norms``),
    relatively γ_K·(t_j/n_j)²; rows with t_j > 4·n_j are summed directly from V_j, whose own
    entries W_ji + s·B_j A_i carry errors of order u·t_j, relatively u·t_j/n_j. So
    f_j = (t_j/n_j)² up to 16, and 4·t_j/n_j beyond (1 for a zero row, where c = 0). ``n``: the
    row norms when the caller has them."""
    if n is None:
        n = row_norms(W, A, B, scaling, fan_in_fan_out)[0]
    ratio = norm_bounds(W, A, B, scaling, fan_in_fan_out) * inverse_norms(n)  # (d_out,) t/n
    return np.where(n > 0, np.where(ratio <= 4, ratio**2, 4 * ratio), 1.0)


def dora_magnitudes(x, W, A, B, m, *, scaling, dy, bias=None, dropout_mask=None,
                    fan_in_fan_out=False, detach_norm=True, norm_error=False):
    """mag(z) for every DoRA output, and the extra reduction length that the norms add.

    DoRA is y = c ⊙ u + (x − x_d) Wᵀ + bias with u the LoRA output on x_d
    (``minilora.ops.dora``), so
    the magnitudes are LoRA's for u, with the upstream |c|·|dy|, plus those of the dropout
    correction; with ``detach_norm=False`` also those of the gradient through n. c = m/n itself
    carries the norms' rounding error, a reduction of d_in + 2r + 4 terms: the returned
    ``extra_K`` is added to every output's K but dbias's.

    With ``norm_error=True``, the magnitude of what the norms' own error moves instead: only the
    terms c (or 1/n) multiplies, each row's scaled by its ``cancellation_factors`` (where W_j and
    s·B_j A cancel, n_j is relatively less accurate than γ_K), and the terms of the gradient
    through n, whose w = −dc·m/n³ holds n three times, by twice that. The oracle adds
    γ_{extra_K}·(those magnitudes) to its tolerance.

    Returns ``(mags, extra_K)`` with mags a dict ``{"y", "dx", "dA", "dB", "dm", "dW"}``
    (and ``"dbias"``, which no norm touches: 0 with ``norm_error``).
    """
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    dy2 = np.abs(dy.reshape(-1, dy.shape[-1])).astype(np.float64)
    W64, A64, B64 = (a.astype(np.float64) for a in (W, A, B))
    mask = None if dropout_mask is None else \
        np.broadcast_to(dropout_mask, x.shape).reshape(x2.shape).astype(np.float64)
    x_d = x2 if mask is None else x2 * mask
    n = row_norms(W64, A64, B64, scaling, fan_in_fan_out)[0]  # (d_out,)
    inv_n = inverse_norms(n)  # (d_out,)
    c = np.abs(m.astype(np.float64)) * inv_n  # (d_out,) |c|
    f = cancellation_factors(W64, A64, B64, scaling, fan_in_fan_out, n) if norm_error else 1.0
    lora = lora_magnitudes(x_d, W64, A64, B64, scaling=scaling, dy=(c * f) * dy2,
                           fan_in_fan_out=fan_in_fan_out)
    u_mag = lora["y"]  # (N, d_out) mag(u): the LoRA output on |x_d|, no bias (dy plays no part)
    Wr = np.abs(W64.T if fan_in_fan_out else W64)  # (d_out, d_in)
    dm_mag = np.einsum("nj,nj->j", dy2, u_mag) * inv_n  # (d_out,) Σ|dy||u| / n
    mags = {"y": c * f * u_mag, "dA": lora["dA"], "dB": lora["dB"], "dx": lora["dx"],
            "dW": lora["dW"], "dm": dm_mag * f}
    if mask is not None:  # the LoRA branch's dx is masked; the dropout correction holds no norm
        mags["dx"] = lora["dx"] * np.abs(mask)
        if not norm_error:
            dropped = np.abs(x2 - x_d)  # (N, d_in)
            mags["y"] = mags["y"] + dropped @ Wr.T
            mags["dx"] = mags["dx"] + (dy2 @ Wr) * np.abs(1 - mask)
            extra = dropped.T @ dy2 if fan_in_fan_out else dy2.T @ dropped
            mags["dW"] = mags["dW"] + extra
    if not detach_norm:
        s = abs(scaling)
        w = dm_mag * c * inv_n * (2 * f if norm_error else 1)  # (d_out,) |∂L/∂n| / n
        V = Wr + s * np.abs(B64) @ np.abs(A64)  # (d_out, d_in) |W| + s|B||A|
        mags["dB"] = mags["dB"] + s * w[:, None] * (V @ np.abs(A64).T)
        mags["dA"] = mags["dA"] + s * (w[:, None] * np.abs(B64)).T @ V
        dV = w[:, None] * V
        mags["dW"] = mags["dW"] + (dV.T if fan_in_fan_out else dV)
    if bias is not None:  # Σ dy holds no norm
        mags["y"] = mags["y"] + (0.0 if norm_error else np.abs(bias))
        mags["dbias"] = dy2.sum(axis=0) * (0.0 if norm_error else 1.0)
    mags["dx"] = mags["dx"].reshape(x.shape)
    mags["y"] = mags["y"].reshape(dy.shape)
    return mags, A.shape[1] + 2 * A.shape[0] + 4
