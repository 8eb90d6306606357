"""A candidate's arithmetic, emulated operation by operation on the reference's own code.

The oracle needs two things from a model of an honest candidate computing in precision p and
accumulating in precision a: a **baseline** (one honest result, to compare the candidate's
largest error with) and the **spread** of honest results (to know how large a whole-tensor
statistic such as the scale ratio can be by rounding alone). Both come from running minilora's
own ops on the NumPy backend (the reference, unchanged: LoRA, DoRA and the fused blocks) on
arrays whose every arithmetic result is *stored*, as an autograd framework stores each
operation's output:

    baseline (``Rounded``)  every result rounded to a, then to p: the intermediates h = x_d Aᵀ,
                            g = dy B, the scaled products, c = m/n and the outputs are all held
                            in p, as a kernel that keeps them in p does (the most roundings an
                            honest kernel makes; a fused kernel makes fewer);
    spread (``Perturbed``)  every result v gets a random rounding error, uniform in
                            ±half an ulp of v in p (the error of rounding to nearest when v's
                            position in its rounding interval is random), and every sum of K
                            terms t_k an accumulation error, normal with standard deviation
                            u_a·√(K·(v² + Σ t_k²)/3): the first-order error Σ δ_k·S_k of
                            adding the terms one by one, |δ_k| ≤ u_a, with partial sums S_k
                            that wander like a random walk of steps t_k drifting towards v
                            (Σ_k S_k² ≈ K·(v²/3 + Σ t_k²/2); blocked, pairwise and split-K
                            orders err less).

Each random run is one plausible honest candidate; a few of them give the spread of every
statistic the oracle computes. The runs are seeded, so a verdict is reproducible.
"""

import numpy as np

from minilora.ops import dora, lora_numpy
from minilora.oracle.cases import evaluate

# NumPy functions the reference calls that only move or select values (no rounding happens)
_EXACT = {np.where, np.broadcast_to, np.flatnonzero, np.concatenate, np.reshape, np.transpose}


def stored_type(name, store, product=np.matmul):
    """An ndarray subclass whose every floating-point result v is replaced by
    ``store(v, K, squares)``, with K the number of terms summed into each element (0 for an
    elementwise operation) and ``squares`` the sum of the terms' squares (None when K = 0);
    matrix products are computed by ``product(a, b)``. Results are held as float64."""
    return type(name, (_Stored,), {"store": staticmethod(store),
                                   "product": staticmethod(product)})


class _Stored(np.ndarray):
    """The base of ``stored_type``'s classes. Its operators compute ndarray's results and then
    store them, so it declares ndarray's arithmetic (``minilora.ops._checks.NDARRAY_ARITHMETIC``):
    minilora's public ops accept its arrays, and run on them operation by operation."""

    __minilora_ndarray_arithmetic__ = True  # minilora.ops._checks.NDARRAY_ARITHMETIC
    store = None
    product = None

    @classmethod
    def wrap(cls, a):
        a = np.asarray(a)
        return a.view(cls) if a.dtype.kind == "f" else a

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if out is not None:  # a += b: computed and stored as a + b, then written into a
            if len(out) != 1 or method != "__call__":
                raise TypeError(f"the emulation does not model {ufunc.__name__}.{method} "
                                f"with out=")
            result = self.__array_ufunc__(ufunc, method, *inputs, **kwargs)
            np.asarray(out[0])[...] = np.asarray(result)
            return out[0]
        plain = [np.asarray(i) if isinstance(i, _Stored) else i for i in inputs]
        if ufunc is np.matmul and method == "__call__" and not kwargs:
            result = type(self).product(*plain)
        else:
            result = getattr(ufunc, method)(*plain, **kwargs)
        if np.asarray(result).dtype.kind != "f":
            return result
        K, squares = 0, None
        if ufunc is np.matmul and method == "__call__":
            a, b = plain
            K, squares = a.shape[-1], np.matmul(a * a, b * b)
        elif ufunc is np.add and method == "reduce":
            a = plain[0]
            axis = kwargs.get("axis", 0)
            axes = range(a.ndim) if axis is None else np.atleast_1d(axis)
            K = int(np.prod([a.shape[i] for i in axes]))
            squares = np.add.reduce(a * a, **kwargs)
        elif method != "__call__":
            raise TypeError(f"the emulation does not model {ufunc.__name__}.{method}")
        return self.wrap(type(self).store(np.asarray(result, dtype=np.float64), K, squares))

    def __array_function__(self, func, types, args, kwargs):
        plain_args = [np.asarray(a) if isinstance(a, _Stored) else a for a in args]
        if func is np.einsum:
            spec, operands = plain_args[0], plain_args[1:]
            result = np.einsum(spec, *operands, **kwargs)
            inputs, output = spec.replace(" ", "").split("->")
            sizes = {}
            for letters, op in zip(inputs.split(","), operands, strict=True):
                sizes.update(zip(letters, np.shape(op), strict=True))
            K = int(np.prod([n for c, n in sizes.items() if c not in output]))
            squares = np.einsum(spec, *[o * o for o in operands], **kwargs)
            return self.wrap(type(self).store(np.asarray(result, np.float64), K, squares))
        if func in _EXACT:
            result = func(*plain_args, **kwargs)
            return self.wrap(result) if isinstance(result, np.ndarray) else result
        raise TypeError(f"the emulation does not model numpy.{func.__name__}")


def rounded_type(prec, accum):
    """The baseline's arrays: every result rounded to ``accum``, then to ``prec``."""

    def store(v, K, squares):
        return prec.round(accum.round(v)).astype(np.float64)

    return stored_type("Rounded", store)


def half_ulp(v, prec):
    """Half the spacing of ``prec``'s numbers at each |v| (the largest rounding error there):
    u·2^⌊log₂|v|⌋, and half the subnormal spacing below ``prec``'s normal range; 0 at 0."""
    v = np.asarray(v, dtype=np.float64)
    power = (v.view(np.uint64) & np.uint64(0x7FF0000000000000)).view(np.float64)  # 2^⌊log₂|v|⌋
    return np.where(v == 0, 0.0, np.maximum(power * prec.u, prec.eta))


def perturbed_type(prec, accum, rng):
    """A random honest candidate's arrays (see the module docstring)."""

    def store(v, K, squares):
        out = v + half_ulp(v, prec) * (2 * rng.random(v.shape, np.float32) - 1)
        if K:
            spread = accum.u * np.sqrt(K * (v * v + squares) / 3)
            out += spread * rng.standard_normal(v.shape, np.float32)
        return out

    return stored_type("Perturbed", store)


def run(case, kind, norms_kind=None, inputs_exact=()):
    """Every output of ``case`` computed by minilora's own ops (the NumPy backend) on arrays of
    type ``kind`` (from ``stored_type``): a dict of float64 arrays like ``cases.reference``'s.
    The inputs are stored first (rounded or perturbed) unless named in ``inputs_exact`` (those
    the candidate's precision represents exactly). DoRA's row norms are computed as PEFT does:
    V = W + s·B A formed and stored in p, ‖V_j‖ summed on arrays of type ``norms_kind``
    (default ``kind``: the accumulation format, as torch.linalg.norm sums bf16 in fp32) and
    stored in p. Where W_j and s·B_j A cancel, V_j's rounding makes n_j relatively off by about
    u_p·‖terms‖/n_j, and the runs show it."""
    t = {}
    for name, value in case.tensors.items():
        a = np.asarray(value)
        if a.dtype.kind != "f":  # adapter_index
            t[name] = a
            continue
        a = a.astype(np.float64)
        t[name] = a.view(kind) if name in inputs_exact else kind.wrap(kind.store(a, 0, None))
    if not case.dora:
        out = evaluate(case.with_tensors(t), backend="numpy")
    else:
        W, A, B = t["W"], t["A"], t["B"]
        Wr = W.T if case.fan_in_fan_out else W  # (d_out, d_in)
        V = (norms_kind or kind).wrap(np.asarray(Wr + (case.scaling * B) @ A))  # stored in p
        #   ((s·B) A, as torch code writes it: each term rounded, so that where V_j cancels its
        #   error is u_p times the terms' size, the most an honest order gives)
        n = np.sqrt(np.einsum("ji,ji->j", V, V))  # (d_out,) summed in a
        n = kind.wrap(kind.store(np.asarray(n), 0, None))  # and stored in p
        WA, AA = Wr @ A.T, A @ A.T  # (d_out, r), (r, r): the gradient through n
        x, dy, mask = t["x"], t["dy"], t.get("dropout_mask")
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (N, d_in), (N, d_out)
        mask2 = None if mask is None else np.broadcast_to(mask, x.shape).reshape(x2.shape)
        #   minilora's DoRA (the reference module, on the NumPy backend) given n, W Aᵀ and A Aᵀ
        #   as computed here: the forward with these norms, the backward through them or not
        y, saved = dora.forward(lora_numpy, x2, W, A, B, t["m"], scaling=case.scaling,
                                bias=t.get("bias"), mask=mask2,
                                fan_in_fan_out=case.fan_in_fan_out, norms=n,
                                norm_products=(WA, AA))  # (N, d_out)
        dx, dA, dB, dm, dW, dbias = dora.backward(
            lora_numpy, dy2, x2, W, A, B, saved, scaling=case.scaling, mask=mask2,
            fan_in_fan_out=case.fan_in_fan_out, detach_norm=case.detach_norm, need_dx=True,
            need_dW=True, need_dbias="bias" in t)
        grads = {"dx": dx.reshape(x.shape), "dA": dA, "dB": dB, "dm": dm, "dW": dW,
                 "dbias": dbias}
        y = y.reshape(dy.shape)
        out = {"y": y, **{k: v for k, v in grads.items() if v is not None}}
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
