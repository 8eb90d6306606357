"""The public functional API: forward/backward pairs that validate, flatten and dispatch.

Each op is a pair ``op_forward(...) -> (y, cache)`` and ``op_backward(dy, cache) -> grads``. The
public functions here check their inputs once, fold x's leading dimensions into N rows, and hand
two-dimensional arrays to a backend (``lora_numpy`` is the reference, ``lora_numba`` the fast
kernels; ``dora`` builds DoRA on either). Shapes: x (..., d_in), W (d_out, d_in), A (r, d_in),
B (d_out, r), m (d_out,).
"""

import functools
import importlib
import math
from typing import NamedTuple

import numpy as np

from minilora import dora
from minilora._checks import check_dtypes, check_dy, check_layer_shapes, check_scaling
from minilora.backends import resolve_backend


def lora_scaling(alpha, r, *, use_rslora=False):
    """The LoRA scaling s: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (Kalajdzievski, 2023).

    rsLoRA keeps the update's magnitude stable as r grows: with A and B of unit-variance entries,
    ‖s·B A x‖ grows like sqrt(r), which alpha/sqrt(r) cancels.
    """
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    alpha = check_scaling(alpha)
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@functools.cache
def _backend_module(op, backend):
    """The module implementing ``op`` for a resolved backend name (``lora_numpy``, ...)."""
    return importlib.import_module(f"minilora.{op}_{backend}")


def _prepare(x, W, A, B, m, scaling, bias, dropout_mask, fan_in_fan_out, backend):
    """Validate a forward call's inputs once, resolve the backend and fold x's leading
    dimensions: returns (scaling, d_out, backend, x (N, d_in), mask broadcast to (N, d_in))."""
    scaling = check_scaling(scaling)
    check_dtypes(x=x, W=W, A=A, B=B, m=m, bias=bias, dropout_mask=dropout_mask)
    d_in, d_out, _ = check_layer_shapes(x, W, A, B, fan_in_fan_out=fan_in_fan_out, bias=bias,
                                        dropout_mask=dropout_mask, m=m)
    backend = resolve_backend(backend)
    x2 = x if x.ndim == 2 else x.reshape(-1, d_in)  # (N, d_in)
    mask2 = None if dropout_mask is None else \
        np.broadcast_to(dropout_mask, x.shape).reshape(-1, d_in)  # (N, d_in), may be a view
    return scaling, d_out, backend, x2, mask2


def _prepare_backward(dy, cache, cache_type, need_dbias):
    """Check a backward call against its cache; returns dy as (N, d_out)."""
    if not isinstance(cache, cache_type):
        raise TypeError(f"cache must be the {cache_type.__name__} from the matching forward, "
                        f"got {type(cache).__name__}")
    d_out = cache.B.shape[0]
    check_dy(dy, cache.x_shape[:-1] + (d_out,), cache.x.dtype)
    if need_dbias and not cache.has_bias:
        raise ValueError("need_dbias=True but the forward pass had no bias")
    return dy if dy.ndim == 2 else dy.reshape(-1, d_out)  # (N, d_out)


class LoRACache(NamedTuple):
    """What ``lora_backward`` needs from the forward pass (x and the mask as (N, d_in) views)."""

    x: np.ndarray  # (N, d_in)
    W: np.ndarray  # (d_out, d_in), or (d_in, d_out) when fan_in_fan_out
    A: np.ndarray  # (r, d_in)
    B: np.ndarray  # (d_out, r)
    scaling: float
    mask: np.ndarray | None  # broadcast to (N, d_in), or None
    h: np.ndarray  # (N, r) = x_d Aᵀ
    fan_in_fan_out: bool
    x_shape: tuple  # (..., d_in), the shape x came in
    has_bias: bool
    backend: str


class LoRAGrads(NamedTuple):
    """Gradients of a LoRA layer; a field is None when it was not asked for."""

    dx: np.ndarray | None  # (..., d_in)
    dA: np.ndarray  # (r, d_in)
    dB: np.ndarray  # (d_out, r)
    dW: np.ndarray | None  # W's layout
    dbias: np.ndarray | None  # (d_out,)


def lora_forward(x, W, A, B, *, scaling, bias=None, dropout_mask=None, fan_in_fan_out=False,
                 backend=None):
    """LoRA linear layer, forward pass.

    Parameters
    ----------
    x : (..., d_in) input; any number of leading dimensions, including zero-size ones
    W : (d_out, d_in) frozen weight; (d_in, d_out) when ``fan_in_fan_out`` (GPT-2 Conv1D)
    A : (r, d_in) down-projection
    B : (d_out, r) up-projection
    scaling : float, s (see ``lora_scaling``)
    bias : (d_out,) or None
    dropout_mask : array broadcastable to x, or None. The multiplier on the LoRA branch's input,
        already scaled (0 or 1/(1-p) for inverted dropout).
    fan_in_fan_out : bool
    backend : "numpy", "numba" or None (see ``minilora.backends``)

    Returns
    -------
    y : (..., d_out), a new array of x's dtype
    cache : LoRACache for ``lora_backward``

    Notes
    -----
    y = x Wᵀ + bias + s · (x_d Aᵀ) Bᵀ,  x_d = x ⊙ dropout_mask.
    """
    scaling, d_out, backend, x2, mask2 = _prepare(x, W, A, B, None, scaling, bias, dropout_mask,
                                                  fan_in_fan_out, backend)
    fan_in_fan_out = bool(fan_in_fan_out)
    y, h = _backend_module("lora", backend).forward(x2, W, A, B, scaling, bias, mask2,
                                                    fan_in_fan_out)
    cache = LoRACache(x2, W, A, B, scaling, mask2, h, fan_in_fan_out, x.shape, bias is not None,
                      backend)
    return (y if x.ndim == 2 else y.reshape(x.shape[:-1] + (d_out,))), cache


def lora_backward(dy, cache, *, need_dx=True, need_dW=False, need_dbias=False):
    """LoRA linear layer, backward pass.

    Parameters
    ----------
    dy : (..., d_out), ∂L/∂y, same shape and dtype as the forward's y
    cache : LoRACache from ``lora_forward``
    need_dx, need_dW, need_dbias : which optional gradients to compute

    Returns
    -------
    LoRAGrads with dx (..., d_in), dA (r, d_in), dB (d_out, r), and when asked for dW (W's
    layout) and dbias (d_out,). Fields not asked for are None. Every array is new.

    Notes
    -----
    With g = dy B (N, r) and h = x_d Aᵀ (N, r):
        dB = s · dyᵀ h,   dA = s · gᵀ x_d,   dx = dy W + s · (g A) ⊙ mask,
        dW = dyᵀ x,       dbias = Σ_n dy.
    """
    dy2 = _prepare_backward(dy, cache, LoRACache, need_dbias)  # (N, d_out)
    dx, dA, dB, dW, dbias = _backend_module("lora", cache.backend).backward(
        dy2, cache.x, cache.W, cache.A, cache.B, cache.scaling, cache.mask, cache.fan_in_fan_out,
        cache.h, bool(need_dx), bool(need_dW), bool(need_dbias))
    if dx is not None and dx.shape != cache.x_shape:
        dx = dx.reshape(cache.x_shape)  # (..., d_in)
    return LoRAGrads(dx, dA, dB, dW, dbias)


class DoRACache(NamedTuple):
    """What ``dora_backward`` needs from the forward pass."""

    x: np.ndarray  # (N, d_in)
    W: np.ndarray  # (d_out, d_in), or (d_in, d_out) when fan_in_fan_out
    A: np.ndarray  # (r, d_in)
    B: np.ndarray  # (d_out, r)
    scaling: float
    mask: np.ndarray | None  # broadcast to (N, d_in), or None
    saved: dict  # u (N, d_out), h (N, r), c (d_out,), inv_n (d_out,), WA, AA, x_d
    fan_in_fan_out: bool
    detach_norm: bool
    x_shape: tuple
    has_bias: bool
    backend: str


class DoRAGrads(NamedTuple):
    """Gradients of a DoRA layer; a field is None when it was not asked for."""

    dx: np.ndarray | None  # (..., d_in)
    dA: np.ndarray  # (r, d_in)
    dB: np.ndarray  # (d_out, r)
    dm: np.ndarray  # (d_out,)
    dW: np.ndarray | None  # W's layout
    dbias: np.ndarray | None  # (d_out,)


def dora_forward(x, W, A, B, m, *, scaling, bias=None, dropout_mask=None, fan_in_fan_out=False,
                 detach_norm=True, backend=None, norms=None):
    """DoRA (weight-decomposed LoRA) layer, forward pass; PEFT's LoRA with ``use_dora=True``.

    Parameters
    ----------
    x, W, A, B, scaling, bias, dropout_mask, fan_in_fan_out, backend : as in ``lora_forward``
    m : (d_out,) trainable magnitude
    detach_norm : bool, treat n as a constant in the backward pass (PEFT; DoRA paper §4.3)
    norms : (d_out,) or None, row norms n to use instead of ‖W + s·B A‖. With detach_norm=True
        the backward treats n as a constant anyway; passing n computed once at a point makes the
        forward match that: how a finite-difference check of the detached gradient holds n fixed.

    Returns
    -------
    y : (..., d_out)
    cache : DoRACache for ``dora_backward``

    Notes
    -----
    n = ‖W + s·B A‖ per output row (d_out,), c = m / n,
    y = x Wᵀ + bias + (c − 1) ⊙ (x_d Wᵀ) + c ⊙ s·(x_d Aᵀ) Bᵀ
      = c ⊙ (x_d (W + s·B A)ᵀ) + (x − x_d) Wᵀ + bias.
    A row with W + s·B A = 0 gets c = 0 (see ``minilora.dora``), never NaN.
    """
    scaling, d_out, backend, x2, mask2 = _prepare(x, W, A, B, m, scaling, bias, dropout_mask,
                                                  fan_in_fan_out, backend)
    if norms is not None:
        check_dtypes(m=m, norms=norms)
        if norms.shape != (d_out,):
            raise ValueError(f"norms must be (d_out,) = ({d_out},), got norms {norms.shape}")
    fan_in_fan_out = bool(fan_in_fan_out)
    y, saved = dora.forward(_backend_module("lora", backend), x2, W, A, B, m, scaling, bias, mask2,
                            fan_in_fan_out, norms)
    cache = DoRACache(x2, W, A, B, scaling, mask2, saved, fan_in_fan_out, bool(detach_norm),
                      x.shape, bias is not None, backend)
    return (y if x.ndim == 2 else y.reshape(x.shape[:-1] + (d_out,))), cache


def dora_backward(dy, cache, *, need_dx=True, need_dW=False, need_dbias=False):
    """DoRA layer, backward pass.

    Returns
    -------
    DoRAGrads with dx (..., d_in), dA (r, d_in), dB (d_out, r), dm (d_out,), and when asked for
    dW (W's layout) and dbias (d_out,).

    Notes
    -----
    With u = x_d (W + s·B A)ᵀ and dy_c = c ⊙ dy:  dm = Σ_n (dy ⊙ u) / n; dA, dB as LoRA's with
    upstream dy_c; dx = (dy_c W + s·(dy_c B) A) ⊙ mask + (dy W) ⊙ (1 − mask).
    With ``detach_norm=False`` the gradient through n is added (``minilora.dora``).
    """
    dy2 = _prepare_backward(dy, cache, DoRACache, need_dbias)  # (N, d_out)
    dx, dA, dB, dm, dW, dbias = dora.backward(
        _backend_module("lora", cache.backend), dy2, cache.x, cache.W, cache.A, cache.B,
        cache.scaling, cache.mask, cache.fan_in_fan_out, cache.saved, cache.detach_norm,
        bool(need_dx), bool(need_dW), bool(need_dbias))
    if dx is not None and dx.shape != cache.x_shape:
        dx = dx.reshape(cache.x_shape)  # (..., d_in)
    return DoRAGrads(dx, dA, dB, dm, dW, dbias)
