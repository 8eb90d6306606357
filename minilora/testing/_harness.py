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
from minilora.oracle.precision import precision

DTYPE_NAMES = ("bf16", "fp16", "tf32", "fp32", "fp64")  # the keys of each framework's dtype map


def dtype_map(bf16, fp16, fp32, fp64):
    """A framework's dtype for each of ``DTYPE_NAMES``: tf32 runs on fp32 tensors (TF32 is how
    the matrix products round, not a storage type)."""
    return {"bf16": bf16, "fp16": fp16, "tf32": fp32, "fp32": fp32, "fp64": fp64}


def lora_fn(row_norms, constant, detach_norm=True):
    """A correct ``fn`` for either harness: LoRA, and DoRA as PEFT computes it, in any
    framework's array operations (``@``, ``*``, ``+``, ``.T``).

    Parameters
    ----------
    row_norms : V -> ‖V_j‖ per row, (d_out, d_in) -> (d_out,) (torch: ``torch.linalg.norm(V,
        dim=1)``; jax: ``jnp.linalg.norm(V, axis=1)``)
    constant : n -> n without a gradient (``torch.Tensor.detach``, ``jax.lax.stop_gradient``)
    detach_norm : DoRA's n a constant in the backward (PEFT's default) or not

    Notes
    -----
    y = x Wᵀ + s·(x_d Aᵀ) Bᵀ (+ bias); DoRA: n = ‖W + s·B A‖ per row, c = m / n,
    y = x Wᵀ + (c − 1) ⊙ (x_d Wᵀ) + c ⊙ s·(x_d Aᵀ) Bᵀ (+ bias).
    """

    def fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None):
        x_d = x if dropout_mask is None else x * dropout_mask  # (..., d_in)
        lora = (x_d @ A.T) @ B.T  # (..., d_out)
        if m is None:
            y = x @ W.T + scaling * lora
        else:
            n = row_norms(W + scaling * B @ A)  # (d_out,)
            c = m / (constant(n) if detach_norm else n)  # (d_out,)
            y = x @ W.T + (c - 1) * (x_d @ W.T) + c * scaling * lora
        return y if bias is None else y + bias

    return fn


def oracle_case(case):
    """A ``minilora.oracle.Case`` (a ``minilora.testing.LoRACase`` converted)."""
    return case if isinstance(case, Case) else case.to_oracle()


def precision_name(case, dtype):
    """The precision ``fn`` runs in: ``dtype`` or the case's, as one of ``DTYPE_NAMES``."""
    return precision(case.input_precision if dtype is None else dtype).name


def fn_inputs(case, dtype=None):
    """The case's inputs as ``fn`` takes them, float64 (integers kept: adapter_index).

    Returns
    -------
    dict with "x" (..., d_in), "W", "A", "B", "bias", "dropout_mask", "m" (single layer; None
    where absent), "adapter_index" (multi), "dys": the upstream gradients, one per output
    (a list of P for qkv, of one otherwise), and "kwargs": scaling (and activation for mlp).
    W is (d_out, d_in) whatever the case's layout; a QLoRA case's W (``make_case(base="nf4")``)
    is float32 below fp64, as kernels multiply c[q]·a in float32 before holding W in ``dtype``.
    """
    given = case.kind.fn_inputs(case)
    if case.layer.get("base") == "nf4" and precision_name(case, dtype) != "fp64":
        given["W"] = given["W"].astype(np.float32)  # (d_out, d_in) fl32(c[q]·a)
    return given


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
