"""minilora.oracle.tolerance: γ_K, the reduction lengths, magnitudes against explicit |·|
formulas, and bounds that hold for a float32 computation while being reached within a modest
factor."""

import numpy as np
import pytest
from _helpers import lora_arrays

import minilora as ml
from minilora.oracle.tolerance import (
    cancellation_factors,
    gamma,
    lora_error_bounds,
    lora_magnitudes,
    lora_reduction_lengths,
)


def test_gamma():
    assert gamma(10, 2.0**-24) == pytest.approx(10 * 2.0**-24 / (1 - 10 * 2.0**-24), rel=1e-15)
    assert gamma(2**24, 2.0**-24) == np.inf
    assert gamma(0, 0.1) == 0


def test_reduction_lengths():
    assert lora_reduction_lengths(N=5, d_in=7, d_out=3, r=2) == {
        "y": 13, "dx": 8, "dA": 10, "dB": 14, "dW": 5, "dbias": 5}


def _inputs(seed=0, N=6, d_in=5, d_out=4, r=3):
    rng = np.random.default_rng(seed)
    x, W, A, B = lora_arrays(rng, N, d_in, d_out, r).values()
    return x, W, A, B, rng.standard_normal((N, d_out)), rng.standard_normal(d_out)


def test_magnitudes_are_the_formulas_on_absolute_values():
    x, W, A, B, dy, bias = _inputs()
    s = -0.75
    mags = lora_magnitudes(x, W, A, B, scaling=s, dy=dy, bias=bias)
    ax, aW, aA, aB, ady = (np.abs(a) for a in (x, W, A, B, dy))
    np.testing.assert_allclose(mags["y"], ax @ aW.T + np.abs(bias) + 0.75 * (ax @ aA.T) @ aB.T)
    np.testing.assert_allclose(mags["dx"], ady @ aW + 0.75 * (ady @ aB) @ aA)
    np.testing.assert_allclose(mags["dA"], 0.75 * (ady @ aB).T @ ax)
    np.testing.assert_allclose(mags["dB"], 0.75 * ady.T @ (ax @ aA.T))
    np.testing.assert_allclose(mags["dW"], ady.T @ ax)
    np.testing.assert_allclose(mags["dbias"], ady.sum(axis=0))


def test_float32_errors_lie_within_the_bounds():
    x, W, A, B, dy, bias = _inputs(1, N=64, d_in=96, d_out=48, r=8)
    s = 2.0
    y64, c64 = ml.lora_forward(x, W, A, B, scaling=s, bias=bias, backend="numpy")
    g64 = ml.lora_backward(dy, c64, need_dW=True, need_dbias=True)
    f32 = [a.astype(np.float32) for a in (x, W, A, B, dy, bias)]
    y32, c32 = ml.lora_forward(*f32[:4], scaling=s, bias=f32[5], backend="numpy")
    g32 = ml.lora_backward(f32[4], c32, need_dW=True, need_dbias=True)
    exact = {"y": y64, **g64._asdict()}
    got = {"y": y32, **g32._asdict()}
    x32, W32, A32, B32, dy32, b32 = (a.astype(np.float64) for a in f32)  # the inputs computed on
    bounds = lora_error_bounds(x32, W32, A32, B32, scaling=s, dy=dy32, bias=b32,
                               u=2.0**-24)
    ref = {"y": ml.lora_forward(x32, W32, A32, B32, scaling=s, bias=b32)[0]}
    ref.update(ml.lora_backward(dy32, ml.lora_forward(x32, W32, A32, B32, scaling=s,
                                                      bias=b32)[1],
                                need_dW=True, need_dbias=True)._asdict())
    assert set(bounds) == set(exact)
    for name, bound in bounds.items():
        err = np.abs(got[name].astype(np.float64) - ref[name])
        assert np.all(err <= bound), name
        assert np.max(err / bound) > 1e-3, name  # not vacuous: within three decades


def test_cancellation_factors():
    W = np.array([[1.0, 0.0], [3.0, 4.0]])
    A, B = np.array([[1.0, 0.0]]), np.array([[-0.9], [0.0]])
    f = cancellation_factors(W, A, B, 1.0, False)
    # row 0: V = (0.1, 0), t = 1 + 0.9 = 1.9, t/n = 19 > 4: 4·19; row 1: t = n = 5: (t/n)² = 1
    np.testing.assert_allclose(f, [4 * 19.0, 1.0])
    W[0, 0] = 0.9
    np.testing.assert_array_equal(cancellation_factors(W, A, B, 1.0, False)[0], 1.0)  # zero row
