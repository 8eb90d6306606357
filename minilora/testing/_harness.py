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
from minilora.oracle.block_cases import indexed
from minilora.precision import precision

DTYPE_NAMES = ("bf16", "fp16", "tf32", "fp32", "fp64")  # the keys of each framework's dtype map


def oracle_case(case):
    """A ``minilora.oracle.Case`` (a ``minilora.testing.LoRACase`` converted)."""
    return case if isinstance(case, Case) else case.to_oracle()


def precision_name(case, dtype):
    """The precision ``fn`` runs in: ``dtype`` or the case's, as one of ``DTYPE_NAMES``."""
    return precision(case.input_precision if dtype is None else dtype).name


def _float64(a):
    return None if a is None else np.ascontiguousarray(a, dtype=np.float64)


def fn_inputs(case):
    """The case's inputs as ``fn`` takes them, float64 (integers kept: adapter_index).

    Returns
    -------
    dict with "x" (..., d_in), "W", "A", "B", "bias", "dropout_mask", "m" (single layer; None
    where absent), "adapter_index" (multi), "dys": the upstream gradients, one per output
    (a list of P for qkv, of one otherwise), and "kwargs": scaling (and activation for mlp).
    W is (d_out, d_in) whatever the case's layout.
    """
    t = case.tensors
    if case.block is None:
        W = t["W"].T if case.fan_in_fan_out else t["W"]  # (d_out, d_in)
        return {"x": _float64(t["x"]), "W": _float64(W), "A": _float64(t["A"]),
                "B": _float64(t["B"]), "bias": _float64(t.get("bias")),
                "dropout_mask": _float64(t.get("dropout_mask")), "m": _float64(t.get("m")),
                "dys": [_float64(t["dy"])], "kwargs": {"scaling": case.scaling}}
    P = len(indexed(t, "A"))

    def listed(name, optional=False):
        values = [_float64(t.get(f"{name}.{j}")) for j in range(P)]
        return None if optional and all(v is None for v in values) else values

    out = {"x": _float64(t["x"]), "A": listed("A"), "B": listed("B"),
           "kwargs": {"scaling": list(case.scaling)}}
    if case.block == "multi":
        W = t["W"].T if case.fan_in_fan_out else t["W"]  # (d_out, d_in)
        out |= {"W": _float64(W), "bias": _float64(t.get("bias")),
                "dropout_mask": _float64(t.get("dropout_mask")),
                "adapter_index": np.ascontiguousarray(t["adapter_index"]),
                "dys": [_float64(t["dy"])]}
    else:
        out |= {"W": listed("W"), "bias": listed("bias", optional=True),
                "dropout_mask": listed("dropout_mask", optional=True),
                "dys": [_float64(d) for d in indexed(t, "dy")] if case.block == "qkv"
                else [_float64(t["dy"])]}
        if case.block == "mlp":
            out["kwargs"]["activation"] = case.activation
    return out


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
    out = {"dx": grads["x"]}
    if case.block is None:
        out |= {"y": ys[0], "dA": grads["A"], "dB": grads["B"]}
        for name in ("m", "W", "bias"):
            if grads.get(name) is not None:
                out["d" + name] = grads[name]
    else:
        out |= {f"y.{j}": v for j, v in enumerate(ys)} if case.block == "qkv" else {"y": ys[0]}
        out |= {f"dA.{j}": a for j, a in enumerate(grads["A"])}
        out |= {f"dB.{j}": b for j, b in enumerate(grads["B"])}
        for name in ("W", "bias"):
            value = grads.get(name)
            if value is None:
                continue
            if case.block == "multi":
                out["d" + name] = value
            else:
                out |= {f"d{name}.{j}": v for j, v in enumerate(value) if v is not None}
    out = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}
    if "dW" in out and case.fan_in_fan_out:
        out["dW"] = np.ascontiguousarray(out["dW"].T)  # back to the case's (d_in, d_out)
    return out
