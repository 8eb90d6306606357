"""The framework-agnostic half of the in-process harnesses (``minilora.testing.torch`` and
``minilora.testing.jax``): a case's inputs as ``fn`` receives them, and ``fn``'s outputs and
gradients named as the oracle's candidate.

    inputs = fn_inputs(case)            # float64 NumPy, W as (d_out, d_in), lists for blocks
    ...                                 # the framework builds tensors, calls fn, differentiates
    candidate = named_outputs(case, ys, grads)   # {"y", "dx", "dA", ...} float64 NumPy

Both harnesses pass ``fn`` the same arguments:

    single  fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None[, m]) -> y
    qkv     fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None) -> (y_0, ..., y_P-1)
    mlp     fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, activation) -> y
    multi   fn(x, W, A, B, adapter_index, *, scaling, bias=None, dropout_mask=None) -> y

with W, A, B (and bias, dropout_mask: None or lists whose entries may be None) lists of one
array per projection or adapter for the blocks (multi: one W, bias and mask), scaling a list.
"""

import numpy as np

from minilora.oracle import Case, OracleInputError
from minilora.precision import precision

DTYPE_NAMES = ("bf16", "fp16", "tf32", "fp32", "fp64")  # the keys of each framework's dtype map


def oracle_case(case):
    """A ``minilora.oracle.Case`` (a ``minilora.testing.LoRACase`` converted)."""
    return case if isinstance(case, Case) else case.to_oracle()


def precision_name(case, dtype):
    """The precision ``fn`` runs in: ``dtype`` or the case's, as one of ``DTYPE_NAMES``."""
    return precision(case.input_precision if dtype is None else dtype).name


def fn_inputs(case):
    """The case's inputs as ``fn`` takes them, float64 (integers kept: adapter_index).

    Returns
    -------
    dict with "x" (..., d_in), "W", "A", "B", "bias", "dropout_mask", "m" (single layer; None
    where absent), "adapter_index" (multi), "dys": the upstream gradients, one per output
    (a list of P for qkv, of one otherwise), and "kwargs": scaling (and activation for mlp).
    W is (d_out, d_in) whatever the case's layout.
    """
    return case.kind.fn_inputs(case)


def check_returned(ys, dys):
    """``fn``'s outputs (a list of arrays with ``.shape``) against the case's upstream shapes."""
    shapes = [tuple(getattr(v, "shape", ())) if hasattr(v, "shape") else type(v).__name__
              for v in ys]
    if len(ys) != len(dys) or any(s != d.shape for s, d in zip(shapes, dys, strict=False)):
        raise OracleInputError(f"fn returned {shapes if len(shapes) > 1 else shapes[0]}; "
                               f"the case's outputs are {[d.shape for d in dys]}")


def named_outputs(case, ys, grads):
    """The candidate dict the oracle judges, from float64 arrays.

    Parameters
    ----------
    ys : list of fn's outputs (P for qkv, one otherwise)
    grads : dict with "x", "A", "B" (arrays, or lists for a block), and optionally "m", "W",
        "bias" (None entries are left out)

    Returns
    -------
    dict: "y" (or "y.j"), "dx", "dA", "dB" (or "dA.j", "dB.j"), "dm", "dW", "dbias" (".j"
    for qkv and mlp); dW in the case's layout (transposed back for a Conv1D case).
    """
    out = case.kind.named_outputs(case, ys, grads)
    out = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}
    if "dW" in out and case.fan_in_fan_out:
        out["dW"] = np.ascontiguousarray(out["dW"].T)  # back to the case's (d_in, d_out)
    return out
