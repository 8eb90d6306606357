"""The public functional API: forward/backward pairs that validate, flatten and dispatch.

Each op is a pair ``op_forward(...) -> (y, cache)`` and ``op_backward(dy, cache) -> grads``. The
public functions here check their inputs once, fold x's leading dimensions into N rows, and hand
two-dimensional arrays to a backend (``lora_numpy`` is the reference, ``lora_numba`` the fast
kernels; ``dora`` builds DoRA on either). Shapes: x (..., d_in), W (d_out, d_in), A (r, d_in),
B (d_out, r), m (d_out,).
"""

import math
import zlib
from typing import NamedTuple

import numpy as np

from minilora.ops import dora, lora_numba, lora_numpy
from minilora.ops._checks import (
    COMPLEX,
    FLOAT_DTYPES,
    check_dtypes,
    check_dy,
    check_layer_shapes,
    check_positive_int,
    check_scaling,
    is_plain,
)
from minilora.ops.backends import resolve_backend

# The backend contract: each module has
#   forward(x, W, A, B, *, scaling, bias, mask, fan_in_fan_out) -> (y, h, kept)
#   backward(dy, x, W, A, B, h, *, scaling, mask, fan_in_fan_out, need_dx, need_dW, need_dbias,
#            kept, dy_scale) -> (dx, dA, dB, dW, dbias)
# on two-dimensional arrays that this module has validated; kept is whatever else the backend's
# backward reuses from its forward (lora_numba's merged weight) or None, and dy_scale (d_out,)
# or None a factor of each column of dy (DoRA's c). lora_numba's passes also take
# merge_weight (lora_forward's); the reference has one route and no such hint.
BACKEND_MODULES = {"numpy": lora_numpy, "numba": lora_numba}


def lora_scaling(alpha, r, *, use_rslora=False):
    """The LoRA scaling s: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (Kalajdzievski, 2023).

    rsLoRA keeps the update's magnitude stable as r grows: with A and B of unit-variance entries,
    ‖s·B A x‖ grows like sqrt(r), which alpha/sqrt(r) cancels. TypeError when r is not an integer
    or alpha not a real number, ValueError when r < 1 or alpha is not finite.
    """
    r = check_positive_int(r, "r")
    alpha = check_scaling(alpha, "alpha")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _checksum(a):
    """CRC-32 of an array's bytes (``check_unchanged``): a change of up to 32 adjacent bits
    always changes it, any other change with probability 1 − 2⁻³²."""
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8))


def _fingerprints(cache):
    """Checksums of every array the backward pass reads from ``cache``."""
    return {name: _checksum(getattr(cache, name)) for name in ("x", "W", "A", "B", "mask")
            if getattr(cache, name) is not None}


def _prepare(x, W, A, B, m, scaling, bias, dropout_mask, fan_in_fan_out, backend):
    """Validate a forward call's inputs once, resolve the backend and fold x's leading
    dimensions. Returns (scaling, d_out, backend name, arrays) with arrays a dict: new views of
    what the cache keeps (so that reshaping or rebinding the caller's objects cannot change what
    backward sees), x (N, d_in), W, A, B and the mask broadcast to (N, d_in); and m and bias."""
    scaling = check_scaling(scaling)
    backend = resolve_backend(backend)
    _, arrays = check_dtypes(allow_complex=backend == "numpy", x=x, W=W, A=A, B=B, m=m,
                             bias=bias, dropout_mask=dropout_mask)
    x, mask = arrays["x"], arrays.pop("dropout_mask")
    d_in, d_out, _ = check_layer_shapes(x, arrays["W"], arrays["A"], arrays["B"],
                                        fan_in_fan_out=fan_in_fan_out, bias=arrays["bias"],
                                        dropout_mask=mask, m=arrays["m"])
    views = dict(arrays)  # m and bias are used by the forward pass alone: no views needed
    views["W"], views["A"], views["B"] = arrays["W"].view(), arrays["A"].view(), arrays["B"].view()
    N = math.prod(x.shape[:-1])
    views["x"] = x.reshape(N, d_in)  # (N, d_in), a new view (a copy if x's strides need one)
    views["mask"] = None if mask is None else \
        np.broadcast_to(mask, x.shape).reshape(N, d_in)  # (N, d_in), a view or a copy
    return scaling, d_out, backend, views


def _check_cache(cache, cache_type, saved_fields=()):
    """Check that a cache is the intact product of its forward pass, before any kernel reads it:
    every array a plain ndarray of the forward's dtype and of the shape the others imply (O(1)
    in the arrays' sizes, a few microseconds). A cache made with ``check_unchanged=True``
    (``LoRALinear``'s default) is also checksummed again: a CRC-32 pass over the bytes of x, W,
    A, B and the mask, O(N·d_in + d_out·d_in), about 4 ms for N = d_in = d_out = 1024 in
    float32 (8 MB at ~2 GB/s; the NumPy backward there takes ~50 ms)."""
    if type(cache) is not cache_type:
        raise TypeError(f"cache must be the {cache_type.__name__} from the matching forward, "
                        f"got {type(cache).__name__}")
    if saved_fields and type(cache.saved) is not DoRASaved:
        raise TypeError(f"cache.saved must be a DoRASaved, got {type(cache.saved).__name__}")
    x, A, B = cache.x, cache.A, cache.B
    for name, a in (("x", x), ("A", A), ("B", B)):
        if not is_plain(a) or a.ndim != 2:
            raise ValueError(f"cache.{name} is not a 2-D ndarray: the cache was modified after "
                             f"the forward pass")
    dtype = x.dtype
    (N, d_in), r, d_out = x.shape, A.shape[0], B.shape[0]
    x_shape = cache.x_shape
    if (dtype not in FLOAT_DTYPES and not (dtype == COMPLEX and cache.backend == "numpy")) \
            or type(x_shape) is not tuple or not x_shape \
            or x_shape[-1] != d_in or math.prod(x_shape[:-1]) != N \
            or type(cache.fan_in_fan_out) is not bool or type(cache.has_bias) is not bool \
            or type(getattr(cache, "merge_weight", False)) is not bool \
            or cache.backend not in BACKEND_MODULES or type(cache.scaling) is not float \
            or not math.isfinite(cache.scaling):
        raise ValueError("the cache's dtype, shapes or options are inconsistent: it was "
                         "modified after the forward pass")
    expected = [("A", A, (r, d_in)), ("B", B, (d_out, r)), ("h", cache.h, (N, r)),
                ("W", cache.W, (d_in, d_out) if cache.fan_in_fan_out else (d_out, d_in))]
    if cache.mask is not None:
        expected.append(("mask", cache.mask, (N, d_in)))
    kept = cache.saved.kept if saved_fields else cache.kept
    if kept is not None:
        expected.append(("saved.kept" if saved_fields else "kept", kept, (d_out + r, d_in + r)))
    if saved_fields:
        saved = cache.saved
        expected += [("saved.u", saved.u, (N, d_out)), ("saved.c", saved.c, (d_out,)),
                     ("saved.inv_n", saved.inv_n, (d_out,)), ("saved.x_d", saved.x_d, (N, d_in))]
        if saved.WA is not None or saved.AA is not None:
            expected += [("saved.WA", saved.WA, (d_out, r)), ("saved.AA", saved.AA, (r, r))]
    for name, a, shape in expected:
        if not is_plain(a) or a.shape != shape or (a.dtype is not dtype
                                                             and a.dtype != dtype):
            got = f"{a.dtype}{a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"cache.{name} is {got} where the forward pass made {dtype}{shape}: "
                             f"the cache was modified after the forward pass")
    if cache.fingerprints is not None:
        now = _fingerprints(cache)
        changed = sorted(k for k, v in now.items() if cache.fingerprints.get(k) != v)
        if changed or now.keys() != cache.fingerprints.keys():
            raise RuntimeError(f"{', '.join(changed) or 'the mask'} changed in place between "
                               f"the forward and the backward pass: the gradients would be "
                               f"those of the new values")
    return d_out


def _prepare_backward(dy, cache, cache_type, need_dbias, saved_fields=()):
    """Check a backward call against its cache; returns dy as (N, d_out)."""
    d_out = _check_cache(cache, cache_type, saved_fields)
    dy = check_dy(dy, cache.x_shape[:-1] + (d_out,), cache.x.dtype)
    if need_dbias and not cache.has_bias:
        raise ValueError("need_dbias=True but the forward pass had no bias")
    return dy.reshape(cache.x.shape[0], d_out)  # (N, d_out)


class LoRACache(NamedTuple):
    """What ``lora_backward`` needs from the forward pass: new views of the inputs (x and the
    mask as (N, d_in)), so that reshaping or rebinding the caller's objects cannot reach them;
    ``lora_backward`` checks every field before use."""

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
    fingerprints: dict | None = None  # checksums of x, W, A, B, mask (check_unchanged=True)
    kept: np.ndarray | None = None  # (d_out + r, d_in + r) the numba backend's merged weight
    merge_weight: bool = False  # lora_forward's merge_weight


class LoRAGrads(NamedTuple):
    """Gradients of a LoRA layer; a field is None when it was not asked for."""

    dx: np.ndarray | None  # (..., d_in)
    dA: np.ndarray  # (r, d_in)
    dB: np.ndarray  # (d_out, r)
    dW: np.ndarray | None  # W's layout
    dbias: np.ndarray | None  # (d_out,)


def lora_forward(x, W, A, B, *, scaling, bias=None, dropout_mask=None, fan_in_fan_out=False,
                 backend=None, check_unchanged=False, merge_weight=False):
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
    backend : "numpy", "numba" or None (see ``minilora.ops.backends``)
    check_unchanged : bool, record checksums of x, W, A, B and the mask, so that
        ``lora_backward`` raises RuntimeError if any of them was changed in place in between
        (costs two passes over those arrays' bytes)
    merge_weight : bool, leave for the numba backend to merge the weight, W + s·B A, in a
        large layer without dropout even where its size rule would not (the merged weight,
        bordered by the adapter, is then kept in the cache between the passes: one
        weight-sized array). For callers whose activations dwarf the weight: the fused blocks
        give it when the largest weight is at most an eighth of theirs. Same results up to
        summation order; ignored by the numpy backend.

    Returns
    -------
    y : (..., d_out), a new array of x's dtype; not always C-contiguous (the numba backend's
        merged route computes y and h in one product, y being the first d_out columns of it)
    cache : LoRACache for ``lora_backward``

    Notes
    -----
    y = x Wᵀ + bias + s · (x_d Aᵀ) Bᵀ,  x_d = x ⊙ dropout_mask.

    The backward pass reads x, W, A, B and the mask from the cache (views, not copies): change
    one of them in place between the passes and the gradients are those of the new values.
    ``check_unchanged=True`` detects that; ``LoRALinear`` turns it on.
    """
    scaling, d_out, backend, v = _prepare(x, W, A, B, None, scaling, bias, dropout_mask,
                                          fan_in_fan_out, backend)
    fan_in_fan_out = bool(fan_in_fan_out)
    merge_weight = bool(merge_weight) and backend == "numba"
    hint = {"merge_weight": True} if merge_weight else {}
    y, h, kept = BACKEND_MODULES[backend].forward(v["x"], v["W"], v["A"], v["B"],
                                                  scaling=scaling, bias=v["bias"],
                                                  mask=v["mask"], fan_in_fan_out=fan_in_fan_out,
                                                  **hint)
    cache = LoRACache(v["x"], v["W"], v["A"], v["B"], scaling, v["mask"], h, fan_in_fan_out,
                      x.shape, bias is not None, backend, kept=kept, merge_weight=merge_weight)
    if check_unchanged:
        cache = cache._replace(fingerprints=_fingerprints(cache))
    return y.reshape(x.shape[:-1] + (d_out,)), cache


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
    layout) and dbias (d_out,). Fields not asked for are None. Every array is new (dx, like
    the forward's y, not always C-contiguous).

    Notes
    -----
    With g = dy B (N, r) and h = x_d Aᵀ (N, r):
        dB = s · dyᵀ h,   dA = s · gᵀ x_d,   dx = dy W + s · (g A) ⊙ mask,
        dW = dyᵀ x,       dbias = Σ_n dy.
    """
    dy2 = _prepare_backward(dy, cache, LoRACache, need_dbias)  # (N, d_out)
    hint = {"merge_weight": True} if cache.merge_weight and cache.backend == "numba" else {}
    dx, dA, dB, dW, dbias = BACKEND_MODULES[cache.backend].backward(
        dy2, cache.x, cache.W, cache.A, cache.B, cache.h, scaling=cache.scaling, mask=cache.mask,
        fan_in_fan_out=cache.fan_in_fan_out, need_dx=bool(need_dx), need_dW=bool(need_dW),
        need_dbias=bool(need_dbias), kept=cache.kept, **hint)
    if dx is not None:
        dx = dx.reshape(cache.x_shape)  # (..., d_in)
    return LoRAGrads(dx, dA, dB, dW, dbias)


DoRASaved = dora.DoRASaved


class DoRACache(NamedTuple):
    """What ``dora_backward`` needs from the forward pass (new views of the inputs, as
    ``LoRACache``)."""

    x: np.ndarray  # (N, d_in)
    W: np.ndarray  # (d_out, d_in), or (d_in, d_out) when fan_in_fan_out
    A: np.ndarray  # (r, d_in)
    B: np.ndarray  # (d_out, r)
    scaling: float
    mask: np.ndarray | None  # broadcast to (N, d_in), or None
    saved: DoRASaved  # u (N, d_out), h (N, r), c, inv_n (d_out,), WA, AA, x_d (N, d_in)
    fan_in_fan_out: bool
    detach_norm: bool
    x_shape: tuple
    has_bias: bool
    backend: str
    fingerprints: dict | None = None  # checksums of x, W, A, B, mask (check_unchanged=True)

    @property
    def h(self):
        return self.saved.h


class DoRAGrads(NamedTuple):
    """Gradients of a DoRA layer; a field is None when it was not asked for."""

    dx: np.ndarray | None  # (..., d_in)
    dA: np.ndarray  # (r, d_in)
    dB: np.ndarray  # (d_out, r)
    dm: np.ndarray  # (d_out,)
    dW: np.ndarray | None  # W's layout
    dbias: np.ndarray | None  # (d_out,)


def dora_forward(x, W, A, B, m, *, scaling, bias=None, dropout_mask=None, fan_in_fan_out=False,
                 detach_norm=True, backend=None, norms=None, check_unchanged=False):
    """DoRA (weight-decomposed LoRA) layer, forward pass; PEFT's LoRA with ``use_dora=True``.

    Parameters
    ----------
    x, W, A, B, scaling, bias, dropout_mask, fan_in_fan_out, backend, check_unchanged : as in
        ``lora_forward``
    m : (d_out,) trainable magnitude
    detach_norm : bool, treat n as a constant in the backward pass (PEFT; DoRA paper §4.3)
    norms : (d_out,) or None, row norms n to use instead of ‖W + s·B A‖. With detach_norm=True
        the backward treats n as a constant anyway; passing n computed once at a point makes the
        forward match that: how a finite-difference check of the detached gradient holds n fixed.
        With detach_norm=False it is a ValueError (the gradient through n needs n to be
        ‖W + s·B A‖).

    Returns
    -------
    y : (..., d_out)
    cache : DoRACache for ``dora_backward``

    Notes
    -----
    n = ‖W + s·B A‖ per output row (d_out,), c = m / n,
    y = x Wᵀ + bias + (c − 1) ⊙ (x_d Wᵀ) + c ⊙ s·(x_d Aᵀ) Bᵀ
      = c ⊙ (x_d (W + s·B A)ᵀ) + (x − x_d) Wᵀ + bias.
    A row with W + s·B A = 0 gets c = 0 (see ``minilora.ops.dora``), never NaN.
    """
    scaling, d_out, backend, v = _prepare(x, W, A, B, m, scaling, bias, dropout_mask,
                                          fan_in_fan_out, backend)
    detach_norm = bool(detach_norm)
    if norms is not None:
        if not detach_norm:
            raise ValueError("norms= holds n fixed, which only the detached gradient allows: "
                             "with detach_norm=False the gradient flows through n = ‖W + s·B A‖")
        _, checked = check_dtypes(allow_complex=backend == "numpy", m=v["m"], norms=norms)
        norms = checked["norms"]
        if norms.shape != (d_out,):
            raise ValueError(f"norms must be (d_out,) = ({d_out},), got norms {norms.shape}")
    fan_in_fan_out = bool(fan_in_fan_out)
    y, saved = dora.forward(BACKEND_MODULES[backend], v["x"], v["W"], v["A"], v["B"], v["m"],
                            scaling=scaling, bias=v["bias"], mask=v["mask"],
                            fan_in_fan_out=fan_in_fan_out, norms=norms)
    cache = DoRACache(v["x"], v["W"], v["A"], v["B"], scaling, v["mask"], saved, fan_in_fan_out,
                      detach_norm, x.shape, bias is not None, backend)
    if check_unchanged:
        cache = cache._replace(fingerprints=_fingerprints(cache))
    return y.reshape(x.shape[:-1] + (d_out,)), cache


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
    With ``detach_norm=False`` the gradient through n is added (``minilora.ops.dora``).
    """
    dy2 = _prepare_backward(dy, cache, DoRACache, need_dbias, DoRASaved._fields)  # (N, d_out)
    if type(cache.detach_norm) is not bool or (not cache.detach_norm and cache.saved.WA is None):
        raise ValueError("the cache's detach_norm was modified after the forward pass")
    dx, dA, dB, dm, dW, dbias = dora.backward(
        BACKEND_MODULES[cache.backend], dy2, cache.x, cache.W, cache.A, cache.B, cache.saved,
        scaling=cache.scaling, mask=cache.mask, fan_in_fan_out=cache.fan_in_fan_out,
        detach_norm=cache.detach_norm, need_dx=bool(need_dx), need_dW=bool(need_dW),
        need_dbias=bool(need_dbias))
    if dx is not None:
        dx = dx.reshape(cache.x_shape)  # (..., d_in)
    return DoRAGrads(dx, dA, dB, dm, dW, dbias)
