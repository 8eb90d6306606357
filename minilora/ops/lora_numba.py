"""LoRA linear layer, forward and backward, fast: ``backend="numba"``.

Implements ``lora_numpy.forward`` and ``lora_numpy.backward`` (same arguments, same results up to
summation order, the same NaN and infinity wherever the reference has them) by one of three
routes, chosen by size:

* **Small layers** (N·d_in·d_out ≤ ``SMALL_WORK``, the examples' sizes): after the large product
  (BLAS, so that B = 0 gives exactly the base layer's bits), one fused Numba kernel does all the
  low-rank work of the pass. At these sizes the time goes to calls, not arithmetic: the NumPy
  reference makes about a dozen, each with its own overhead.

* **Large layers**: the two large products (x Wᵀ forward, dy W backward) and the skinny low-rank
  products go to NumPy's BLAS, which on this class of machine runs AVX-512 on every core and
  beats any Numba loop on them. The low-rank updates of y and dx are then added in blocks of
  ``ROW_BLOCK`` rows, so the temporary they need is one block in cache, not an (N, d) array:

      forward:   y  = x Wᵀ;   h = x_d Aᵀ;   y[rows] += h[rows] (s·Bᵀ)
      backward:  dx = dy W;   g = dy B;    dB = s·dyᵀ h;   dA = s·gᵀ x_d;
                 dx[rows] += ((s·g[rows]) A) ⊙ mask[rows]

  With dropout, x_d = x ⊙ mask is formed one block at a time too.

* **Large layers without dropout whose weight is small next to their activations**
  (d_out·d_in ≤ N·(d_in + d_out)/8): x Wᵀ + s·(x Aᵀ) Bᵀ = x (W + s·B A)ᵀ, so the forward pass
  merges the weight once, bordered by the adapter, K = [[W + s·B A, B], [A, 0]]
  ((d_out + r, d_in + r), at most about an eighth of y and dx), and each pass is one large
  product that also gives the skinny one, at the large product's rate:

      forward:   [y | h]  = x [W + s·B A; A]ᵀ        (K's left columns)
      backward:  [dx | g] = dy [W + s·B A | B]       (K's top rows, K kept from the forward)
                 dB = s·dyᵀ h;   dA = s·gᵀ x

  y and dx are views of those products (their rows d_out + r and d_in + r apart), h a copy, so
  the cache does not keep y's buffer alive; the cache keeps K between the passes. DoRA's
  backward, whose upstream gradient is c ⊙ dy, scales K's rows by c instead (a weight-sized
  product, not an (N, d_out) one).
  A caller whose activations dwarf the layer's own (a block: ``lora_forward``'s
  ``merge_weight``) may give leave to merge where the rule would not; K is then kept between
  the passes too (at most an eighth of what the caller keeps: the rule's proportion).
  With B = 0 the merged weight is W exactly, so a fresh adapter still gives the base layer's bits.
  The merge changes where a NaN arises: the reference's s·(x_d Aᵀ) Bᵀ turns an infinite x into
  NaN even where B = 0, the merged product leaves it infinite. So a pass keeps the merged result
  only when the merged weight and h = x Aᵀ (or g = dy B) are finite, which every non-finite value
  of x, W, A, B or dy makes them not (a sum over a row or column it enters), and otherwise takes
  the blocked route, which follows the reference's arithmetic. Sums of K once and of h or g,
  O(N·r), decide it.

Why not Numba kernels for the large low-rank work: measured on this project's 2-core machine
(docs/performance.md), row-parallel Numba kernels for it ran at 1.47x the two-GEMM floor against
1.24x for this route: Numba's loops vectorise at 256 bits where BLAS uses 512, and OpenBLAS's
threads keep spinning for a while after each product, so two Numba threads right after a GEMM
got no speed-up over one.

Kernels check every shape they index on entry (raising ValueError): Numba's bounds checks are
off, so a kernel trusts nothing it did not check itself.

Every route adds in an order fixed by the shapes alone (rows in fixed blocks, the batch sums of
dA and dB in fixed block order or inside one BLAS call), so results are bit-for-bit reproducible.
"""

import math

import numpy as np

from minilora.ops._jit import jit
from minilora.ops.lora_numpy import frozen_grads

SMALL_WORK = 1 << 18  # N·d_in·d_out at or below which the fused kernels run
ROW_BLOCK = 256  # rows per block of the large route's in-place updates

# The three small products every kernel below is made of. The first two handle four rows of M
# per pass over its long axis, so a row in L1 is loaded and stored once per four multiply-adds.


@jit
def _matvec_acc(u, M, out):
    """out[k] += Σ_i u[i]·M[k, i]:  out (K,), u (L,), M (K, L).  (out += M u)"""
    K, L = M.shape
    if u.shape[0] != L or out.shape[0] != K:
        raise ValueError("_matvec_acc: u must be (L,) and out (K,) for M (K, L)")
    K4 = K - K % 4
    for k in range(0, K4, 4):
        m0, m1, m2, m3 = M[k], M[k + 1], M[k + 2], M[k + 3]
        s0, s1, s2, s3 = out[k], out[k + 1], out[k + 2], out[k + 3]
        for i in range(L):
            s0 += u[i] * m0[i]
            s1 += u[i] * m1[i]
            s2 += u[i] * m2[i]
            s3 += u[i] * m3[i]
        out[k], out[k + 1], out[k + 2], out[k + 3] = s0, s1, s2, s3
    for k in range(K4, K):
        s0 = out[k]
        for i in range(L):
            s0 += u[i] * M[k, i]
        out[k] = s0


@jit
def _vecmat_acc(c, M, out):
    """out[i] += Σ_k c[k]·M[k, i]:  out (L,), c (K,), M (K, L).  (out += c M)"""
    K, L = M.shape
    if c.shape[0] != K or out.shape[0] != L:
        raise ValueError("_vecmat_acc: c must be (K,) and out (L,) for M (K, L)")
    K4 = K - K % 4
    for k in range(0, K4, 4):
        c0, c1, c2, c3 = c[k], c[k + 1], c[k + 2], c[k + 3]
        m0, m1, m2, m3 = M[k], M[k + 1], M[k + 2], M[k + 3]
        for i in range(L):
            out[i] += c0 * m0[i] + c1 * m1[i] + c2 * m2[i] + c3 * m3[i]
    for k in range(K4, K):
        ck = c[k]
        for i in range(L):
            out[i] += ck * M[k, i]


@jit
def _outer_acc(c, u, out):
    """out[k, i] += c[k]·u[i]:  out (K, L), c (K,), u (L,).  (out += c ⊗ u, a rank-1 update)"""
    K, L = out.shape
    if c.shape[0] != K or u.shape[0] != L:
        raise ValueError("_outer_acc: c must be (K,) and u (L,) for out (K, L)")
    for k in range(K):
        ck = c[k]
        ok = out[k]
        for i in range(L):
            ok[i] += ck * u[i]


@jit
def _forward_small(x, A, B, s, bias, mask, y):
    """The low-rank part of ``lora_numpy.forward`` in one pass over the rows, for small layers.

    x (N, d_in), A (r, d_in), B (d_out, r), s the scaling, bias (d_out,) or None, mask (N, d_in)
    or None; y (N, d_out) holds x Wᵀ and gets h (s·Bᵀ) + bias added. Returns h = x_d Aᵀ (N, r).
    """
    N, d_in = x.shape
    r, d_out = A.shape[0], B.shape[0]
    if A.shape[1] != d_in or B.shape[1] != r or y.shape[0] != N or y.shape[1] != d_out:
        raise ValueError("_forward_small: shapes of x, A, B, y disagree")
    if bias is not None and bias.shape[0] != d_out:
        raise ValueError("_forward_small: bias must be (d_out,)")
    if mask is not None and (mask.shape[0] != N or mask.shape[1] != d_in):
        raise ValueError("_forward_small: mask must be (N, d_in)")
    sBt = (s * B).T.copy()  # (r, d_out)
    h = np.zeros((N, r), x.dtype)  # (N, r)
    xd = np.empty(d_in, x.dtype)  # (d_in,) the row x_n ⊙ mask_n
    for n in range(N):
        if mask is None:
            _matvec_acc(x[n], A, h[n])  # h_n = x_n Aᵀ
        else:
            for i in range(d_in):
                xd[i] = x[n, i] * mask[n, i]
            _matvec_acc(xd, A, h[n])  # h_n = x_d,n Aᵀ
        _vecmat_acc(h[n], sBt, y[n])  # y_n += h_n (s·Bᵀ)
        if bias is not None:
            y[n] += bias
    return h


@jit
def _backward_small(dy, x, A, B, h, s, mask, dx):
    """The low-rank part of ``lora_numpy.backward`` in one pass over the rows, for small layers.

    dy (N, d_out), x (N, d_in), A (r, d_in), B (d_out, r), h (N, r), s the scaling, mask (N, d_in)
    or None; dx (N, d_in) holds dy W and gets ((s·g) A) ⊙ mask added, or has 0 rows when dx is
    not wanted. Returns dA (r, d_in) and dB (d_out, r).
    """
    N, d_in = x.shape
    r, d_out = A.shape[0], B.shape[0]
    if A.shape[1] != d_in or B.shape[1] != r or dy.shape[0] != N or dy.shape[1] != d_out \
            or h.shape[0] != N or h.shape[1] != r:
        raise ValueError("_backward_small: shapes of dy, x, A, B, h disagree")
    if mask is not None and (mask.shape[0] != N or mask.shape[1] != d_in):
        raise ValueError("_backward_small: mask must be (N, d_in)")
    if dx.shape[1] != d_in or (dx.shape[0] != N and dx.shape[0] != 0):
        raise ValueError("_backward_small: dx must be (N, d_in) or (0, d_in)")
    Bt = B.T.copy()  # (r, d_out)
    dBt = np.zeros((r, d_out), x.dtype)  # (r, d_out), dBᵀ / s
    dA = np.zeros((r, d_in), x.dtype)  # (r, d_in), dA / s
    g = np.zeros(r, x.dtype)  # (r,) the row g_n = dy_n B
    xd = np.empty(d_in, x.dtype)  # (d_in,) the row x_n ⊙ mask_n
    t = np.empty(d_in, x.dtype)  # (d_in,) the row (s·g_n) A
    for n in range(N):
        g[:] = 0
        _matvec_acc(dy[n], Bt, g)  # g_n = dy_n B
        _outer_acc(h[n], dy[n], dBt)  # dBᵀ += h_n ⊗ dy_n
        if mask is None:
            _outer_acc(g, x[n], dA)  # dA += g_n ⊗ x_n
        else:
            for i in range(d_in):
                xd[i] = x[n, i] * mask[n, i]
            _outer_acc(g, xd, dA)  # dA += g_n ⊗ x_d,n
        if dx.shape[0] == 0:
            continue
        g *= s  # s·g_n
        if mask is None:
            _vecmat_acc(g, A, dx[n])  # dx_n += (s·g_n) A
        else:
            t[:] = 0
            _vecmat_acc(g, A, t)
            for i in range(d_in):
                dx[n, i] += t[i] * mask[n, i]  # dx_n += ((s·g_n) A) ⊙ mask_n
    dA *= s
    dBt *= s
    return dA, dBt.T.copy()


def _is_small(N, d_in, d_out):
    return N * d_in * d_out <= SMALL_WORK


def _merges(N, d_in, d_out, mask):
    """Whether a large pass merges the weight by the layer's own size rule, keeping it between
    the passes (see the module docstring)."""
    return mask is None and 8 * d_in * d_out <= N * (d_in + d_out)


def _route(N, d_in, d_out, mask, merge_weight=False):
    """"small", "merged" or "blocked": the route a pass takes (see the module docstring);
    ``merge_weight`` is a caller's leave to merge where the size rule would not."""
    if _is_small(N, d_in, d_out):
        return "small"
    merged = _merges(N, d_in, d_out, mask) or (merge_weight and mask is None)
    return "merged" if merged else "blocked"


def _bordered_weight(W, A, B, scaling, fan_in_fan_out):
    """The merged weight bordered by the adapter, K = [[W + s·B A, B], [A, 0]], a new
    (d_out + r, d_in + r) array (one temporary about the size of W). Its top rows hold
    [W + s·B A | B], whose product with dy gives dx and g together; its left columns
    [W + s·B A; A], whose product with x gives y and h together."""
    (r, d_in), d_out = A.shape, B.shape[0]
    K = np.empty((d_out + r, d_in + r), A.dtype)  # (d_out + r, d_in + r)
    merged = K[:d_out, :d_in]  # (d_out, d_in), rows d_in + r apart: BLAS takes it as it is
    np.matmul(scaling * B, A, out=merged)  # s·B A
    merged += W.T if fan_in_fan_out else W
    K[:d_out, d_in:] = B
    K[d_out:, :d_in] = A
    K[d_out:, d_in:] = 0
    return K


def _c_order(*arrays):
    """The arrays in C order (None stays None): the small kernels' inputs, so that Numba
    compiles them once per dtype rather than once per combination of layouts (Fortran order,
    strided views, broadcast masks), each compilation a second or more on first use. A small
    layer's copies are small; C-ordered arrays are passed as they are."""
    return tuple(None if a is None else np.ascontiguousarray(a) for a in arrays)


def _finite(*arrays):
    """Whether every entry is finite, by one sum each (an overflowing sum says no: that only
    sends a pass to the blocked route, which is right for any input)."""
    return all(np.isfinite(np.sum(a)) for a in arrays)


def forward(x, W, A, B, *, scaling, bias=None, mask=None, fan_in_fan_out=False,
            merge_weight=False):
    """``lora_numpy.forward``: y (N, d_out), h (N, r), and as ``kept`` the bordered weight K
    when the merged route ran (the backward pass takes it back instead of forming it again).
    With ``merge_weight`` (a caller's leave, see ``functional.lora_forward``) a large pass
    without dropout merges whatever the size rule says."""
    N, (r, d_in), d_out = x.shape[0], A.shape, B.shape[0]
    route = _route(N, d_in, d_out, mask, merge_weight)
    if route == "merged":
        K = _bordered_weight(W, A, B, scaling, fan_in_fan_out)  # (d_out + r, d_in + r)
        if _finite(K[:d_out, :d_in]):
            yh = x @ K[:, :d_in].T  # (N, d_out + r) = [x (W + s·B A)ᵀ | x Aᵀ], one BLAS call
            h = yh[:, d_out:].copy()  # (N, r): the cache keeps h alone, not y's buffer
            if _finite(h):
                y = yh[:, :d_out]  # (N, d_out), a view whose rows are d_out + r apart
                if bias is not None:
                    y += bias
                return y, h, K
            del yh, h
        del K
    y = x @ W if fan_in_fan_out else x @ W.T  # (N, d_out), BLAS
    if route == "small":
        x, A, B, bias, mask = _c_order(x, A, B, bias, mask)
        return y, _forward_small(x, A, B, x.dtype.type(scaling), bias, mask, y), None
    sBt = (scaling * B).T  # (r, d_out), a transposed view: BLAS reads it as it is
    if mask is None:
        h = x @ A.T  # (N, r)
    else:
        h = np.empty((N, r), x.dtype)  # (N, r)
        x_d = np.empty((min(N, ROW_BLOCK), d_in), x.dtype)  # one block of x ⊙ mask, in cache
        for rows, n in _blocks(N):
            np.multiply(x[rows], mask[rows], out=x_d[:n])
            np.matmul(x_d[:n], A.T, out=h[rows])  # x_d Aᵀ, a block at a time
    _add_product(y, h, sBt)  # y += s·h Bᵀ
    if bias is not None:
        y += bias
    return y, h, None


def backward(dy, x, W, A, B, h, *, scaling, mask=None, fan_in_fan_out=False, need_dx=True,
             need_dW=False, need_dbias=False, kept=None, dy_scale=None, merge_weight=False):
    """``lora_numpy.backward``: dx, dA, dB, dW, dbias (None where not asked for). ``kept`` is
    the bordered weight K the forward pass returned, or None to form it again;
    ``merge_weight`` the forward's. On the merged route a ``dy_scale`` c scales K's rows,
    dy (diag(c) K), a weight-sized product, instead of dy's (N, d_out)."""
    N, (r, d_in), d_out = x.shape[0], A.shape, B.shape[0]
    route = _route(N, d_in, d_out, mask, merge_weight)
    fold = dy_scale is not None and need_dx and route == "merged" and not need_dW \
        and not need_dbias
    if dy_scale is not None and not fold:
        dy = dy * dy_scale  # (N, d_out), the upstream gradient c ⊙ dy
    dW, dbias = frozen_grads(dy, x, fan_in_fan_out, need_dW, need_dbias)
    if route == "small":
        dx = (dy @ W.T if fan_in_fan_out else dy @ W) if need_dx else None  # (N, d_in), BLAS
        dy, x, A, B, h, mask = _c_order(dy, x, A, B, h, mask)
        dA, dB = _backward_small(dy, x, A, B, h, x.dtype.type(scaling), mask,
                                 dx if need_dx else np.empty((0, d_in), x.dtype))
        return dx, dA, dB, dW, dbias
    g = dx = None
    if need_dx and route == "merged":
        K = kept if kept is not None else _bordered_weight(W, A, B, scaling, fan_in_fan_out)
        top = K[:d_out]  # (d_out, d_in + r) = [W + s·B A | B]
        if fold:
            top = dy_scale[:, None] * top  # (d_out, d_in + r) diag(c) [W + s·B A | B]
        if (kept is not None and not fold) or _finite(top[:, :d_in]):  # the forward checked K
            dxg = dy @ top  # (N, d_in + r) = [dy (W + s·B A) | dy B], one BLAS call
            g = dxg[:, d_in:]  # (N, r)
            if _finite(g):
                dx = dxg[:, :d_in]  # (N, d_in), a view whose rows are d_in + r apart
        del K, top
        if dx is None:
            route = "blocked"  # the reference's NaN and infinities (see the module docstring)
            if fold:  # the blocked route scales dy itself
                dy, g, fold = dy * dy_scale, None, False
    if g is None:
        g = dy @ B  # (N, r)
    if need_dx and dx is None:
        dx = dy @ W.T if fan_in_fan_out else dy @ W  # (N, d_in), BLAS
    dB = dy.T @ h  # (d_out, r)
    dB *= (scaling * dy_scale)[:, None] if fold else scaling  # (c ⊙ dy)ᵀ h = diag(c) dyᵀ h
    if mask is None:
        dA = g.T @ x  # (r, d_in)
    else:
        dA = np.zeros((r, d_in), x.dtype)
        x_d = np.empty((min(N, ROW_BLOCK), d_in), x.dtype)  # one block of x ⊙ mask, in cache
        for rows, n in _blocks(N):  # in block order: fixed bits
            np.multiply(x[rows], mask[rows], out=x_d[:n])
            dA += g[rows].T @ x_d[:n]  # gᵀ x_d
    dA *= scaling
    if need_dx and route == "blocked":
        _add_product(dx, scaling * g, A, mask)  # dx += ((s·g) A) ⊙ mask
    return dx, dA, dB, dW, dbias


def _add_product(out, a, b, mask=None):
    """out += (a b) ⊙ mask (no mask when None), in place: out (N, d), a (N, k), b (k, d), mask
    (N, d). ``ROW_BLOCK`` rows at a time, so that the product's temporary is one block, in cache."""
    N = out.shape[0]
    if N <= ROW_BLOCK:  # one block: no slicing
        t = a @ b
        if mask is not None:
            t *= mask
        out += t
        return
    t = np.empty((ROW_BLOCK, out.shape[1]), out.dtype)  # (block, d)
    for rows, n in _blocks(N):
        np.matmul(a[rows], b, out=t[:n])
        if mask is not None:
            t[:n] *= mask[rows]
        out_rows = out[rows]  # a view: += on it adds in place, with no copy back
        out_rows += t[:n]


def _blocks(N, size=None):
    """(rows, n): slices of ``size`` rows (default ``ROW_BLOCK``, read at each call) covering N
    rows, n of them in each, fewer in the last."""
    size = ROW_BLOCK if size is None else size
    return [(slice(lo, min(lo + size, N)), min(size, N - lo)) for lo in range(0, N, size)]


# -- the gated MLP's elementwise pass (minilora.ops.blocks) ---------------------------------------

@jit
def _silu(e, t):
    """(silu(e), silu'(e)) for one value from t = exp(−e): σ = 1 / (1 + t)."""
    sig = 1.0 / (1.0 + t)
    return e * sig, sig * (1.0 + e * (1.0 - sig))


@jit
def _activation(e, kind):
    """(act(e), act'(e)) for one value: kind 0 silu, 1 gelu (erf), 2 gelu_tanh
    (``blocks.activation_derivative`` writes the same formulas for arrays)."""
    if kind == 0:
        return _silu(e, np.exp(-e))
    if kind == 1:
        cdf = 0.5 * (1.0 + math.erf(e * 0.7071067811865476))
        return e * cdf, cdf + e * (0.3989422804014327 * np.exp(-0.5 * e * e))
    t = np.tanh(0.7978845608028654 * (e + 0.044715 * e * e * e))
    dt = (1.0 - t * t) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * e * e))
    return 0.5 * e * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * e * dt


@jit
def _is_nh(a, N, H):
    """Whether a is (N, H)."""
    return a.shape[0] == N and a.shape[1] == H


# The kernels below take C-ordered (n, H) blocks of rows, never a whole strided array: LLVM
# vectorises their loops only where it can tell the arrays apart and their rows contiguous.
# Arrays of any layout (a merged projection's e and u are views whose rows are hidden + r apart)
# reach them through ``_gated_blocks``, which copies a block of a strided input into a scratch
# buffer first. Measured at N = 2048, hidden 2816, fp32 on an AMD EPYC (AVX-512): the backward
# kernel on distinct C arrays 5.1 ms, on a t that is de itself 11.9 ms (LLVM's overlap check
# sends such a call to its scalar loop), on 'A'-layout views about the same.

@jit
def _gated_forward(e, u, kind, z):
    """z = act(e) ⊙ u, all (n, H), in one pass."""
    N, H = e.shape
    if not (_is_nh(u, N, H) and _is_nh(z, N, H)):
        raise ValueError("_gated_forward: every array must be (N, H) like e")
    for n in range(N):
        for i in range(H):
            z[n, i] = _activation(e[n, i], kind)[0] * u[n, i]


@jit
def _gated_backward(dz, e, u, kind, de, du):
    """de = dz ⊙ u ⊙ act'(e), du = dz ⊙ act(e), all (n, H), in one pass."""
    N, H = e.shape
    if not (_is_nh(dz, N, H) and _is_nh(u, N, H) and _is_nh(de, N, H) and _is_nh(du, N, H)):
        raise ValueError("_gated_backward: every array must be (N, H) like e")
    for n in range(N):
        for i in range(H):
            act, dact = _activation(e[n, i], kind)
            de[n, i] = dz[n, i] * u[n, i] * dact
            du[n, i] = dz[n, i] * act


@jit
def _silu_gated_forward(e, t, u, z):
    """z = silu(e) ⊙ u from t = exp(−e), all (n, H)."""
    N, H = e.shape
    if not (_is_nh(t, N, H) and _is_nh(u, N, H) and _is_nh(z, N, H)):
        raise ValueError("_silu_gated_forward: every array must be (N, H) like e")
    for n in range(N):
        for i in range(H):
            z[n, i] = _silu(e[n, i], t[n, i])[0] * u[n, i]


@jit
def _silu_gated_backward(dz, e, t, u, de, du):
    """de = dz ⊙ u ⊙ silu'(e), du = dz ⊙ silu(e) from t = exp(−e), all (n, H)."""
    N, H = e.shape
    if not (_is_nh(dz, N, H) and _is_nh(t, N, H) and _is_nh(u, N, H) and _is_nh(de, N, H)
            and _is_nh(du, N, H)):
        raise ValueError("_silu_gated_backward: every array must be (N, H) like e")
    for n in range(N):
        for i in range(H):
            act, dact = _silu(e[n, i], t[n, i])
            de[n, i] = dz[n, i] * u[n, i] * dact
            du[n, i] = dz[n, i] * act


# SiLU (LLaMA's activation) takes exp(−e) from NumPy's vectorised exp, a block of rows at a time
# into a scratch buffer that stays in cache: the scalar exp a Numba loop calls is about ten times
# slower than NumPy's SIMD loop. The gelus keep the one-pass scalar kernels.
SILU = 0  # ``_activation``'s kind
GATED_BLOCK = 1 << 17  # elements per block of rows of the gated passes (512 KiB in fp32)


def _gated_arrays(name, *arrays):
    """The arrays as ndarrays (views stay views), checked: (N, H) each, one float dtype."""
    arrays = [np.asarray(a) for a in arrays]
    shape, dtype = arrays[0].shape, arrays[0].dtype
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise ValueError(f"{name}: every array must be (N, H) like e, got shapes "
                         f"{[a.shape for a in arrays]}")
    if dtype not in (np.float32, np.float64) or any(a.dtype != dtype for a in arrays):
        raise TypeError(f"{name}: the arrays must share one dtype, float32 or float64, got "
                        f"{[str(a.dtype) for a in arrays]}")
    return arrays


def _gated_blocks(N, H, dtype, inputs, silu):
    """(rows, blocks) over N rows, ``GATED_BLOCK`` elements at a time: each input's block as a
    C-ordered array (a slice where it is one, else a copy into a scratch buffer), and with
    ``silu`` exp(−e) of the first input's block after them (a scratch buffer too)."""
    n_max = max(1, min(N, GATED_BLOCK // max(H, 1)))
    scratch = {}

    def block(key, rows, n, a=None):
        view = None if a is None else a[rows]  # (n, H)
        if view is not None and view.flags.c_contiguous:
            return view
        if key not in scratch:
            scratch[key] = np.empty((n_max, H), dtype)
        buf = scratch[key][:n]  # (n, H)
        if view is not None:
            np.copyto(buf, view)
        return buf

    for rows, n in _blocks(N, n_max):
        out = [block(j, rows, n, a) for j, a in enumerate(inputs)]
        if silu:
            t = block("t", rows, n)  # (n, H)
            np.negative(out[0], out=t)
            with np.errstate(over="ignore"):
                np.exp(t, out=t)  # exp(−e): inf for e ≪ 0 (e < −89 in fp32), exact there
            out.append(t)
        yield rows, out


def gated_forward(e, u, kind):
    """z = act(e) ⊙ u for the gated MLP (``blocks.gated_product``): a new (N, H) array of e's
    dtype; e and u are (N, H) arrays of one float dtype, any strides."""
    e, u = _gated_arrays("gated_forward", e, u)
    z = np.empty(e.shape, e.dtype)  # (N, H)
    for rows, (e_b, u_b, *t_b) in _gated_blocks(*e.shape, e.dtype, (e, u), kind == SILU):
        if kind == SILU:
            _silu_gated_forward(e_b, t_b[0], u_b, z[rows])
        else:
            _gated_forward(e_b, u_b, kind, z[rows])
    return z


def gated_backward(dz, e, u, kind):
    """(de, du) for the gated MLP (``blocks.gated_backward``): new (N, H) arrays of e's dtype;
    dz, e, u are (N, H) arrays of one float dtype, any strides."""
    e, dz, u = _gated_arrays("gated_backward", e, dz, u)
    de, du = np.empty(e.shape, e.dtype), np.empty(e.shape, e.dtype)  # (N, H) each
    for rows, (e_b, dz_b, u_b, *t_b) in _gated_blocks(*e.shape, e.dtype, (e, dz, u),
                                                       kind == SILU):
        if kind == SILU:
            _silu_gated_backward(dz_b, e_b, t_b[0], u_b, de[rows], du[rows])
        else:
            _gated_backward(dz_b, e_b, u_b, kind, de[rows], du[rows])
    return de, du
