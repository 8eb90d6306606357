"""Hypothesis strategies for LoRA and DoRA test cases, for minilora's tests and for yours.

    from hypothesis import given
    from minilora.testing import lora_cases

    @given(lora_cases())
    def test_my_kernel(case):
        y = my_lora(case.x, case.W, case.A, case.B, case.scaling)   # compare with minilora

Needs the ``hypothesis`` package (``pip install minilora[test]``).
"""

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st


@dataclass
class LoRACase:
    """One drawn LoRA problem: inputs, options and an upstream gradient dy."""

    x: np.ndarray  # (..., d_in)
    W: np.ndarray  # (d_out, d_in), or (d_in, d_out) when fan_in_fan_out
    A: np.ndarray  # (r, d_in)
    B: np.ndarray  # (d_out, r), never all zero (with B = 0 a wrong dA would hide)
    scaling: float
    bias: np.ndarray | None  # (d_out,)
    dropout_mask: np.ndarray | None  # broadcastable to x
    fan_in_fan_out: bool
    dy: np.ndarray  # (..., d_out)

    m: np.ndarray | None = None  # (d_out,), DoRA's magnitude (dora_cases only)
    detach_norm: bool = True  # DoRA: PEFT's default

    def kwargs(self):
        """Keyword arguments of ``lora_forward``/``dora_forward`` besides the arrays."""
        return dict(scaling=self.scaling, bias=self.bias, dropout_mask=self.dropout_mask,
                    fan_in_fan_out=self.fan_in_fan_out)

    def to_oracle(self):
        """This case as a ``minilora.oracle.Case``."""
        from minilora.oracle import Case

        names = ("x", "W", "A", "B", "dy", "bias", "dropout_mask", "m")
        tensors = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        dtype = "fp64" if self.x.dtype == np.float64 else "fp32"
        return Case(tensors, self.scaling, self.fan_in_fan_out, self.detach_norm, dtype)


def assert_matches_reference(candidate_outputs, case, *, dtype=None, accum_dtype=None,
                             outputs=None):
    """Fail with the oracle's report unless ``candidate_outputs`` match the float64 reference.

    candidate_outputs : dict of "y", "dx", "dA", "dB" (and "dm" for DoRA), optionally "dbias",
        "dW": every output the case defines, unless ``outputs`` names the subset to judge
    case : a LoRACase (from ``lora_cases``/``dora_cases``) or a ``minilora.oracle.Case``
    dtype, accum_dtype : the precision the candidate computes and accumulates in (default: the
        case's precision, fp32 for a float32 case, fp64 for a float64 one)
    Returns the report when it passes. Unknown names, wrong shapes and missing outputs raise
    ``minilora.oracle.OracleInputError`` (a ValueError), never a pass.
    """
    from minilora.oracle import Case, compare

    oracle_case = case if isinstance(case, Case) else case.to_oracle()
    report = compare(oracle_case, candidate_outputs, dtype=dtype, accum_dtype=accum_dtype,
                     outputs=outputs)
    if not report.passed:
        raise AssertionError("candidate does not match the float64 reference:\n" + str(report))
    return report


@st.composite
def lora_shapes(draw, max_dim=12, max_lead_dims=3, max_lead=3):
    """(lead, d_in, d_out, r): leading dims (0 to ``max_lead_dims`` of them, sizes from 0),
    and r from 1 to above min(d_in, d_out)."""
    lead = tuple(draw(st.lists(st.integers(0, max_lead), max_size=max_lead_dims)))
    d_in = draw(st.integers(1, max_dim))
    d_out = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, min(d_in, d_out) + 2))
    return lead, d_in, d_out, r


@st.composite
def lora_cases(draw, dtypes=(np.float64, np.float32), max_dim=12, dropout=None, bias=None,
               fan_in_fan_out=None):
    """A LoRACase: shapes from ``lora_shapes``, options drawn unless fixed by the arguments.

    The dropout mask is drawn at one of three shapes: x's own, a per-feature (d_in,) row, or one
    value per token (..., 1); its values are 0 or 1/(1−p). Values are standard normal from a
    drawn seed, so a failing example reproduces from its printed seed.
    """
    lead, d_in, d_out, r = draw(lora_shapes(max_dim=max_dim))
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    use_bias = draw(st.booleans()) if bias is None else bias
    fifo = draw(st.booleans()) if fan_in_fan_out is None else fan_in_fan_out
    mask_kind = draw(st.sampled_from(["none", "full", "feature", "token"])) if dropout is None \
        else ("full" if dropout else "none")
    alpha = draw(st.sampled_from([1.0, 8.0, 16.0, -2.0]))
    scaling = alpha / (np.sqrt(r) if draw(st.booleans()) else r)  # rsLoRA or alpha/r
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    B = normal(d_out, r)
    B.flat[0] = 1.0 + abs(B.flat[0])  # never all zero
    mask = None
    if mask_kind != "none":
        p = draw(st.sampled_from([0.1, 0.5]))
        shape = {"full": lead + (d_in,), "feature": (d_in,), "token": lead + (1,)}[mask_kind]
        mask = ((rng.random(shape) >= p) / (1 - p)).astype(dtype)
    return LoRACase(
        x=normal(*lead, d_in),
        W=normal(d_in, d_out) if fifo else normal(d_out, d_in),
        A=normal(r, d_in),
        B=B,
        scaling=float(scaling),
        bias=normal(d_out) if use_bias else None,
        dropout_mask=mask,
        fan_in_fan_out=fifo,
        dy=normal(*lead, d_out),
    )


@st.composite
def dora_cases(draw, **kwargs):
    """A LoRACase with a DoRA magnitude m: the row norms of W + s·B A times factors in [0.5, 2]
    (as after some training), so c = m/n is not 1. Takes ``lora_cases``' arguments."""
    from minilora.dora import row_norms

    case = draw(lora_cases(**kwargs))
    n = row_norms(case.W, case.A, case.B, case.scaling, case.fan_in_fan_out)[0]
    factors = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(0.5, 2.0, n.shape)
    case.m = (n * factors).astype(case.x.dtype)
    return case
