"""Testing your own LoRA implementation against minilora: for your test suite.

    from hypothesis import given
    from minilora.testing import lora_cases, assert_matches_reference

    @given(lora_cases())
    def test_my_kernel(case):
        assert_matches_reference(my_lora(case), case)      # every output, derived tolerances

* ``LoRACase`` and ``assert_matches_reference``: here (NumPy only);
* ``lora_shapes``, ``lora_cases``, ``dora_cases``, ``block_cases``, ``nf4_cases`` (QLoRA
  bases): Hypothesis strategies
  (``minilora.testing.strategies``, needs ``pip install minilora[test]``);
* ``minilora.testing.torch``: ``torch_outputs`` and ``assert_torch_matches`` run a PyTorch
  implementation on a case in-process, on any device (``device=``), and ``check_model`` judges
  every LoRA'd module of a PEFT model as it runs (needs ``pip install minilora[torch]``);
* ``minilora.testing.jax``: ``jax_outputs`` and ``assert_jax_matches``, the same for a JAX
  implementation (needs ``pip install minilora[jax]``; this module never imports jax).
"""

from dataclasses import dataclass

import numpy as np

from minilora.oracle import Case, compare

STRATEGIES = ("lora_shapes", "lora_cases", "dora_cases", "block_cases", "nf4_cases", "VALUES")


def __getattr__(name):
    """The strategies, imported on first use so that this module needs no Hypothesis."""
    if name in STRATEGIES:
        from minilora.testing import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'minilora.testing' has no attribute {name!r}")


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
    oracle_case = case if isinstance(case, Case) else case.to_oracle()
    report = compare(oracle_case, candidate_outputs, dtype=dtype, accum_dtype=accum_dtype,
                     outputs=outputs)
    if not report.passed:
        raise AssertionError("candidate does not match the float64 reference:\n" + str(report))
    return report
