"""The public LoRA pair: gradients against finite differences, float32 against float64 within
derived bounds, validation, non-mutation, determinism."""

import functools

import numpy as np
import pytest
from _helpers import BACKENDS, lora_arrays
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora.oracle.tolerance import UNIT_ROUNDOFF, lora_error_bounds
from minilora.testing import lora_cases


def _all_grads(case, backend):
    y, cache = ml.lora_forward(case.x, case.W, case.A, case.B, backend=backend, **case.kwargs())
    grads = ml.lora_backward(case.dy, cache, need_dW=True, need_dbias=case.bias is not None)
    return {"y": y, **{k: v for k, v in grads._asdict().items() if v is not None}}


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=lora_cases(dtypes=(np.float64,)))
def test_every_gradient_matches_finite_differences(backend, case):
    """dx, dA, dB, dW and dbias against central differences (full Jacobian or directions)."""
    kw = case.kwargs()
    bias = kw.pop("bias")

    def forward(x, W, A, B, bias=None):
        return ml.lora_forward(x, W, A, B, bias=bias, backend=backend, **kw)

    backward = functools.partial(ml.lora_backward, need_dW=True, need_dbias=bias is not None)
    inputs = dict(x=case.x, W=case.W, A=case.A, B=case.B)
    if bias is not None:
        inputs["bias"] = bias
    ml.gradcheck(forward, backward, inputs, max_jacobian=2_000)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=lora_cases(dtypes=(np.float32,)))
def test_float32_is_within_the_derived_rounding_bound(backend, case):
    """|float32 − exact| ≤ γ_K(2⁻²⁴)·mag for every output (minilora.oracle.tolerance derives K
    and mag);
    "exact" is float64 on the same float32 inputs, itself within γ_K(2⁻⁵³)·mag."""
    got = _all_grads(case, backend)
    up = {k: (None if v is None else np.asarray(v, np.float64))
          for k, v in vars(case).items() if isinstance(v, np.ndarray) or v is None}
    case64 = type(case)(**{**vars(case), **up})
    ref = _all_grads(case64, "numpy")
    bounds = lora_error_bounds(case.x, case.W, case.A, case.B, dy=case.dy,
                               u=UNIT_ROUNDOFF[np.dtype(np.float32)] + 2.0**-53, **case.kwargs())
    assert set(got) == set(ref)
    for name, value in got.items():
        assert value.dtype == np.float32, name
        err = np.abs(value.astype(np.float64) - ref[name])
        assert np.all(err <= bounds[name]), (name, float(np.max(err - bounds[name])))


def test_the_bound_is_tight_enough_to_catch_a_small_scale_error():
    """The float32 bound must fail a result off by a factor 1 + 1e-4: a bound, not a shrug."""
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((8, 16)), rng.standard_normal((12, 16))
    A, B = rng.standard_normal((4, 16)), rng.standard_normal((12, 4))
    dy = rng.standard_normal((8, 12))
    y, _ = ml.lora_forward(x, W, A, B, scaling=2.0, backend="numpy")
    bound = lora_error_bounds(x, W, A, B, scaling=2.0, dy=dy, u=2.0**-24)["y"]
    assert np.any(np.abs(y * (1 + 1e-4) - y) > bound)


def test_equations_hold_on_a_hand_sized_example():
    """The equations of the docstring, checked literally on a 1-row example."""
    x = np.array([[1.0, 2.0]])
    W = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    A = np.array([[1.0, -1.0]])
    B = np.array([[2.0], [0.0], [1.0]])
    mask = np.array([[2.0, 0.0]])
    y, cache = ml.lora_forward(x, W, A, B, scaling=0.5, bias=np.ones(3), dropout_mask=mask,
                               backend="numpy")
    # x_d = [2, 0]; h = x_d Aᵀ = 2; y = x Wᵀ + 1 + 0.5·2·Bᵀ = [1,2,3] + 1 + [2,0,1]
    np.testing.assert_array_equal(y, [[4.0, 3.0, 5.0]])
    g = ml.lora_backward(np.array([[1.0, 1.0, 1.0]]), cache, need_dW=True, need_dbias=True)
    np.testing.assert_array_equal(g.dB, [[1.0], [1.0], [1.0]])  # s·dyᵀh = 0.5·2
    np.testing.assert_array_equal(g.dA, [[3.0, 0.0]])  # s·(dy B)ᵀ x_d = 0.5·3·[2, 0]
    np.testing.assert_array_equal(g.dx, [[2.0 + 3.0, 2.0]])  # dy W + s·(g A)⊙mask
    np.testing.assert_array_equal(g.dbias, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(g.dW, [[1.0, 2.0]] * 3)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=lora_cases())
def test_inputs_untouched_outputs_fresh_and_bits_repeat(backend, case):
    arrays = {k: v for k, v in vars(case).items() if isinstance(v, np.ndarray)}
    before = {k: v.copy() for k, v in arrays.items()}
    first, second = _all_grads(case, backend), _all_grads(case, backend)
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} was modified")
    for name, out in first.items():
        assert out.dtype == case.x.dtype
        np.testing.assert_array_equal(out, second[name])
        assert not any(np.shares_memory(out, a) for a in arrays.values()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_batch(backend):
    rng = np.random.default_rng(1)
    x = np.zeros((0, 3, 5))
    W, A, B = rng.standard_normal((4, 5)), rng.standard_normal((2, 5)), rng.standard_normal((4, 2))
    y, cache = ml.lora_forward(x, W, A, B, scaling=1.0, bias=np.ones(4), backend=backend)
    assert y.shape == (0, 3, 4)
    g = ml.lora_backward(np.zeros((0, 3, 4)), cache, need_dW=True, need_dbias=True)
    assert g.dx.shape == (0, 3, 5)
    for d in (g.dA, g.dB, g.dW, g.dbias):
        assert not d.any()


def test_scaling_alpha_over_r_and_rslora():
    assert ml.lora_scaling(16, 4) == 4.0
    assert ml.lora_scaling(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError, match="r must be a positive integer"):
        ml.lora_scaling(16, 0)
    for r in (2.0, True, "4"):  # types are TypeErrors, values ValueErrors
        with pytest.raises(TypeError, match="r must be an integer"):
            ml.lora_scaling(16, r)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ml.lora_scaling("16", 4)
    with pytest.raises(ValueError, match="alpha must be finite"):
        ml.lora_scaling(float("nan"), 4)


def _ok_inputs(dtype=np.float64):
    return lora_arrays(np.random.default_rng(2), N=3, d_in=5, d_out=4, r=2, dtype=dtype)


@pytest.mark.parametrize(("change", "error", "pattern"), [
    (dict(x=np.zeros((3, 6))), ValueError, r"x must be \(\.\.\., d_in\) with d_in = 5"),
    (dict(W=np.zeros((5, 4))), ValueError, r"W must be \(d_out, d_in\) = \(4, 5\)"),
    (dict(B=np.zeros((4, 3))), ValueError, r"B must be \(d_out, r\) with r = A.shape\[0\] = 2"),
    (dict(A=np.zeros((0, 5)), B=np.zeros((4, 0))), ValueError, "rank r"),
    (dict(A=np.zeros(5)), ValueError, "A and B must be 2-D"),
    (dict(x=np.zeros((3, 5), np.float32)), TypeError, "x is float32 but W is float64"),
    (dict(x=np.zeros((3, 5), np.int64)), TypeError, "x has dtype int64"),
    (dict(x=[[0.0] * 5] * 3), TypeError, "x must be a numpy.ndarray, got list"),
    (dict(bias=np.zeros(5)), ValueError, r"bias must be \(d_out,\) = \(4,\), got bias \(5,\)"),
    (dict(dropout_mask=np.zeros((2, 5))), ValueError, "dropout_mask must broadcast to x"),
    (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
    (dict(scaling="2"), TypeError, "scaling must be a real number"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_problem(change, error, pattern):
    kwargs = {**_ok_inputs(), "scaling": 1.0, **change}
    with pytest.raises(error, match=pattern):
        ml.lora_forward(**kwargs)


def test_backward_checks_dy_and_options():
    _, cache = ml.lora_forward(**_ok_inputs(), scaling=1.0)
    with pytest.raises(ValueError, match=r"dy must have the shape of y \(3, 4\), got dy \(3, 5\)"):
        ml.lora_backward(np.zeros((3, 5)), cache)
    with pytest.raises(TypeError, match="dy has dtype float32"):
        ml.lora_backward(np.zeros((3, 4), np.float32), cache)
    with pytest.raises(ValueError, match="no bias"):
        ml.lora_backward(np.zeros((3, 4)), cache, need_dbias=True)
    with pytest.raises(TypeError, match="cache must be the LoRACache"):
        ml.lora_backward(np.zeros((3, 4)), (1, 2))


def test_environment_variable_chooses_the_backend(monkeypatch):
    monkeypatch.setenv("MINILORA_BACKEND", "numpy")
    assert ml.lora_forward(**_ok_inputs(), scaling=1.0)[1].backend == "numpy"
    monkeypatch.setenv("MINILORA_BACKEND", "numba")
    assert ml.lora_forward(**_ok_inputs(), scaling=1.0)[1].backend == "numba"
    monkeypatch.setenv("MINILORA_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MINILORA_BACKEND must be one of"):
        ml.lora_forward(**_ok_inputs(), scaling=1.0)


@given(st.sampled_from(BACKENDS), lora_cases(dtypes=(np.float64,), dropout=False))
def test_zero_B_makes_dA_exactly_zero(backend, case):
    """At initialisation B = 0, so g = dy B = 0 and dA = s·gᵀx_d = 0 (docs/math.md)."""
    _, cache = ml.lora_forward(case.x, case.W, case.A, np.zeros_like(case.B), backend=backend,
                               **case.kwargs())
    g = ml.lora_backward(case.dy, cache)
    assert not g.dA.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["lora", "dora"])
@given(case=lora_cases(dtypes=(np.float64,), max_dim=8))
def test_need_dx_false_skips_dx_and_changes_nothing_else(backend, op, case):
    """need_dx=False returns dx None and the same bits for every other gradient."""
    kw = dict(backend=backend, **case.kwargs())
    if op == "lora":
        _, cache = ml.lora_forward(case.x, case.W, case.A, case.B, **kw)
        backward = ml.lora_backward
    else:
        m = np.abs(case.B[:, 0]) + 1.0
        _, cache = ml.dora_forward(case.x, case.W, case.A, case.B, m, **kw)
        backward = ml.dora_backward
    full = backward(case.dy, cache, need_dW=True)
    skip = backward(case.dy, cache, need_dx=False, need_dW=True)
    assert skip.dx is None and full.dx is not None
    for name, value in skip._asdict().items():
        if value is not None:
            assert np.array_equal(value, getattr(full, name)), name
