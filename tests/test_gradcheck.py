"""minilora.ops.gradcheck must pass correct gradients and catch every kind of wrong one."""

import functools

import numpy as np
import pytest
from _helpers import lora_arrays

import minilora as ml


def _lora_problem(seed=0, N=4, d_in=5, d_out=3, r=2):
    inputs = lora_arrays(np.random.default_rng(seed), N, d_in, d_out, r)

    def forward(x, W, A, B):
        return ml.lora_forward(x, W, A, B, scaling=0.5, backend="numpy")

    return forward, functools.partial(ml.lora_backward, need_dW=True), inputs


@pytest.mark.parametrize("max_jacobian", [10**6, 0])  # full Jacobian, then directions
def test_correct_gradients_pass_with_tiny_errors(max_jacobian):
    forward, backward, inputs = _lora_problem()
    report = ml.gradcheck(forward, backward, inputs, max_jacobian=max_jacobian)
    assert report.passed and report.worst_rel_err < 1e-8
    assert {c.mode for c in report.inputs} == {"jacobian" if max_jacobian else "directions"}


@pytest.mark.parametrize("max_jacobian", [10**6, 0])
@pytest.mark.parametrize("factor", [1.0 + 1e-4, -1.0, 0.0])
def test_wrong_values_are_caught_and_named(max_jacobian, factor):
    forward, backward, inputs = _lora_problem()

    def wrong(dy, cache):
        g = backward(dy, cache)
        return g._replace(dA=g.dA * factor)

    pattern = r"A\(2, 5\).*worst at index.*numerical.*analytical"
    with pytest.raises(ml.GradcheckError, match=pattern):
        ml.gradcheck(forward, wrong, inputs, max_jacobian=max_jacobian)


def test_a_single_wrong_entry_is_found_at_its_index():
    forward, backward, inputs = _lora_problem(N=30, d_in=40, d_out=30, r=3)

    def wrong(dy, cache):
        g = backward(dy, cache)
        dW = g.dW.copy()
        dW[7, 11] *= 1.5
        return g._replace(dW=dW)

    report = ml.gradcheck(forward, wrong, inputs, max_jacobian=0, raise_on_failure=False)
    (check,) = [c for c in report.inputs if c.name == "W"]
    assert not check.passed and check.worst_index == (7, 11)
    assert [c.name for c in report.inputs if not c.passed] == ["W"]


def test_structural_problems_are_reported():
    forward, backward, inputs = _lora_problem()
    calls = []

    def flaky(dy, cache):  # differs between calls, keeps a constant offset, wrong dtype for B
        calls.append(1)
        g = backward(dy, cache)
        return g._replace(dA=g.dA + len(calls), dB=g.dB.astype(np.float32))

    report = ml.gradcheck(forward, flaky, inputs, raise_on_failure=False)
    text = "\n".join(report.problems)
    assert "different bits for 'A'" in text
    assert "zero cotangent gave a non-zero gradient for 'A'" in text
    assert "gradient of 'B' is float32(3, 2), its input float64(3, 2)" in text

    def mutating(x, W, A, B):
        x *= 1.0
        A[0, 0] += 1.0
        return forward(x, W, A, B)

    report = ml.gradcheck(mutating, backward, inputs, raise_on_failure=False)
    assert any("modified the input 'A'" in p for p in report.problems)


def test_complex_step_reaches_near_machine_precision():
    """Complex steps have no cancellation: errors of a few ulps, not ~1e-10. The public pair
    takes complex128 on the NumPy reference."""
    rng = np.random.default_rng(2)
    inputs = dict(x=rng.standard_normal((3, 4)), A=rng.standard_normal((2, 4)),
                  B=rng.standard_normal((5, 2)))
    W = rng.standard_normal((5, 4))

    def forward(x, A, B):
        return ml.lora_forward(x, W, A, B, scaling=0.5, backend="numpy")

    report = ml.gradcheck(forward, ml.lora_backward, inputs, method="complex", rtol=1e-13)
    assert report.worst_rel_err < 1e-14
    with pytest.raises(TypeError, match="complex128 runs on the numpy backend"):
        ml.lora_forward(inputs["x"] + 0j, W, inputs["A"], inputs["B"], scaling=0.5,
                        backend="numba")


def test_bad_arguments():
    forward, backward, inputs = _lora_problem()
    with pytest.raises(ValueError, match="method must be"):
        ml.gradcheck(forward, backward, inputs, method="forward")
    with pytest.raises(ValueError, match="wrt names 'z'"):
        ml.gradcheck(forward, backward, inputs, wrt=["z"])
