"""Floating-point formats a candidate may compute in, and NumPy emulations of their rounding.

    name  unit roundoff u   emulation (round to nearest, ties to even, on float32 bits)
    bf16  2⁻⁸               keep the top 16 bits of a float32 (8 exponent, 7 mantissa bits)
    fp16  2⁻¹¹              numpy.float16 (5 exponent, 10 mantissa bits; overflows past 65504)
    tf32  2⁻¹¹              keep 10 mantissa bits of a float32 (the exponent range of float32)
    fp32  2⁻²⁴              numpy.float32
    fp64  2⁻⁵³              numpy.float64

A candidate "computes in bf16" when its inputs and stored intermediates are bf16; its dot
products accumulate in the accumulation format (fp32 by default for bf16, fp16 and tf32, as
tensor cores and CPU kernels do).
"""

from dataclasses import dataclass

import numpy as np


def _to_float32_odd(a):
    """float64 values as float32, rounded to odd: truncated towards zero, and the last bit set
    when that was inexact. Rounding the result to fewer than 23 mantissa bits then rounds the
    float64 value correctly (round to nearest twice would not: 1 + 2⁻⁸ + 2⁻³⁰ goes to the tie
    1 + 2⁻⁸ in float32, then to 1 in bf16, where 1 + 2⁻⁷ is nearer)."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(over="ignore"):
        f = a.astype(np.float32)  # nearest (inf beyond float32's range)
    inexact = np.isfinite(a) & (f.astype(np.float64) != a)
    away = inexact & (np.abs(f.astype(np.float64)) > np.abs(a))
    f = np.where(away, np.nextafter(f, np.float32(0)), f)  # towards zero
    bits = f.view(np.uint32) | inexact.astype(np.uint32)  # the sticky bit
    return bits.view(np.float32)


def _round_mantissa(a, drop_bits):
    """Round float32 values to ``23 − drop_bits`` mantissa bits, nearest-even, in float32
    (float64 values correctly too, through ``_to_float32_odd``)."""
    a = np.asarray(a)
    a = _to_float32_odd(a) if a.dtype == np.float64 else np.asarray(a, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    half = np.uint64(1 << (drop_bits - 1)) - np.uint64(1)
    lsb = (bits >> np.uint64(drop_bits)) & np.uint64(1)
    rounded = ((bits + half + lsb) >> np.uint64(drop_bits)) << np.uint64(drop_bits)
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(a), out, a)  # NaN and inf pass through unchanged


@dataclass(frozen=True)
class Precision:
    name: str
    u: float  # unit roundoff
    eta: float  # half the spacing of subnormal numbers: rounding's absolute error below the
    #             normal range, where the relative bound u no longer holds

    def round(self, a):
        """``a`` rounded to this format, returned as float32 (float64 for fp64)."""
        a = np.asarray(a)
        if self.name == "fp64":
            return a.astype(np.float64)
        if self.name == "fp32":
            return a.astype(np.float32)
        if self.name == "fp16":
            with np.errstate(over="ignore"):
                return a.astype(np.float16).astype(np.float32)
        return _round_mantissa(a, 16 if self.name == "bf16" else 13)

    @property
    def numpy_dtype(self):
        """The NumPy dtype that holds this format's values exactly."""
        return np.dtype(np.float64 if self.name == "fp64" else np.float32)


PRECISIONS = {p.name: p for p in (Precision("bf16", 2.0**-8, 2.0**-134),
                                  Precision("fp16", 2.0**-11, 2.0**-25),
                                  Precision("tf32", 2.0**-11, 2.0**-137),
                                  Precision("fp32", 2.0**-24, 2.0**-150),
                                  Precision("fp64", 2.0**-53, 2.0**-1074))}  # (2⁻¹⁰⁷⁵ is 0)
DEFAULT_ACCUMULATION = {"bf16": "fp32", "fp16": "fp32", "tf32": "fp32", "fp32": "fp32",
                        "fp64": "fp64"}


ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
           "float": "fp32", "float64": "fp64", "double": "fp64"}


def precision(name):
    """The Precision called ``name``: a name, an alias such as "float32" or "bfloat16", or a
    NumPy float dtype (np.float32); else a ValueError. Every entry point normalizes through this."""
    if isinstance(name, Precision):
        return name
    if not isinstance(name, str):
        try:
            name = np.dtype(name).name
        except TypeError:
            name = None
    key = ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)} "
                         f"(or {', '.join(ALIASES)})")
    return PRECISIONS[key]
