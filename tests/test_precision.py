"""minilora.oracle.precision: each format's rounding against an independent round-to-nearest-even
computed from the value's binade in float64, its unit roundoff, and the name lookup."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora.oracle.precision import DEFAULT_ACCUMULATION, PRECISIONS, precision

MANTISSA_BITS = {"bf16": 7, "fp16": 10, "tf32": 10}  # stored bits (one more is implicit)
MIN_EXPONENT = {"bf16": -126, "fp16": -14, "tf32": -126}  # of the normal range


def nearest_even(v, bits, min_exponent):
    """v (float64 scalar) rounded to ``bits`` mantissa bits, ties to even: from the spacing of
    v's binade (the subnormal spacing below the normal range), not from bit manipulation."""
    if v == 0 or not np.isfinite(v):
        return v
    e = max(int(np.floor(np.log2(abs(v)))), min_exponent)
    spacing = 2.0 ** (e - bits)
    q = v / spacing  # exact: a power-of-two division
    lo = np.floor(q)
    if q - lo > 0.5 or (q - lo == 0.5 and lo % 2 == 1):
        lo += 1
    return lo * spacing


finite_values = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, width=64)


@pytest.mark.parametrize("name", ["bf16", "tf32", "fp16"])
@given(v=finite_values)
def test_rounding_is_round_to_nearest_even(name, v):
    prec = PRECISIONS[name]
    expected = nearest_even(v, MANTISSA_BITS[name], MIN_EXPONENT[name])
    if name == "fp16" and abs(expected) > 65504:  # past fp16's largest finite number
        expected = np.copysign(np.inf, v)
    with np.errstate(over="ignore"):
        got = float(prec.round(np.array([v]))[0])
    assert got == expected, (v, got, expected)
    v32 = float(np.float32(v))  # the same from float32 inputs
    expected32 = nearest_even(v32, MANTISSA_BITS[name], MIN_EXPONENT[name])
    if name == "fp16" and abs(expected32) > 65504:
        expected32 = np.copysign(np.inf, v32)
    with np.errstate(over="ignore"):
        assert float(prec.round(np.array([v32], np.float32))[0]) == expected32


@pytest.mark.parametrize("name", ["bf16", "tf32"])
def test_a_float64_just_above_a_tie_rounds_up_not_twice_to_even(name):
    bits = MANTISSA_BITS[name]
    v = 1 + 2.0 ** -(bits + 1) + 2.0**-40  # float32 would round it to the tie first
    assert float(PRECISIONS[name].round(np.float64(v))) == 1 + 2.0**-bits


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_unit_roundoff_is_the_largest_relative_error_of_rounding(name):
    prec = PRECISIONS[name]
    rng = np.random.default_rng(0)
    v = rng.uniform(1, 2, 20000) * 2.0 ** rng.integers(-14, 15, 20000)  # every normal range
    rel = np.abs(prec.round(v).astype(np.float64) - v) / v
    if name == "fp64":
        assert np.max(rel) == 0  # the values are float64 already
        assert prec.u == np.finfo(np.float64).eps / 2
        return
    assert np.max(rel) <= prec.u
    assert np.max(rel) > 0.9 * prec.u  # and it is reached


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_eta_is_half_the_subnormal_spacing(name):
    prec = PRECISIONS[name]
    if name == "fp64":
        assert prec.eta == 2.0**-1074  # the subnormal spacing itself: half of it is 0
        return
    spacing = {"bf16": 2.0**-133, "fp16": 2.0**-24, "tf32": 2.0**-136, "fp32": 2.0**-149}[name]
    assert prec.eta == spacing / 2
    assert float(prec.round(np.float64(spacing))) == spacing  # the smallest subnormal is kept
    assert float(prec.round(np.float64(0.75 * spacing))) == spacing  # rounded to nearest
    assert float(prec.round(np.float64(0.25 * spacing))) == 0.0


def test_nan_and_infinities_pass_through():
    for prec in PRECISIONS.values():
        out = prec.round(np.array([np.nan, np.inf, -np.inf]))
        assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf


def test_round_returns_float32_except_for_fp64():
    for name, prec in PRECISIONS.items():
        assert prec.round(np.ones(2)).dtype == (np.float64 if name == "fp64" else np.float32)


def test_precision_lookup():
    assert precision("bfloat16") is PRECISIONS["bf16"]
    assert precision(np.float32) is PRECISIONS["fp32"]
    assert precision("double") is PRECISIONS["fp64"]
    assert precision(PRECISIONS["tf32"]) is PRECISIONS["tf32"]
    for bad in ("fp8", 3, np.int32):
        with pytest.raises(ValueError, match="unknown precision"):
            precision(bad)
    assert {DEFAULT_ACCUMULATION[k] for k in ("bf16", "fp16", "tf32")} == {"fp32"}
