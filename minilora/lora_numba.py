"""LoRA linear layer, forward and backward, fast: ``backend="numba"``.

Implements ``lora_numpy.forward`` and ``lora_numpy.backward`` (same arguments, same results up to
summation order) by one of two routes, chosen by size:

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
  (d_out·d_in ≤ N·(d_in + d_out)/8): x Wᵀ + s·(x Aᵀ) Bᵀ = x (W + s·B A)ᵀ, so each pass merges the
  weight once (a (d_out, d_in) temporary, at most an eighth of y and dx) and does one large
  product instead of a large product plus a low-rank update:

      forward:   y  = x (W + s·B A)ᵀ;   h = x Aᵀ
      backward:  dx = dy (W + s·B A);   g, dB, dA as above

  With B = 0 the merged weight is W exactly, so a fresh adapter still gives the base layer's bits.

Why not Numba kernels for the large low-rank work: measured on this project's 2-core machine
(docs/performance.md), row-parallel Numba kernels for it ran at 1.47x the two-GEMM floor against
1.24x for this route: Numba's loops vectorise at 256 bits where BLAS uses 512, and OpenBLAS's
threads keep spinning for a while after each product, so two Numba threads right after a GEMM
got no speed-up over one.

Every route adds in an order fixed by the shapes alone (rows in fixed blocks, the batch sums of
dA and dB in fixed block order or inside one BLAS call), so results are bit-for-bit reproducible.
"""

import numpy as np

from minilora._jit import jit

SMALL_WORK = 1 << 18  # N·d_in·d_out at or below which the fused kernels run
ROW_BLOCK = 256  # rows per block of the large route's in-place updates

# The three small products every kernel below is made of. Each handles four terms per pass over
# its long axis, so a row in L1 is loaded and stored once per four multiply-adds, not once per one.


@jit
def _matvec_acc(u, M, out):
    """out[k] += Σ_i u[i]·M[k, i]:  out (K,), u (L,), M (K, L).  (out += M u)"""
    K, L = M.shape
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
def _outer_acc(C, U, out):
    """out[k, i] += Σ_m C[m, k]·U[m, i]:  out (K, L), C (R, K), U (R, L), R ≤ 4.  (out += Cᵀ U)"""
    R, K = C.shape
    L = U.shape[1]
    for k in range(K):
        ok = out[k]
        if R == 4:
            c0, c1, c2, c3 = C[0, k], C[1, k], C[2, k], C[3, k]
            u0, u1, u2, u3 = U[0], U[1], U[2], U[3]
            for i in range(L):
                ok[i] += c0 * u0[i] + c1 * u1[i] + c2 * u2[i] + c3 * u3[i]
        else:
            for m in range(R):
                cm = C[m, k]
                um = U[m]
                for i in range(L):
                    ok[i] += cm * um[i]


@jit
def _forward_small(x, A, B, s, bias, mask, y):
    """The low-rank part of ``lora_numpy.forward`` in one pass over the rows, for small layers.

    x (N, d_in), A (r, d_in), B (d_out, r), s the scaling, bias (d_out,) or None, mask (N, d_in)
    or None; y (N, d_out) holds x Wᵀ and gets h (s·Bᵀ) + bias added. Returns h = x_d Aᵀ (N, r).
    """
    N, d_in = x.shape
    r = A.shape[0]
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
    Bt = B.T.copy()  # (r, d_out)
    dBt = np.zeros((r, d_out), x.dtype)  # (r, d_out), dBᵀ / s
    dA = np.zeros((r, d_in), x.dtype)  # (r, d_in), dA / s
    g = np.zeros((1, r), x.dtype)  # the row g_n = dy_n B
    xd = np.empty((1, d_in), x.dtype)  # the row x_n ⊙ mask_n
    t = np.empty(d_in, x.dtype)  # (d_in,) the row (s·g_n) A
    for n in range(N):
        g[:] = 0
        _matvec_acc(dy[n], Bt, g[0])  # g_n = dy_n B
        _outer_acc(h[n:n + 1], dy[n:n + 1], dBt)  # dBᵀ += h_n ⊗ dy_n
        if mask is None:
            _outer_acc(g, x[n:n + 1], dA)  # dA += g_n ⊗ x_n
        else:
            for i in range(d_in):
                xd[0, i] = x[n, i] * mask[n, i]
            _outer_acc(g, xd, dA)  # dA += g_n ⊗ x_d,n
        if dx.shape[0] == 0:
            continue
        g *= s  # s·g_n
        if mask is None:
            _vecmat_acc(g[0], A, dx[n])  # dx_n += (s·g_n) A
        else:
            t[:] = 0
            _vecmat_acc(g[0], A, t)
            for i in range(d_in):
                dx[n, i] += t[i] * mask[n, i]  # dx_n += ((s·g_n) A) ⊙ mask_n
    dA *= s
    dBt *= s
    return dA, dBt.T.copy()


def _is_small(N, d_in, d_out):
    return N * d_in * d_out <= SMALL_WORK


def _merges(N, d_in, d_out, mask):
    """Whether a large pass can take the merged-weight route (see the module docstring)."""
    return mask is None and 8 * d_in * d_out <= N * (d_in + d_out)


def _route(N, d_in, d_out, mask):
    """"small", "merged" or "blocked": the route a pass takes (see the module docstring)."""
    if _is_small(N, d_in, d_out):
        return "small"
    return "merged" if _merges(N, d_in, d_out, mask) else "blocked"


def _merged_weight(W, A, B, scaling, fan_in_fan_out):
    """W + s·B A as a new (d_out, d_in) array (one temporary of that size)."""
    merged = (scaling * B) @ A  # (d_out, d_in)
    merged += W.T if fan_in_fan_out else W
    return merged


def forward(x, W, A, B, scaling, bias, mask, fan_in_fan_out):
    """``lora_numpy.forward``: y (N, d_out) and h (N, r)."""
    N, (r, d_in), d_out = x.shape[0], A.shape, B.shape[0]
    route = _route(N, d_in, d_out, mask)
    if route == "merged":
        y = x @ _merged_weight(W, A, B, scaling, fan_in_fan_out).T  # (N, d_out), BLAS
        if bias is not None:
            y += bias
        return y, x @ A.T  # h (N, r)
    y = x @ W if fan_in_fan_out else x @ W.T  # (N, d_out), BLAS
    if route == "small":
        return y, _forward_small(x, A, B, x.dtype.type(scaling), bias, mask, y)
    sBt = (scaling * B).T  # (r, d_out), a transposed view: BLAS reads it as it is
    if mask is None:
        h = x @ A.T  # (N, r)
    else:
        h = np.empty((N, r), x.dtype)  # (N, r)
        for rows in _blocks(N):
            h[rows] = (x[rows] * mask[rows]) @ A.T  # x_d Aᵀ, a block at a time
    for rows in _blocks(N):
        y[rows] += h[rows] @ sBt  # s·h Bᵀ, a (block, d_out) temporary in cache
    if bias is not None:
        y += bias
    return y, h


def backward(dy, x, W, A, B, scaling, mask, fan_in_fan_out, h, need_dx, need_dW, need_dbias):
    """``lora_numpy.backward``: dx, dA, dB, dW, dbias (None where not asked for)."""
    N, (r, d_in), d_out = x.shape[0], A.shape, B.shape[0]
    dW = dbias = None
    if need_dW:
        dW = x.T @ dy if fan_in_fan_out else dy.T @ x  # W's layout
    if need_dbias:
        dbias = dy.sum(axis=0)  # (d_out,)
    route = _route(N, d_in, d_out, mask)
    dx = None
    if need_dx and route == "merged":
        dx = dy @ _merged_weight(W, A, B, scaling, fan_in_fan_out)  # (N, d_in), BLAS
    elif need_dx:
        dx = dy @ W.T if fan_in_fan_out else dy @ W  # (N, d_in), BLAS
    if route == "small":
        dA, dB = _backward_small(dy, x, A, B, h, x.dtype.type(scaling), mask,
                                 dx if need_dx else np.empty((0, d_in), x.dtype))
        return dx, dA, dB, dW, dbias
    g = dy @ B  # (N, r)
    dB = dy.T @ h  # (d_out, r)
    dB *= scaling
    if mask is None:
        dA = g.T @ x  # (r, d_in)
    else:
        dA = np.zeros((r, d_in), x.dtype)
        for rows in _blocks(N):  # in block order: fixed bits
            dA += g[rows].T @ (x[rows] * mask[rows])  # gᵀ x_d
    dA *= scaling
    if need_dx and route == "blocked":
        sg = scaling * g  # (N, r)
        for rows in _blocks(N):
            lora_dx = sg[rows] @ A  # (block, d_in) (s·g) A, in cache
            dx[rows] += lora_dx if mask is None else lora_dx * mask[rows]
    return dx, dA, dB, dW, dbias


def _blocks(N):
    """Slices of ``ROW_BLOCK`` rows covering N rows."""
    return [slice(lo, lo + ROW_BLOCK) for lo in range(0, N, ROW_BLOCK)]
