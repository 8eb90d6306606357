"""minilora.testing used the way another project would: three lines to property-test a kernel."""

import numpy as np
import pytest
from hypothesis import assume, given

from minilora.testing import assert_matches_reference, block_cases, dora_cases, lora_cases
from minilora.testing.strategies import nf4_cases


def my_lora(x, W, A, B, scaling, dy):
    """Someone's own LoRA implementation (here a plain numpy one, in float32)."""
    x, W, A, B, dy = (a.astype(np.float32) for a in (x, W, A, B, dy))
    h = x @ A.T
    y = x @ W.T + scaling * h @ B.T
    g = dy @ B
    return {"y": y, "dx": dy @ W + scaling * g @ A, "dA": scaling * g.T @ x,
            "dB": scaling * dy.T @ h}


def my_outputs(case):
    outputs = my_lora(case.x.reshape(-1, case.x.shape[-1]), case.W, case.A, case.B,
                      case.scaling, case.dy.reshape(-1, case.dy.shape[-1]))
    return {"y": outputs["y"].reshape(case.dy.shape), "dx": outputs["dx"].reshape(
        case.x.shape), "dA": outputs["dA"], "dB": outputs["dB"]}


@given(lora_cases(dropout=False, bias=False, fan_in_fan_out=False))
def test_my_kernel_matches_minilora(case):
    assert_matches_reference(my_outputs(case), case, dtype="fp32")


@given(lora_cases(dropout=False, bias=False, fan_in_fan_out=False, max_dim=8))
def test_a_bug_is_reported(case):
    outputs = my_outputs(case)
    assume(np.any(outputs["dA"]))  # a zero-size batch has dA = 0, and so does 2·dA
    with pytest.raises(AssertionError, match="dA"):
        assert_matches_reference({**outputs, "dA": 2 * outputs["dA"]}, case, dtype="fp32")
    with pytest.raises(AssertionError, match="dA"):
        assert_matches_reference({"dA": 2 * outputs["dA"]}, case, outputs=["dA"])


def peft_dora_forward(case, x, W, A, B, m, n_fixed=None):
    """DoRA as PEFT writes it, forming V = W + s·B A: an implementation independent of
    minilora's (which never forms V). n_fixed holds the norms constant (detach_norm=True)."""
    V = W + case.scaling * B @ A  # (d_out, d_in)
    n = np.linalg.norm(V, axis=1) if n_fixed is None else n_fixed
    return (m / n) * (x @ V.T)  # (N, d_out)


def finite_difference_outputs(case):
    """y, dx, dA, dB, dm of ``peft_dora_forward`` by central differences of Σ dy ⊙ y."""
    x = case.x.reshape(-1, case.x.shape[-1])
    dy = case.dy.reshape(-1, case.dy.shape[-1])
    inputs = {"x": x, "W": case.W, "A": case.A, "B": case.B, "m": case.m}
    n_fixed = np.linalg.norm(case.W + case.scaling * case.B @ case.A, axis=1) \
        if case.detach_norm else None
    out = {"y": peft_dora_forward(case, **inputs, n_fixed=n_fixed).reshape(case.dy.shape)}
    for name in ("x", "A", "B", "m"):
        grad = np.zeros_like(inputs[name])
        for i in np.ndindex(grad.shape):
            h = 1e-6 * max(1.0, abs(inputs[name][i]))
            plus, minus = dict(inputs), dict(inputs)
            plus[name], minus[name] = inputs[name].copy(), inputs[name].copy()
            plus[name][i] += h
            minus[name][i] -= h
            grad[i] = np.sum(dy * (peft_dora_forward(case, **plus, n_fixed=n_fixed)
                                   - peft_dora_forward(case, **minus, n_fixed=n_fixed))) / (2 * h)
        out["d" + name] = grad
    out["dx"] = out["dx"].reshape(case.x.shape)
    return out


@given(dora_cases(dtypes=(np.float64,), max_dim=4, dropout=False, bias=False,
                  fan_in_fan_out=False, values=("normal",)))
def test_the_dora_reference_matches_an_independent_implementation(case):
    """minilora's float64 DoRA reference against PEFT's formulation differentiated numerically,
    judged as an fp32 candidate (finite differences are good to about 1e-9 here), for both
    settings of detach_norm drawn by dora_cases; and a planted bug is caught."""
    assume(case.x.size > 0)
    candidate = finite_difference_outputs(case)
    assert_matches_reference(candidate, case, dtype="fp32")
    with pytest.raises(AssertionError, match="dm"):
        assert_matches_reference({**candidate, "dm": 1.01 * candidate["dm"]}, case, dtype="fp32")


@given(case=block_cases())
def test_block_cases_are_judged_like_any_case(case):
    """An honest float32 run of a drawn block passes; the reference with dx halved does not."""
    from minilora.oracle.cases import emulate

    honest = emulate(case, "fp32")
    assert_matches_reference(honest, case)
    if np.any(honest["dx"]):
        with pytest.raises(AssertionError):
            assert_matches_reference({**honest, "dx": honest["dx"] * 0.5}, case)


@given(case=nf4_cases())
def test_nf4_cases_are_qlora_cases_an_honest_kernel_passes(case):
    """A drawn NF4 case keeps its codes and scales, W is their exact dequantization, the
    reference is finite, and a kernel holding W as kernels do (fl32(c[q]·a) in the precision)
    passes at the case's precision; with its absmax 10% too large it fails (in a LoRA case:
    DoRA rescales each row of W + s·B A to its magnitude m, which can hide a scaled W)."""
    from minilora.oracle import nf4, reference
    from minilora.oracle.cases import emulate

    q, dtype = case.base, case.input_precision
    assert isinstance(q, nf4.NF4Weight) and case.layer["base"] == "nf4"
    assert (q.blocksize, q.double_quant) == (case.layer["blocksize"], case.layer["double_quant"])
    assert np.array_equal(case.tensors["W"], nf4.dequantize_nf4(q))
    assert all(np.all(np.isfinite(v)) for v in reference(case).values())
    honest = nf4.honest_case(case, dtype)
    assert_matches_reference(emulate(honest, dtype), case)
    if not case.dora and case.tensors["x"].size and np.any(case.tensors["W"]):
        off = honest.with_tensors({**honest.tensors, "W": honest.tensors["W"] * 1.1})
        with pytest.raises(AssertionError, match="FAIL"):
            assert_matches_reference(emulate(off, dtype), case)
