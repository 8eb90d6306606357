"""LoRA linear layer, forward and backward, as fused Numba kernels.

Implements ``lora_numpy.forward`` and ``lora_numpy.backward`` (same arguments, same results up
to summation order). The two large products, x Wᵀ forward and dy W backward, stay with NumPy's
BLAS: no loop nest beats it. The kernels do all the O(N·r·d) low-rank work around them in one
pass over the rows, so no (N, d) temporary is made beyond y and dx themselves:

    forward, per row n:   h_n  = (x_n ⊙ mask_n) Aᵀ               (r,)
                          y_n += bias + h_n (s·Bᵀ)                (d_out,)  [y_n = x_n Wᵀ from BLAS]
    backward, per row n:  g_n  = dy_n B                           (r,)
                          dBᵀ += h_n ⊗ dy_n,  dbias += dy_n      (r, d_out), (d_out,)
                          dA  += g_n ⊗ (x_n ⊙ mask_n)             (r, d_in)
                          dx_n += ((s·g_n) A) ⊙ mask_n            (d_in,)   [dx_n = dy_n W, BLAS]

dA, dB and dbias are sums over the batch. They are accumulated per chunk of rows (the chunks set
by ``_jit.row_chunks``, which depends on N only) and the chunk partials are added in order, so the
bits do not depend on how many threads ran the chunks.
"""

import numpy as np

from minilora._jit import jit, prange, row_chunks

# Below this many multiply-adds of low-rank work the kernels run on one thread: waking the
# thread pool costs more than it saves.
PARALLEL_MIN_WORK = 1 << 18

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
def _forward_rows(x, mask, A, sBt, bias, y, h, lo, hi):
    """Rows lo:hi of the forward's low-rank part: h = x_d Aᵀ, then y += h (s·Bᵀ) + bias.

    x (N, d_in), mask broadcast to (N, d_in) or None, A (r, d_in), sBt = s·Bᵀ (r, d_out),
    bias (d_out,) or None, y (N, d_out) holding x Wᵀ, h (N, r) zeros on entry.
    """
    xd = np.empty(x.shape[1], x.dtype)  # (d_in,) the row x_n ⊙ mask_n
    for n in range(lo, hi):
        if mask is None:
            _matvec_acc(x[n], A, h[n])  # h_n = x_n Aᵀ
        else:
            for i in range(xd.size):
                xd[i] = x[n, i] * mask[n, i]
            _matvec_acc(xd, A, h[n])  # h_n = x_d,n Aᵀ
        _vecmat_acc(h[n], sBt, y[n])  # y_n += h_n (s·Bᵀ)
        if bias is not None:
            y[n] += bias


@jit(parallel=True)
def _forward_parallel(x, mask, A, sBt, bias, y, h):
    N = x.shape[0]
    n_blocks = min(N, 64)
    for b in prange(n_blocks):
        _forward_rows(x, mask, A, sBt, bias, y, h, b * N // n_blocks, (b + 1) * N // n_blocks)


def forward(x, W, A, B, scaling, bias, mask, fan_in_fan_out):
    """``lora_numpy.forward`` with the low-rank part fused into one pass over x and y."""
    N, r = x.shape[0], A.shape[0]
    y = x @ W if fan_in_fan_out else x @ W.T  # (N, d_out), BLAS
    h = np.zeros((N, r), x.dtype)  # (N, r)
    sBt = np.ascontiguousarray((scaling * B).T)  # (r, d_out)
    if N * r * (A.shape[1] + B.shape[0]) >= PARALLEL_MIN_WORK:
        _forward_parallel(x, mask, A, sBt, bias, y, h)
    else:
        _forward_rows(x, mask, A, sBt, bias, y, h, 0, N)
    return y, h


@jit
def _backward_chunk(dy, x, mask, A, Bt, h, s, g, dx, dBt, dA, dbias, need_dbias, lo, hi):
    """Rows lo:hi of the backward's low-rank part, four rows at a time.

    dy (N, d_out), x (N, d_in), mask (N, d_in) or None, A (r, d_in), Bt = Bᵀ (r, d_out),
    h (N, r), s the scaling, g (N, r) zeros on entry, dx (N, d_in) holding dy W, or None.
    Accumulates this chunk's unscaled dBᵀ (r, d_out), dA (r, d_in) and, if ``need_dbias``,
    dbias (d_out,).
    """
    r, d_in = A.shape
    xd = np.empty((4, d_in), x.dtype)  # (4, d_in) rows x_n ⊙ mask_n
    sg = np.empty(r, x.dtype)  # (r,) the row s·g_n
    for n0 in range(lo, hi, 4):
        n1 = min(n0 + 4, hi)
        for n in range(n0, n1):
            _matvec_acc(dy[n], Bt, g[n])  # g_n = dy_n B
        _outer_acc(h[n0:n1], dy[n0:n1], dBt)  # dBᵀ += hᵀ dy
        if need_dbias:
            for n in range(n0, n1):
                dbias += dy[n]
        if mask is None:
            _outer_acc(g[n0:n1], x[n0:n1], dA)  # dA += gᵀ x
        else:
            for n in range(n0, n1):
                for i in range(d_in):
                    xd[n - n0, i] = x[n, i] * mask[n, i]
            _outer_acc(g[n0:n1], xd[: n1 - n0], dA)  # dA += gᵀ x_d
        if dx is None:
            continue
        for n in range(n0, n1):
            for k in range(r):
                sg[k] = s * g[n, k]
            if mask is None:
                _vecmat_acc(sg, A, dx[n])  # dx_n += (s·g_n) A
            else:
                t = xd[n - n0]  # (d_in,) reused as scratch: x_d,n is no longer needed
                t[:] = 0
                _vecmat_acc(sg, A, t)
                for i in range(d_in):
                    dx[n, i] += t[i] * mask[n, i]  # dx_n += ((s·g_n) A) ⊙ mask_n


@jit(parallel=True)
def _backward_parallel(dy, x, mask, A, Bt, h, s, g, dx, dBt, dA, dbias, need_dbias):
    N = x.shape[0]
    n_chunks = dA.shape[0]
    for c in prange(n_chunks):
        _backward_chunk(dy, x, mask, A, Bt, h, s, g, dx, dBt[c], dA[c], dbias[c], need_dbias,
                        c * N // n_chunks, (c + 1) * N // n_chunks)


@jit
def _backward_serial(dy, x, mask, A, Bt, h, s, g, dx, dBt, dA, dbias, need_dbias):
    N = x.shape[0]
    n_chunks = dA.shape[0]
    for c in range(n_chunks):
        _backward_chunk(dy, x, mask, A, Bt, h, s, g, dx, dBt[c], dA[c], dbias[c], need_dbias,
                        c * N // n_chunks, (c + 1) * N // n_chunks)


def backward(dy, x, W, A, B, scaling, mask, fan_in_fan_out, h, need_dx, need_dW, need_dbias):
    """``lora_numpy.backward`` with the low-rank part fused into one pass over the rows."""
    N, (r, d_in), d_out = x.shape[0], A.shape, B.shape[0]
    dtype = x.dtype
    dx = None
    if need_dx:
        dx = dy @ W.T if fan_in_fan_out else dy @ W  # (N, d_in), BLAS
    n_chunks = row_chunks(N)
    g = np.zeros((N, r), dtype)  # (N, r)
    dBt = np.zeros((n_chunks, r, d_out), dtype)  # chunk partials of dBᵀ
    dA = np.zeros((n_chunks, r, d_in), dtype)  # chunk partials of dA
    dbias = np.zeros((n_chunks, d_out if need_dbias else 0), dtype)  # chunk partials of dbias
    Bt = np.ascontiguousarray(B.T)  # (r, d_out)
    kernel = _backward_parallel if N * r * (d_in + d_out) >= PARALLEL_MIN_WORK else _backward_serial
    kernel(dy, x, mask, A, Bt, h, dtype.type(scaling), g, dx, dBt, dA, dbias, need_dbias)
    dA = _sum_chunks(dA)  # (r, d_in)
    dA *= scaling
    dB = _sum_chunks(dBt).T.copy()  # (d_out, r)
    dB *= scaling
    dbias = _sum_chunks(dbias) if need_dbias else None  # (d_out,)
    dW = None
    if need_dW:
        dW = x.T @ dy if fan_in_fan_out else dy.T @ x  # W's layout
    return dx, dA, dB, dW, dbias


def _sum_chunks(parts):
    """Add chunk partials in chunk order (a fixed order, so fixed bits)."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total
