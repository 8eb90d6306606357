"""Rotary position embedding (Su et al., 2021) in transformers' "rotate half" layout.

Dimension i < D/2 of a head is paired with dimension i + D/2 and the pair rotated by the angle
θ_{t,i} = position_t · inv_freq_i, inv_freq_i = theta^(−2i/D):

    cos, sin = cos(cat(θ, θ)), sin(cat(θ, θ))                 (T, D)
    rotate_half(x) = cat(−x[..., D/2:], x[..., :D/2])          (..., D)
    y = x ⊙ cos + rotate_half(x) ⊙ sin                          (B, h, T, D)
    backward:  dx = dy ⊙ cos − rotate_half(dy ⊙ sin)

rotate_half is the linear map R with R² = −1, so Rᵀ = −R: the backward is the rotation by −θ.
"Linear" rope scaling (``rope_scaling = {"type": "linear", "factor": f}``) divides inv_freq by
f, which is positions / f. transformers computes the tables in float32 whatever the model's
dtype; here they are computed in float64 and rounded once to ``dtype``.

The NumPy passes below are the reference; ``backend="numba"`` runs one pass over the heads
(``minilora.models.rope_numba``). The backward's dx is laid out in memory as (B, T, h, D), the
projections' layout, so the model's (B, h, T, D) -> (B, T, h·D) transpose after it is free.
"""

import math

import numpy as np

from minilora.ops._checks import FLOAT_DTYPES, check_dtypes, check_positive_int, plain_array
from minilora.ops.backends import resolve_backend


def rotate_half(x):
    """cat(−x2, x1) of the two halves of the last axis; x (..., D) -> (..., D), a new array."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # (..., D)


def _check_positive_float(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def rope_tables(positions, head_dim, *, theta, scaling_factor=1.0, dtype):
    """The cos and sin tables for the given absolute positions.

    Parameters
    ----------
    positions : (T,) non-negative integer array (q_offset + arange(T) during decoding)
    head_dim : int D, even
    theta : float > 0, the config's rope_theta
    scaling_factor : float > 0, linear rope scaling (1.0: none)
    dtype : float32 or float64, the dtype of the tables

    Returns
    -------
    cos, sin : (T, D) arrays of ``dtype``

    Notes
    -----
    inv_freq_i = theta^(−2i/D) / scaling_factor (i < D/2),  θ = positions ⊗ inv_freq,
    cos = cos(cat(θ, θ)),  sin = sin(cat(θ, θ)).
    """
    positions = plain_array(positions, "positions")
    if positions.dtype == np.bool_ or not np.issubdtype(positions.dtype, np.integer):
        raise TypeError(f"positions must be an integer array, got dtype {positions.dtype}")
    if positions.ndim != 1:
        raise ValueError(f"positions must be (T,), got positions {positions.shape}")
    if np.any(positions < 0):
        t = int(np.argmax(positions < 0))
        raise ValueError(f"positions[{t}] = {int(positions[t])}: positions must be ≥ 0")
    D = check_positive_int(head_dim, "head_dim")
    if D % 2:
        raise ValueError(f"head_dim must be even for rope, got {D}")
    theta = _check_positive_float(theta, "theta")
    scaling_factor = _check_positive_float(scaling_factor, "scaling_factor")
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    inv_freq = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)  # (D/2,)
    angles = np.outer(positions.astype(np.float64), inv_freq / scaling_factor)  # (T, D/2)
    emb = np.concatenate([angles, angles], axis=-1)  # (T, D)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)  # (T, D) each


def _check(x, name, cos, sin):
    """Validate x (B, h, T, D) against cos, sin (T, D); return the three as plain arrays."""
    _, arrays = check_dtypes(**{name: x}, cos=cos, sin=sin)
    x, cos, sin = arrays[name], arrays["cos"], arrays["sin"]
    if cos.ndim != 2 or cos.shape != sin.shape:
        raise ValueError(f"cos and sin must be (T, D), got cos {cos.shape} and sin {sin.shape}")
    if x.ndim != 4 or x.shape[2:] != cos.shape:
        raise ValueError(f"{name} must be (B, h, T, D) with (T, D) = cos's {cos.shape}, "
                         f"got {name} {x.shape}")
    if cos.shape[1] % 2:
        raise ValueError(f"head_dim must be even for rope, got D = {cos.shape[1]}")
    return x, cos, sin


def rope_forward(x, cos, sin, *, backend=None):
    """Rotary position embedding, forward pass.

    Parameters
    ----------
    x : (B, h, T, D) queries or keys (h heads), any strides
    cos, sin : (T, D) from ``rope_tables``, x's dtype
    backend : "numpy", "numba" or None (``minilora.ops.backends``)

    Returns
    -------
    y : (B, h, T, D), a new array

    Notes
    -----
    y = x ⊙ cos + rotate_half(x) ⊙ sin (cos, sin broadcast over B and h).
    """
    x, cos, sin = _check(x, "x", cos, sin)
    if resolve_backend(backend) == "numba":
        from minilora.models import rope_numba

        return rope_numba.forward(x, cos, sin)
    return x * cos + rotate_half(x) * sin  # (B, h, T, D)


def rope_backward(dy, cos, sin, *, backend=None):
    """Rotary position embedding, backward pass (the same tables as the forward).

    Parameters
    ----------
    dy : (B, h, T, D), ∂L/∂y, any strides
    cos, sin : (T, D), the forward's tables
    backend : "numpy", "numba" or None

    Returns
    -------
    dx : (B, h, T, D), a new array laid out in memory as (B, T, h, D) (see the module
        docstring)

    Notes
    -----
    dx = dy ⊙ cos + Rᵀ(dy ⊙ sin) = dy ⊙ cos − rotate_half(dy ⊙ sin), since Rᵀ = −R.
    """
    dy, cos, sin = _check(dy, "dy", cos, sin)
    B, heads, T, D = dy.shape
    dx = np.empty((B, T, heads, D), dy.dtype).transpose(0, 2, 1, 3)  # (B, h, T, D)
    if resolve_backend(backend) == "numba":
        from minilora.models import rope_numba

        return rope_numba.backward(dy, cos, sin, dx)
    h = D // 2
    np.multiply(dy, cos, out=dx)  # (B, h, T, D)
    dx[..., :h] += dy[..., h:] * sin[:, h:]  # − rotate_half(dy ⊙ sin) half by half: its bits
    dx[..., h:] -= dy[..., :h] * sin[:, :h]  # with two temporaries fewer
    return dx
