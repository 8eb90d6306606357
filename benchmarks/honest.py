"""Honest candidates for the oracle's benchmarks: implementations that compute a case correctly
in a given precision, each in its own way, and so must pass; and the two bugs the oracle must
catch however small their effect (a dropout mask applied as an indicator in dx, a dB summed in
bf16).

    numba       minilora's numba backend at the precision (its own kernels and summation order)
    torch       PyTorch autograd at the dtype: every operation's result stored in the dtype
    emulated    the reference's operations with each matrix product summed in a chosen order
                (blas, reversed, blocked, pairwise, split-K) in the accumulation format, and
                the intermediates either stored in the precision or kept in the accumulation
                format until the outputs are rounded
"""

import numpy as np

from minilora.oracle.cases import emulate
from minilora.oracle.emulation import run, stored_type
from minilora.oracle.precision import DEFAULT_ACCUMULATION, precision

ORDERS = ("blas", "reversed", "blocked", "pairwise", "split-K")


def numba_candidate(case, dtype):
    return emulate(case, dtype, backend="numba")


def torch_candidate(case, dtype):
    """PyTorch autograd at ``dtype`` (None without torch or for tf32)."""
    try:
        import torch
    except ImportError:
        return None
    if dtype == "tf32":
        return None
    if case.block is not None:
        return _torch_block_candidate(case, dtype)
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
           "fp64": torch.float64}[dtype]
    t = {k: torch.from_numpy(v.astype(np.float64)).to(tdt) for k, v in case.tensors.items()}
    for k in ("x", "W", "A", "B", "m", "bias"):
        if k in t:
            t[k].requires_grad_(True)
    x = t["x"]
    x_d = x * t["dropout_mask"] if "dropout_mask" in t else x
    W = t["W"].T if case.fan_in_fan_out else t["W"]
    lora = (x_d @ t["A"].T) @ t["B"].T
    if case.dora:
        n = torch.linalg.norm(W + case.scaling * t["B"] @ t["A"], dim=1)
        c = t["m"] / (n.detach() if case.detach_norm else n)
        y = x @ W.T + (c - 1) * (x_d @ W.T) + c * case.scaling * lora
    else:
        y = x @ W.T + case.scaling * lora
    if "bias" in t:
        y = y + t["bias"]
    y.backward(t["dy"])
    out = {"y": y, "dx": x.grad, "dA": t["A"].grad, "dB": t["B"].grad, "dW": t["W"].grad}
    if case.dora:
        out["dm"] = t["m"].grad
    if "bias" in t:
        out["dbias"] = t["bias"].grad
    return {k: v.detach().double().numpy() for k, v in out.items()}


def ordered_product(order, dtype):
    """a @ b summed over the inner index in ``order``, in ``dtype`` (float32 or float64)."""

    def product(a, b):
        a, b = a.astype(dtype), b.astype(dtype)
        K = a.shape[-1]
        if order == "blas" or K < 4:
            return (a @ b).astype(np.float64)
        if order == "reversed":
            return (a[..., ::-1] @ b[::-1]).astype(np.float64)
        if order == "pairwise":
            def pairwise(lo, hi):
                if hi - lo <= 8:
                    return a[..., lo:hi] @ b[lo:hi]
                mid = (lo + hi) // 2
                return pairwise(lo, mid) + pairwise(mid, hi)
            return pairwise(0, K).astype(np.float64)
        step = -(-K // 4) if order == "split-K" else 16  # split-K: 4 parts; blocked: 16 wide
        total = a[..., :step] @ b[:step]
        for k in range(step, K, step):
            total = total + a[..., k:k + step] @ b[k:k + step]  # summed in dtype, block by block
        return total.astype(np.float64)

    return product


def emulated_candidate(case, dtype, order="blas", stored=True, accum_dtype=None):
    """The case computed by the reference's operations in ``dtype``: products summed in
    ``order`` in the accumulation format, every result rounded to it, and to ``dtype`` too when
    ``stored`` (else only the outputs are); inputs rounded to ``dtype`` first."""
    prec = precision(dtype)
    accum = precision(DEFAULT_ACCUMULATION[prec.name] if accum_dtype is None else accum_dtype)

    def store(v, K, squares):
        v = accum.round(v)
        return (prec.round(v) if stored else v).astype(np.float64)

    def store_accum(v, K, squares):
        return accum.round(v).astype(np.float64)

    product = ordered_product(order, accum.numpy_dtype)
    kind = stored_type("Honest", store, product)
    rounded = case.with_tensors({k: prec.round(v) if v.dtype.kind == "f" else v
                                 for k, v in case.tensors.items()})
    outputs = run(rounded, kind, stored_type("HonestNorms", store_accum, product))
    return {k: prec.round(v).astype(np.float64) for k, v in outputs.items()}


def indicator_mask_dx(case, dtype):
    """The honest numba candidate with one bug: dx's LoRA term multiplied by the indicator of
    the mask (0 or 1) instead of the mask (0 or 1/(1−p))."""
    indicator = (case.tensors["dropout_mask"] > 0).astype(case.tensors["dropout_mask"].dtype)
    buggy = emulate(case.with_tensors({**case.tensors, "dropout_mask": indicator}), dtype,
                    backend="numba")
    return {**numba_candidate(case, dtype), "dx": buggy["dx"]}


def bf16_summed_dB(case, dtype):
    """The honest numba candidate with dB = s·dyᵀ h summed token by token in bf16 (each
    product in fp32, each running sum rounded to bf16) instead of fp32."""
    bf16 = precision("bf16")
    t = {k: v.astype(np.float64) for k, v in case.tensors.items()}
    d_in, d_out = t["x"].shape[-1], t["dy"].shape[-1]
    x, dy = t["x"].reshape(-1, d_in), t["dy"].reshape(-1, d_out)
    if "dropout_mask" in t:
        x = x * np.broadcast_to(t["dropout_mask"], t["x"].shape).reshape(x.shape)
    h = bf16.round(bf16.round(x) @ t["A"].T.astype(np.float32))  # (N, r) stored in bf16
    total = np.zeros((d_out, t["A"].shape[0]), np.float32)
    for n in range(x.shape[0]):
        total = bf16.round(total + np.outer(dy[n], h[n]).astype(np.float32))
    dB = bf16.round(np.float32(case.scaling) * total)
    return {**numba_candidate(case, dtype), "dB": dB.astype(np.float64)}


def _torch_block_candidate(case, dtype):
    """A block in plain torch autograd, run by minilora.testing.torch's harness."""
    import torch

    from minilora.testing.torch import torch_outputs

    def projection(x, W, A, B, s, bias, mask):
        x_d = x if mask is None else x * mask
        y = x @ W.T + s * (x_d @ A.T) @ B.T
        return y if bias is None else y + bias

    def qkv(x, W, A, B, *, scaling, bias=None, dropout_mask=None):
        bias, mask = bias or [None] * len(W), dropout_mask or [None] * len(W)
        return tuple(projection(x, W[j], A[j], B[j], scaling[j], bias[j], mask[j])
                     for j in range(len(W)))

    def mlp(x, W, A, B, *, scaling, bias=None, dropout_mask=None, activation):
        bias, mask = bias or [None] * 3, dropout_mask or [None] * 3
        act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
               "gelu_tanh": lambda e: torch.nn.functional.gelu(e, approximate="tanh")}
        e, u = (projection(x, W[j], A[j], B[j], scaling[j], bias[j], mask[j]) for j in (0, 1))
        return projection(act[activation](e) * u, W[2], A[2], B[2], scaling[2], bias[2],
                          mask[2])

    def multi(x, W, A, B, index, *, scaling, bias=None, dropout_mask=None):
        x_d = x if dropout_mask is None else x * dropout_mask
        y = x @ W.T if bias is None else x @ W.T + bias
        for k in range(len(A)):
            y = y + (index == k).unsqueeze(-1) * (scaling[k] * (x_d @ A[k].T) @ B[k].T)
        return y

    fn = {"qkv": qkv, "mlp": mlp, "multi": multi}[case.block]
    return torch_outputs(fn, case, dtype, need_dW=True, need_dbias=True)
