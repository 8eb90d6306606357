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

import torch

from minilora.oracle import OracleInputError, compare
from minilora.testing._harness import (
    check_returned,
    fn_inputs,
    named_outputs,
    oracle_case,
    precision_name,
)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32,
                "fp32": torch.float32, "fp64": torch.float64}


def resolve_device(device, owner=None):
    """The torch device to build tensors on: ``device``, else the device of ``owner``'s first
    parameter (a module, or the module a bound method belongs to), else "cpu". Refuses a
    device torch does not have here and one whose tensors cannot be read back ("meta")."""
    if device is None:
        module = owner if isinstance(owner, torch.nn.Module) else getattr(owner, "__self__", None)
        params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
        device = params[0].device if params else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device: {e}") from None
    if dev.type == "meta":
        raise ValueError("device='meta' holds no values: the outputs could not be read back "
                         "to be judged; choose a device with storage ('cpu', 'cuda')")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(dev)!r}: torch sees no CUDA device on this machine "
                         f"(torch.cuda.is_available() is False; torch {torch.__version__})")
    try:
        probe = torch.ones(1, device=dev)
        probe.cpu().numpy()
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        raise ValueError(f"device={str(dev)!r} cannot be used here: tensors cannot be made "
                         f"there and read back ({type(e).__name__}: {e})") from None
    return dev


def _numpy(t):
    """A tensor (on any device) as float64 NumPy on the host."""
    return t.detach().to("cpu", torch.float64).numpy()


def torch_outputs(fn, case, dtype=None, *, need_dW=False, need_dbias=False, device=None):
    """Run ``fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None) -> y`` on a case.

    Parameters
    ----------
    fn : a torch callable (a function, a module's forward, ``autograd.Function.apply`` wrapped)
    case : a ``minilora.oracle.Case`` or a ``minilora.testing.LoRACase``
    dtype : "bf16", "fp16", "fp32", "fp64" (or an alias); default the case's precision
    need_dW, need_dbias : also make W (and bias) require grad and return dW (dbias)
    device : where the tensors are built and fn runs ("cpu", "cuda", "cuda:1", a
        ``torch.device``); default the device of fn's module when fn is one (or a bound method
        of one), else "cpu". "meta" and a device torch does not have raise ValueError.

    Returns
    -------
    dict of float64 host arrays: "y", "dx", "dA", "dB", and "dm" for DoRA, "dW", "dbias" when
    asked for (block cases: the names of ``minilora.oracle.block_cases``); a gradient torch
    left as None (fn did not use that input) is returned as zeros.
    """
    case = oracle_case(case)
    tdt = TORCH_DTYPES[precision_name(case, dtype)]
    dev = resolve_device(device, fn)
    given = fn_inputs(case)

    def tensor(a, grad=False):
        if a is None:
            return None
        if isinstance(a, list):
            return [tensor(v, grad) for v in a]
        if a.dtype.kind != "f":
            return torch.from_numpy(a).to(dev)
        return torch.from_numpy(a).to(dev, tdt).requires_grad_(grad)

    x, A, B = tensor(given["x"], True), tensor(given["A"], True), tensor(given["B"], True)
    W, bias = tensor(given["W"], need_dW), tensor(given["bias"], need_dbias)
    kwargs = dict(given["kwargs"], bias=bias, dropout_mask=tensor(given["dropout_mask"]))
    m = tensor(given.get("m"), True)
    if m is not None:
        kwargs["m"] = m
    if case.block == "multi":
        y = fn(x, W, A, B, tensor(given["adapter_index"]), **kwargs)
    else:
        y = fn(x, W, A, B, **kwargs)
    ys = list(y) if case.block == "qkv" and isinstance(y, (tuple, list)) else [y]
    if not all(isinstance(v, torch.Tensor) for v in ys):
        raise OracleInputError(f"fn returned {type(y).__name__}, not torch tensors")
    check_returned(ys, given["dys"])
    torch.autograd.backward(ys, [tensor(d).to(v.dtype) for v, d in zip(ys, given["dys"],
                                                                       strict=True)])

    def grad(leaf):
        if leaf is None:
            return None
        if isinstance(leaf, list):
            return [grad(v) for v in leaf]
        return _numpy(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))

    grads = {"x": grad(x), "A": grad(A), "B": grad(B), "m": grad(m),
             "W": grad(W) if need_dW else None, "bias": grad(bias) if need_dbias else None}
    return named_outputs(case, [_numpy(v) for v in ys], grads)


def assert_torch_matches(fn, case, dtype=None, *, accum_dtype=None, need_dW=False,
                         need_dbias=False, device=None):
    """``torch_outputs`` judged by the oracle at ``dtype``: returns the report when every output
    is within tolerance, raises AssertionError carrying the report's table otherwise."""
    case = oracle_case(case)
    outputs = torch_outputs(fn, case, dtype, need_dW=need_dW, need_dbias=need_dbias,
                            device=device)
    report = compare(case, outputs, dtype=dtype, accum_dtype=accum_dtype)
    if not report.passed:
        raise AssertionError("the torch implementation does not match the float64 reference:\n"
                             + str(report))
    return report
