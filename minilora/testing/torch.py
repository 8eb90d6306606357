"""Judge a PyTorch LoRA implementation in-process: no files, no adapters to write.

    from minilora.testing.torch import torch_outputs, assert_torch_matches

    def my_lora(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None):
        ...                                        # any torch code, or MyFunction.apply(...)
        return y

    case = ml.oracle.make_case(d_in=64, d_out=48, r=8, dropout=0.1, bias=True, dtype="bf16")
    assert_torch_matches(my_lora, case, dtype="bf16")     # AssertionError with the report

The harness builds the case's tensors at the dtype, with x, A and B (and m for DoRA) requiring
grad (W and bias too with ``need_dW``/``need_dbias``), calls ``fn``, runs the backward with the
case's dy and returns every output and gradient as float64 NumPy arrays, which the oracle judges
(``minilora.oracle.compare``). W is handed over as (d_out, d_in) whatever the case's layout (a
Conv1D case's W is transposed for ``fn``, and its dW transposed back), the dropout mask as the
multiplier on the LoRA branch's input (0 or 1/(1 − p)). Needs ``pip install minilora[torch]``.
"""

import numpy as np
import torch

from minilora.oracle import Case, OracleInputError, compare
from minilora.precision import precision

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32,
                "fp32": torch.float32, "fp64": torch.float64}


def _oracle_case(case):
    return case if isinstance(case, Case) else case.to_oracle()


def torch_outputs(fn, case, dtype=None, *, need_dW=False, need_dbias=False):
    """Run ``fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None) -> y`` on a case.

    Parameters
    ----------
    fn : a torch callable (a function, a module's forward, ``autograd.Function.apply`` wrapped)
    case : a ``minilora.oracle.Case`` or a ``minilora.testing.LoRACase``
    dtype : "bf16", "fp16", "fp32", "fp64" (or an alias); default the case's precision
    need_dW, need_dbias : also make W (and bias) require grad and return dW (dbias)

    Returns
    -------
    dict of float64 arrays: "y", "dx", "dA", "dB", and "dm" for DoRA, "dW", "dbias" when asked
    for; a gradient torch left as None (fn did not use that input) is returned as zeros.
    """
    case = _oracle_case(case)
    prec = precision(case.input_precision if dtype is None else dtype)
    tdt = TORCH_DTYPES[prec.name]
    t = case.tensors

    def tensor(name, grad=False):
        if name not in t:
            return None
        a = t[name].T if name == "W" and case.fan_in_fan_out else t[name]
        out = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(tdt)
        return out.requires_grad_(grad)

    x, A, B = tensor("x", True), tensor("A", True), tensor("B", True)
    W, bias = tensor("W", need_dW), tensor("bias", need_dbias and "bias" in t)
    m = tensor("m", True)
    mask = tensor("dropout_mask")
    kwargs = dict(scaling=case.scaling, bias=bias, dropout_mask=mask)
    if m is not None:
        kwargs["m"] = m
    y = fn(x, W, A, B, **kwargs)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != t["dy"].shape:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise OracleInputError(f"fn returned {shape}; the case's y is {t['dy'].shape}")
    y.backward(tensor("dy").to(y.dtype))
    wanted = {"dx": x, "dA": A, "dB": B, "dm": m}
    if need_dW:
        wanted["dW"] = W
    if need_dbias and bias is not None:
        wanted["dbias"] = bias
    out = {"y": y.detach()}
    for name, leaf in wanted.items():
        if leaf is not None:
            out[name] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    arrays = {k: v.detach().to(torch.float64).numpy() for k, v in out.items()}
    if "dW" in arrays and case.fan_in_fan_out:
        arrays["dW"] = np.ascontiguousarray(arrays["dW"].T)  # back to the case's layout
    return arrays


def assert_torch_matches(fn, case, dtype=None, *, accum_dtype=None, need_dW=False,
                         need_dbias=False):
    """``torch_outputs`` judged by the oracle at ``dtype``: returns the report when every output
    is within tolerance, raises AssertionError carrying the report's table otherwise."""
    case = _oracle_case(case)
    outputs = torch_outputs(fn, case, dtype, need_dW=need_dW, need_dbias=need_dbias)
    report = compare(case, outputs, dtype=dtype, accum_dtype=accum_dtype)
    if not report.passed:
        raise AssertionError("the torch implementation does not match the float64 reference:\n"
                             + str(report))
    return report
