"""minilora.toolkit.init: each scheme's factors against the same quantities computed another way
(projectors from eigh and lstsq), the bounds of the Kaiming-uniform draws, and the refusals."""

import numpy as np
import pytest

from minilora.toolkit.init import INIT_SCHEMES, init_lora, kaiming_uniform, linear_bias


def _W(d_out=7, d_in=5, seed=0):
    return np.random.default_rng(seed).standard_normal((d_out, d_in))


def test_kaiming_uniform_and_linear_bias_are_uniform_on_one_over_sqrt_fan_in():
    rng = np.random.default_rng(0)
    a = kaiming_uniform(rng, (400, 25), np.float32)
    b = linear_bias(rng, 25, 10000, np.float64)
    for v in (a, b):
        assert np.max(np.abs(v)) <= 0.2 and np.max(np.abs(v)) > 0.199  # bound 1/√25
        assert np.var(v) == pytest.approx(0.2**2 / 3, rel=0.05)  # U(±b) has variance b²/3
    assert a.dtype == np.float32 and a.shape == (400, 25) and b.shape == (10000,)


@pytest.mark.parametrize("scheme", ["default", "gaussian"])
def test_default_and_gaussian_start_with_B_zero_and_W_a_copy(scheme):
    W = _W()
    W_before = W.copy()
    A, B, W_new = init_lora(scheme, W, 3, 2.0, np.random.default_rng(1))
    assert A.shape == (3, 5) and B.shape == (7, 3) and not B.any()
    np.testing.assert_array_equal(W_new, W_before)
    assert not np.shares_memory(W_new, W)
    np.testing.assert_array_equal(W, W_before)
    if scheme == "gaussian":
        big = init_lora(scheme, _W(4, 4000), 4, 1.0, np.random.default_rng(2))[0]
        assert np.std(big) == pytest.approx(1 / 4, rel=0.03)  # N(0, 1/r²)


def test_pissa_takes_the_top_r_singular_subspace():
    W, r, s = _W(), 3, 0.5
    A, B, W_res = init_lora("pissa", W, r, s, np.random.default_rng(0))
    evals, evecs = np.linalg.eigh(W @ W.T)  # left singular vectors, another way
    U_r = evecs[:, np.argsort(evals)[::-1][:r]]  # (d_out, r)
    np.testing.assert_allclose(s * B @ A, U_r @ U_r.T @ W, atol=1e-12)  # best rank-r part
    np.testing.assert_allclose(W_res + s * B @ A, W, atol=1e-12)
    np.testing.assert_allclose(A @ A.T, B.T @ B, atol=1e-12)  # √(S/s) on both sides


def test_olora_takes_the_span_of_the_first_r_columns():
    W, r, s = _W(), 2, 3.0
    A, B, W_res = init_lora("olora", W, r, s, np.random.default_rng(0))
    C = W[:, :r]
    P = C @ np.linalg.lstsq(C, np.eye(W.shape[0]), rcond=None)[0]  # projector onto span(C)
    np.testing.assert_allclose(B @ A, P @ W, atol=1e-12)
    np.testing.assert_allclose(B.T @ B, np.eye(r), atol=1e-12)  # Q's columns
    np.testing.assert_allclose(A, np.triu(A), atol=1e-12)  # R's rows
    np.testing.assert_allclose(W_res, W - s * B @ A, atol=1e-12)


@pytest.mark.parametrize("scheme", ["pissa", "olora"])
def test_float32_residual_reproduces_the_base_output(scheme):
    W = _W(16, 12).astype(np.float32)
    A, B, W_res = init_lora(scheme, W, 4, 2.0, np.random.default_rng(0))
    assert {A.dtype, B.dtype, W_res.dtype} == {np.dtype(np.float32)}
    x = np.random.default_rng(1).standard_normal((5, 12))
    y = x @ W_res.astype(np.float64).T + 2.0 * (x @ A.T.astype(np.float64)) @ B.T
    np.testing.assert_allclose(y, x @ W.astype(np.float64).T, atol=2e-5)


def test_refusals():
    W, rng = _W(4, 3), np.random.default_rng(0)
    with pytest.raises(ValueError, match="init must be one of"):
        init_lora("kaiming", W, 2, 1.0, rng)
    for scheme in ("pissa", "olora"):
        with pytest.raises(ValueError, match="r must be at most min\\(d_out, d_in\\) = 3"):
            init_lora(scheme, W, 4, 1.0, rng)
    with pytest.raises(ValueError, match="scaling must be > 0"):
        init_lora("pissa", W, 2, -1.0, rng)
    assert INIT_SCHEMES == ("default", "gaussian", "pissa", "olora")
