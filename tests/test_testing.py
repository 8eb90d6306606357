"""minilora.testing used the way another project would: three lines to property-test a kernel."""

import numpy as np
import pytest
from hypothesis import assume, given

from minilora.testing import assert_matches_reference, dora_cases, lora_cases


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


@given(dora_cases(dtypes=(np.float64,), max_dim=6))
def test_dora_cases_reference_is_self_consistent(case):
    from minilora.oracle import reference

    assert_matches_reference(reference(case.to_oracle()), case, dtype="fp64")
