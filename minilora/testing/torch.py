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
    if case.block is not None:
        return _block_outputs(fn, case, tdt, need_dW, need_dbias)
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


def _block_outputs(fn, case, tdt, need_dW, need_dbias):
    """``torch_outputs`` for a block case: fn takes lists (one tensor per projection or
    adapter) and returns a tuple of P outputs (qkv) or one (mlp, multi):

        qkv    fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None) -> (y_0, ..., y_P-1)
        mlp    fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, activation) -> y
        multi  fn(x, W, A, B, adapter_index, *, scaling, bias=None, dropout_mask=None) -> y

    with scaling a list, bias and dropout_mask None or lists (entries may be None; multi: one
    tensor each), adapter_index an int64 tensor."""
    from minilora.oracle.block_cases import indexed

    t = case.tensors

    def tensor(a, grad=False):
        if a is None:
            return None
        if a.dtype.kind != "f":
            return torch.from_numpy(np.ascontiguousarray(a))
        out = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(tdt)
        return out.requires_grad_(grad)

    def listed(name, grad=False, optional=False):
        n = len(indexed(t, "A"))
        values = [tensor(t.get(f"{name}.{j}"), grad) for j in range(n)]
        return None if optional and all(v is None for v in values) else values

    x = tensor(t["x"], True)
    A, B = listed("A", True), listed("B", True)
    kwargs = dict(scaling=list(case.scaling))
    if case.block == "multi":
        W, bias = tensor(t["W"].T if case.fan_in_fan_out else t["W"], need_dW), \
            tensor(t.get("bias"), need_dbias)
        kwargs |= dict(bias=bias, dropout_mask=tensor(t.get("dropout_mask")))
        y = fn(x, W, A, B, tensor(t["adapter_index"]), **kwargs)
        ys, dys, Ws, biases = [y], [t["dy"]], [W], [bias]
    else:
        Ws, given = listed("W", need_dW), listed("bias", need_dbias, optional=True)
        biases = given or [None] * len(Ws)
        kwargs |= dict(bias=given, dropout_mask=listed("dropout_mask", optional=True))
        if case.block == "mlp":
            kwargs["activation"] = case.activation
        y = fn(x, Ws, A, B, **kwargs)
        ys = list(y) if case.block == "qkv" else [y]
        dys = indexed(t, "dy") if case.block == "qkv" else [t["dy"]]
    if len(ys) != len(dys) or any(not isinstance(v, torch.Tensor) or tuple(v.shape) != d.shape
                                  for v, d in zip(ys, dys, strict=False)):
        raise OracleInputError(f"fn returned {[getattr(v, 'shape', type(v).__name__) for v in ys]}"
                               f"; the case's outputs are {[d.shape for d in dys]}")
    torch.autograd.backward(ys, [tensor(d).to(v.dtype) for v, d in zip(ys, dys, strict=True)])

    def grad(leaf):
        return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)

    out = {"dx": grad(x)}
    if case.block == "qkv":
        out |= {f"y.{j}": v.detach() for j, v in enumerate(ys)}
    else:
        out["y"] = ys[0].detach()
    out |= {f"dA.{j}": grad(a) for j, a in enumerate(A)}
    out |= {f"dB.{j}": grad(b) for j, b in enumerate(B)}
    suffix = (lambda j: "") if case.block == "multi" else (lambda j: f".{j}")
    if need_dW:
        out |= {f"dW{suffix(j)}": grad(w) for j, w in enumerate(Ws)}
    if need_dbias:
        out |= {f"dbias{suffix(j)}": grad(b) for j, b in enumerate(biases) if b is not None}
    arrays = {k: v.detach().to(torch.float64).numpy() for k, v in out.items()}
    if "dW" in arrays and case.fan_in_fan_out:
        arrays["dW"] = np.ascontiguousarray(arrays["dW"].T)
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
