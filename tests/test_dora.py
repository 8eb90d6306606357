"""DoRA: gradients against finite differences (central and complex-step) for both settings of
detach_norm and both backends; the norm expansion's fallback; zero rows; validation."""

import functools

import numpy as np
import pytest
from _helpers import BACKENDS, lora_arrays
from hypothesis import assume, given
from hypothesis import strategies as st

import minilora as ml
from minilora.ops import dora
from minilora.testing import assert_matches_reference, dora_cases


def _gradcheck(case, backend, **options):
    """Every gradient of dora_forward (with ``options``: detach_norm, norms) on a drawn case,
    bias included when the case has one, against central differences."""
    kw = case.kwargs()
    kw.pop("bias")

    def forward(x, W, A, B, m, bias=None):
        return ml.dora_forward(x, W, A, B, m, bias=bias, backend=backend, **kw, **options)

    backward = functools.partial(ml.dora_backward, need_dW=True,
                                 need_dbias=case.bias is not None)
    inputs = dict(x=case.x, W=case.W, A=case.A, B=case.B, m=case.m)
    if case.bias is not None:
        inputs["bias"] = case.bias
    ml.gradcheck(forward, backward, inputs, max_jacobian=2_000)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=dora_cases(dtypes=(np.float64,), max_dim=8))
def test_full_gradient_matches_finite_differences(backend, case):
    """detach_norm=False: every gradient, including through n, is the true derivative."""
    _gradcheck(case, backend, detach_norm=False)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=dora_cases(dtypes=(np.float64,), max_dim=8))
def test_detached_gradient_is_the_derivative_with_n_held_fixed(backend, case):
    """detach_norm=True (PEFT): the derivative of the forward whose n is computed from the
    point's own W, A, B and then held constant (the ``norms`` argument)."""
    frozen = dora.row_norms(case.W, case.A, case.B, case.scaling, case.fan_in_fan_out)[0]
    _gradcheck(case, backend, norms=frozen)


def _reference_pair(scaling, mask, fan_in_fan_out, detach_norm):
    """DoRA through the public pair on the NumPy reference, which accepts complex128 inputs."""

    def forward(x, W, A, B, m):
        return ml.dora_forward(x, W, A, B, m, scaling=scaling, dropout_mask=mask,
                               fan_in_fan_out=fan_in_fan_out, detach_norm=detach_norm,
                               backend="numpy")

    def backward(dy, cache):
        return ml.dora_backward(dy, cache, need_dW=True)

    return forward, backward


@given(case=dora_cases(dtypes=(np.float64,), max_dim=8), mask=st.booleans())
def test_complex_step_agrees_to_1e_12(case, mask):
    """Complex steps have no cancellation, so the full DoRA gradient must agree to ~1e-12 of
    the gradient's magnitude.

    d_in = 1 is left to the central-difference tests: there y = m·sign(V)·x does not depend on W,
    A or B at all, and the analytic zero is a cancellation of O(1) terms, exact only to rounding.
    """
    assume(case.x.shape[-1] > 1)
    x = case.x.reshape(-1, case.x.shape[-1])
    dropout = ((np.arange(x.size).reshape(x.shape) % 3 != 0) * 1.5) if mask else None
    forward, backward = _reference_pair(case.scaling, dropout, case.fan_in_fan_out, False)
    inputs = dict(x=x, W=case.W, A=case.A, B=case.B, m=case.m)
    report = ml.gradcheck(forward, backward, inputs, method="complex", rtol=1e-12,
                          max_jacobian=2_000)
    magnitude = max(c.scale for c in report.inputs)
    assert max(c.max_abs_err for c in report.inputs) <= 1e-12 * magnitude


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_row_of_W_plus_sBA_is_defined_not_nan(backend):
    rng = np.random.default_rng(0)
    d_in, d_out, r, s = 5, 4, 2, 0.5
    W, A, B = rng.standard_normal((d_out, d_in)), rng.standard_normal((r, d_in)), \
        rng.standard_normal((d_out, r))
    W[2] = -s * B[2] @ A  # row 2 of W + s·B A is exactly zero
    x, bias, m = rng.standard_normal((3, d_in)), rng.standard_normal(d_out), np.ones(d_out)
    y, cache = ml.dora_forward(x, W, A, B, m, scaling=s, bias=bias, detach_norm=False,
                               backend=backend)
    dy = rng.standard_normal(y.shape)
    grads = ml.dora_backward(dy, cache, need_dW=True, need_dbias=True)
    np.testing.assert_array_equal(y[:, 2], bias[2])  # c = 0: the row outputs its bias
    # c_2 = 0 and 1/n_2 := 0: row 2 passes nothing back, so every other row, and dx and dA,
    # are those of the same layer without row 2 (a regular DoRA problem); row 2's own dm, dB
    # and dW are 0, its dbias is Σ dy
    keep = [0, 1, 3]
    y_ref, c_ref = ml.dora_forward(x, W[keep], A, B[keep], m[keep], scaling=s, bias=bias[keep],
                                   detach_norm=False, backend="numpy")
    ref = ml.dora_backward(dy[:, keep], c_ref, need_dW=True, need_dbias=True)
    tol = dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y[:, keep], y_ref, **tol)
    np.testing.assert_allclose(grads.dx, ref.dx, **tol)
    np.testing.assert_allclose(grads.dA, ref.dA, **tol)
    for name in ("dm", "dB", "dW", "dbias"):
        np.testing.assert_allclose(getattr(grads, name)[keep], getattr(ref, name), **tol,
                                   err_msg=name)
    assert grads.dm[2] == 0 and not grads.dB[2].any() and not grads.dW[2].any()
    np.testing.assert_allclose(grads.dbias[2], dy[:, 2].sum(), **tol)


def test_norm_expansion_falls_back_where_it_cancels():
    """Rows where ‖W_j + s·B_j A‖ ≪ ‖W_j‖ are computed directly, to full relative accuracy."""
    rng = np.random.default_rng(1)
    d_in, d_out, r, s = 64, 6, 3, 2.0
    A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    W = rng.standard_normal((d_out, d_in))
    W[:3] = -s * B[:3] @ A + 1e-9 * rng.standard_normal((3, d_in))  # n_j ~ 1e-8 ≪ ‖W_j‖ ~ 10
    n, _, _, n_direct = dora.row_norms(W, A, B, s, False)
    exact = np.linalg.norm(W + s * B @ A, axis=1)
    assert n_direct == 3
    np.testing.assert_allclose(n, exact, rtol=1e-6)  # the expansion alone: wrong in digit one
    expansion = np.sqrt(np.abs(np.einsum("ji,ji->j", W, W) + 2 * s * np.einsum(
        "jk,jk->j", B, W @ A.T) + s**2 * np.einsum("jk,kl,jl->j", B, A @ A.T, B)))
    assert np.max(np.abs(expansion[:3] - exact[:3]) / exact[:3]) > 1  # wrong in the first digit


def test_norms_in_float32_are_accurate_relative_to_float64():
    rng = np.random.default_rng(2)
    W, A, B = (rng.standard_normal(s).astype(np.float32) for s in ((50, 80), (4, 80), (50, 4)))
    n32 = dora.row_norms(W, A, B, 0.5, False)[0]
    exact = np.linalg.norm(W.astype(np.float64) + 0.5 * B.astype(np.float64) @ A, axis=1)
    assert n32.dtype == np.float32
    assert np.max(np.abs(n32 - exact) / exact) < 2 * (80 + 2 * 4 + 4) * 2.0**-24


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=dora_cases(dtypes=(np.float32,), max_dim=16))
def test_float32_matches_float64(backend, case):
    kw = case.kwargs()
    y32, c32 = ml.dora_forward(case.x, case.W, case.A, case.B, case.m, backend=backend,
                               detach_norm=case.detach_norm, **kw)
    g32 = ml.dora_backward(case.dy, c32, need_dW=True, need_dbias=case.bias is not None)
    outputs = {"y": y32, **{k: v for k, v in g32._asdict().items() if v is not None}}
    assert all(v.dtype == np.float32 for v in outputs.values())
    # Within the oracle's tolerance (DoRA's include the norms' error, larger where rows cancel)
    # of the float64 reference on the same float32 inputs, for both settings of detach_norm.
    assert_matches_reference(outputs, case, dtype="fp32")


def test_bad_m_is_named():
    rng = np.random.default_rng(3)
    x, W, A, B = lora_arrays(rng, N=2, d_in=4, d_out=3, r=2).values()
    with pytest.raises(ValueError, match=r"m must be \(d_out,\) = \(3,\), got m \(4,\)"):
        ml.dora_forward(x, W, A, B, np.ones(4), scaling=1.0)
    with pytest.raises(TypeError, match="m is float32"):
        ml.dora_forward(x, W, A, B, np.ones(3, np.float32), scaling=1.0)
    _, cache = ml.lora_forward(x, W, A, B, scaling=1.0)
    with pytest.raises(ValueError, match=r"norms must be \(d_out,\) = \(3,\)"):
        ml.dora_forward(x, W, A, B, np.ones(3), scaling=1.0, norms=np.ones(2))
    with pytest.raises(TypeError, match="DoRACache"):
        ml.dora_backward(np.zeros((2, 3)), cache)


def test_no_fallback_for_a_typical_adapter():
    """When s·B A is a modest update of W (training), the cheap expansion serves every row."""
    rng = np.random.default_rng(4)
    d, r = 256, 8
    W = rng.standard_normal((d, d)) / np.sqrt(d)
    A, B = rng.standard_normal((r, d)) / np.sqrt(d), 0.1 * rng.standard_normal((d, r))
    assert dora.row_norms(W, A, B, 2.0, False)[3] == 0


def test_fixed_norms_with_the_full_gradient_is_an_error():
    """norms= holds n fixed, which contradicts detach_norm=False (the gradient through n)."""
    rng = np.random.default_rng(0)
    x, W, A, B = lora_arrays(rng, N=3, d_in=5, d_out=4, r=2).values()
    m = np.ones(4)
    n = dora.row_norms(W, A, B, 0.5, False)[0]
    with pytest.raises(ValueError, match="detach_norm=False"):
        ml.dora_forward(x, W, A, B, m, scaling=0.5, norms=n, detach_norm=False)
    _, cache = ml.dora_forward(x, W, A, B, m, scaling=0.5, norms=n)
    assert cache.saved.WA is None  # nothing computed for a gradient that cannot be asked for
