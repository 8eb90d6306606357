"""Input validation, done once at each public entry point.

Every public op calls one function here before any arithmetic. Errors name the offending array
and its shape or dtype: ``TypeError`` for types and dtypes, ``ValueError`` for shapes and values.
Nothing here copies or modifies an input.

Arrays must be plain ``numpy.ndarray``: subclasses change what the operators mean (``*`` is a
matrix product for ``np.matrix``, a masked array's mask is ignored by ``@``), so they are refused
with ``TypeError`` rather than converted (``np.asarray`` would silently drop a mask). Two
exceptions: ``np.memmap``, whose arithmetic is ndarray's, is taken as a plain view; and a subclass
whose class sets ``__minilora_ndarray_arithmetic__ = True`` vouches that its operators compute
what ndarray's do (it may round or perturb their results, as a model of a narrower format does)
and is taken as it is. That is a protocol, not a registry: this module imports nothing and keeps
no list of such classes.
"""

import math

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F32, _F64 = FLOAT_DTYPES


NDARRAY_ARITHMETIC = "__minilora_ndarray_arithmetic__"  # the class attribute of the protocol


def is_plain(a):
    """True for a plain ndarray, or an ndarray subclass whose class declares ndarray's
    arithmetic (``NDARRAY_ARITHMETIC`` set to True, see the module docstring)."""
    return type(a) is np.ndarray or (isinstance(a, np.ndarray)
                                     and getattr(type(a), NDARRAY_ARITHMETIC, False) is True)


def plain_array(a, name):
    """``a`` as a plain ndarray (a memmap becomes a view of it); TypeError for anything else."""
    if is_plain(a):
        return a
    if isinstance(a, np.memmap):
        return a.view(np.ndarray)
    if isinstance(a, np.ndarray):
        raise TypeError(f"{name} is a {type(a).__module__}.{type(a).__name__}, an ndarray "
                        f"subclass whose operators differ from ndarray's; pass np.asarray({name}) "
                        f"if that is what you mean")
    raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")


def check_positive_int(value, name, *, minimum=1):
    """Return ``value`` as an int: TypeError unless an integer (bool is not), ValueError below
    ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value}")
    return int(value)


def check_scaling(scaling, name="scaling"):
    """Return ``scaling`` as a Python float (so it never promotes float32 arrays to float64):
    TypeError unless a real number (bool is not), ValueError unless finite."""
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(scaling).__name__}")
    try:
        s = float(scaling)
    except OverflowError:  # an int beyond float's range
        s = math.inf
    if not math.isfinite(s):
        raise ValueError(f"{name} must be finite, got {scaling!r}")
    return s


COMPLEX = np.dtype(np.complex128)  # the NumPy reference's complex-step checks


def check_dtypes(allow_complex=False, **arrays):
    """Check that every given array is a plain ndarray of one shared float dtype; return
    ``(dtype, arrays)`` with the arrays as plain ndarrays (see ``plain_array``).

    With ``allow_complex`` (the NumPy reference, for complex-step checks), complex128 arrays may
    be mixed with float64 ones, which are then returned as complex128 copies.
    ``None`` values (optional inputs that were not passed) are skipped and returned as None.
    """
    dtype = None
    first = None
    plain = {}
    for name, a in arrays.items():
        plain[name] = a
        if a is None:
            continue
        a = plain[name] = plain_array(a, name)
        if a.dtype is not _F32 and a.dtype is not _F64 and a.dtype not in FLOAT_DTYPES \
                and not (allow_complex and a.dtype == COMPLEX):
            also = (" (complex128 runs on the numpy backend, for complex-step checks)"
                    if a.dtype == COMPLEX else "")
            raise TypeError(f"{name} has dtype {a.dtype}; minilora computes in float32 or "
                            f"float64{also}")
        if dtype is None:
            dtype, first = a.dtype, name
        elif a.dtype is not dtype and a.dtype != dtype:
            if allow_complex and {a.dtype, dtype} == {COMPLEX, _F64}:
                dtype, first = COMPLEX, name if a.dtype == COMPLEX else first
                continue
            raise TypeError(
                f"all float inputs must share one dtype: {first} is {dtype} but {name} is {a.dtype}"
            )
    if dtype == COMPLEX:
        plain = {k: None if a is None else a.astype(COMPLEX, copy=False) for k, a in plain.items()}
    return dtype, plain


def check_layer_shapes(x, W, A, B, *, fan_in_fan_out, bias=None, dropout_mask=None, m=None):
    """Check the shapes of a LoRA/DoRA layer's inputs; return ``(d_in, d_out, r)``.

    x (..., d_in), W (d_out, d_in) or (d_in, d_out) when ``fan_in_fan_out``, A (r, d_in),
    B (d_out, r), bias (d_out,), m (d_out,), dropout_mask broadcastable to x.
    """
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dimension (..., d_in), got shape {x.shape}")
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D, got shape {W.shape}")
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A and B must be 2-D, got A {A.shape} and B {B.shape}")
    r, d_in = A.shape
    d_out = B.shape[0]
    if r < 1:
        raise ValueError(f"rank r = A.shape[0] must be at least 1, got A {A.shape}")
    if B.shape[1] != r:
        raise ValueError(f"B must be (d_out, r) with r = A.shape[0] = {r}, got B {B.shape}")
    expected_W = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    if W.shape != expected_W:
        layout = "(d_in, d_out) with fan_in_fan_out=True" if fan_in_fan_out else "(d_out, d_in)"
        raise ValueError(
            f"W must be {layout} = {expected_W} to match A {A.shape} and B {B.shape}, "
            f"got W {W.shape}"
        )
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x must be (..., d_in) with d_in = {d_in} (from A {A.shape}), got x {x.shape}")
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"bias must be (d_out,) = ({d_out},), got bias {bias.shape}")
    if m is not None and m.shape != (d_out,):
        raise ValueError(f"m must be (d_out,) = ({d_out},), got m {m.shape}")
    if dropout_mask is not None:
        try:
            broadcast = np.broadcast_shapes(dropout_mask.shape, x.shape)
        except ValueError:
            broadcast = None
        if broadcast != x.shape:
            raise ValueError(
                f"dropout_mask must broadcast to x {x.shape}, got dropout_mask {dropout_mask.shape}"
            )
    return d_in, d_out, r


def check_dy(dy, y_shape, dtype):
    """Check the upstream gradient against the forward output's shape and dtype; return it as a
    plain ndarray."""
    dy = plain_array(dy, "dy")
    if dy.dtype != dtype:
        raise TypeError(f"dy has dtype {dy.dtype} but the forward pass ran in {dtype}")
    if dy.shape != y_shape:
        raise ValueError(f"dy must have the shape of y {y_shape}, got dy {dy.shape}")
    return dy
