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
    y        d_in + r + 3          x·W_j (d_in), then h·B_j (r); the mask, s and two additions
    dx       d_out + r + 3         dy·W (d_out), dy·B (d_out) then g·A (r); s, mask, addition
    dA       d_out + N + 2         g = dy B (d_out), then gᵀ x_d (N); the mask and s
    dB       d_in + N + 2          h = x_d Aᵀ (d_in), then dyᵀ h (N); the mask and s
    dW       N                     dyᵀ x
    dbias    N                     Σ_n dy
"""

import numpy as np

UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}


def gamma(K, u):
    """γ_K = K·u / (1 − K·u), the relative error bound of a K-term dot product."""
    if K * u >= 1:
        return np.inf
    return K * u / (1 - K * u)


def lora_reduction_lengths(N, d_in, d_out, r):
    """The K of each LoRA output (see the module docstring)."""
    return {"y": d_in + r + 3, "dx": d_out + r + 3, "dA": d_out + N + 2, "dB": d_in + N + 2,
            "dW": N, "dbias": N}


def lora_error_bounds(x, W, A, B, *, scaling, dy, bias=None, dropout_mask=None,
                      fan_in_fan_out=False, u):
    """Elementwise bounds on |computed − exact| for every LoRA output, at unit roundoff u.

    Returns a dict ``{"y", "dx", "dA", "dB", "dW", "dbias"}`` of float64 arrays (``dbias`` only
    with a bias), each γ_K · mag(output) with mag from the reference run on absolute values.
    """
    from minilora.functional import lora_backward, lora_forward

    def absolute(a):
        return None if a is None else np.abs(a).astype(np.float64)

    y_mag, cache = lora_forward(absolute(x), absolute(W), absolute(A), absolute(B),
                                scaling=abs(scaling), bias=absolute(bias),
                                dropout_mask=absolute(dropout_mask),
                                fan_in_fan_out=fan_in_fan_out, backend="numpy")
    mags = lora_backward(absolute(dy), cache, need_dx=True, need_dW=True,
                         need_dbias=bias is not None)._asdict()
    mags["y"] = y_mag
    K = lora_reduction_lengths(int(np.prod(x.shape[:-1])), A.shape[1], B.shape[0], A.shape[0])
    return {name: gamma(K[name], u) * mag for name, mag in mags.items() if mag is not None}
