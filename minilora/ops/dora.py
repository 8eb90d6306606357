"""DoRA (weight-decomposed LoRA), forward and backward, on top of either LoRA backend.

PEFT's LoRA layer with ``use_dora=True`` computes, with V = W + s·B A (d_out, d_in),

    n = ‖V_j‖ per output row (d_out,),   c = m / n (d_out,),
    y = x Wᵀ + bias + (c − 1) ⊙ (x_d Wᵀ) + c ⊙ s·(x_d Aᵀ) Bᵀ.

Regrouped, with u = x_d Vᵀ = x_d Wᵀ + s·(x_d Aᵀ) Bᵀ, the LoRA layer's output on x_d:

    y = c ⊙ u + (x − x_d) Wᵀ + bias                                               (N, d_out)

DoRA is LoRA on the dropped-out input, rescaled per output row, plus the frozen layer applied to
what dropout removed (nothing, without dropout). So this module computes u and its gradients with
the LoRA backend's own pair (``lora_numpy`` or ``lora_numba``) and adds only
per-row work. docs/math.md derives the backward:

    dc = Σ_n dy ⊙ u,   dm = dc / n,   dy_c = c ⊙ dy
    dA, dB, du_dx = LoRA backward of u with upstream dy_c
    dx = du_dx ⊙ mask + (dy W) ⊙ (1 − mask)        (dx = du_dx without dropout)
    dW = dy_cᵀ x_d + dyᵀ (x − x_d)

With ``detach_norm=False`` the gradient also flows through n: dn = −dc ⊙ c / n, and with
w = dn / n, ∂L/∂V = diag(w) V, so

    dB += s · diag(w) (W Aᵀ + s·B (A Aᵀ)),   dA += s · ((wB)ᵀ W + s·((wB)ᵀ B) A),   dW += diag(w) V.

None of it forms V: only W Aᵀ (d_out, r) and A Aᵀ (r, r).

Rows with V_j = 0 have no direction; minilora defines c_j = 0 there (and 1/n_j := 0 wherever it
appears), so such a row outputs bias_j plus the dropout correction, its merged weight row is 0
(as c·V_j is for any finite c), and no NaN arises. PEFT divides by zero and returns NaN.
"""

from typing import NamedTuple

import numpy as np

DIRECT_BLOCK = 64  # rows per block when norms are recomputed directly (see row_norms)


def row_norms(W, A, B, scaling, fan_in_fan_out):
    """n_j = ‖W_j + s·B_j A‖ for every output row j, without forming W + s·B A.

    Parameters
    ----------
    W : (d_out, d_in), or (d_in, d_out) when ``fan_in_fan_out``
    A : (r, d_in), B : (d_out, r), scaling : float s

    Returns
    -------
    n : (d_out,)
    WA : (d_out, r) = W Aᵀ, AA : (r, r) = A Aᵀ (reused by the full-gradient backward)
    n_direct : int, how many rows needed the direct computation

    Notes
    -----
    ‖W_j + s·B_j A‖² = ‖W_j‖² + 2s·B_j·(W_j Aᵀ) + s²·B_j (A Aᵀ) B_jᵀ. Summed in floating point,
    the error of this is at most γ_K·t_j² with t_j = ‖W_j‖ + |s|·Σ_k |B_jk|·‖A_k‖ (each term is a
    dot product bounded by Cauchy–Schwarz; K = d_in + 2r + 4), while the direct sum of V_ji² has
    an error of order γ·n_j·t_j. The expansion's bound is t_j/n_j times the direct one: rows with
    t_j > 4·n_j (where W_j and s·B_j A cancel, and the expansion could lose more than two bits
    against direct) are recomputed directly, V_j = W_j + s·B_j A, ``DIRECT_BLOCK`` rows at a time
    so that the temporary stays small whatever the number of such rows.
    """
    Wr = W.T if fan_in_fan_out else W  # (d_out, d_in) view
    WA = Wr @ A.T  # (d_out, r)
    AA = A @ A.T  # (r, r)
    w2 = np.einsum("ji,ji->j", Wr, Wr)  # (d_out,) ‖W_j‖²
    n2 = w2 + 2 * scaling * np.einsum("jk,jk->j", B, WA) \
        + scaling**2 * np.einsum("jk,kl,jl->j", B, AA, B)  # (d_out,)
    t = norm_bounds(W, A, B, scaling, fan_in_fan_out)  # (d_out,)
    rows = np.flatnonzero(~(16 * n2.real >= t * t))  # cancellation (or NaN): recompute directly
    for start in range(0, rows.size, DIRECT_BLOCK):
        block = rows[start:start + DIRECT_BLOCK]
        V = Wr[block] + scaling * (B[block] @ A)  # (block, d_in), only rows that cancel
        n2[block] = np.einsum("ji,ji->j", V, V)
    n = np.sqrt(n2)  # (d_out,)
    return n, WA, AA, rows.size


def trained_magnitude(n, rng):
    """A magnitude m as after some training: the row norms n (d_out,) times factors drawn from
    U(0.5, 2), so that c = m/n is not 1 (at initialisation m = n and c = 1 exactly, which would
    hide a wrong c in a test)."""
    return n * rng.uniform(0.5, 2.0, n.shape)  # (d_out,)


def norm_bounds(W, A, B, scaling, fan_in_fan_out):
    """t_j = ‖W_j‖ + |s|·Σ_k |B_jk|·‖A_k‖ ≥ n_j for every row (d_out,): the size of the terms
    whose sum is V_j. t_j/n_j measures how much W_j and s·B_j A cancel. From real parts, so that
    a complex step (a tiny imaginary part, whose square is negative) never makes it NaN."""
    Wr = (W.T if fan_in_fan_out else W).real  # (d_out, d_in) view
    Ar = A.real  # (r, d_in) view
    a_norms = np.sqrt(np.einsum("ki,ki->k", Ar, Ar))  # (r,) ‖A_k‖
    return np.sqrt(np.einsum("ji,ji->j", Wr, Wr)) + abs(scaling) * (np.abs(B.real) @ a_norms)


def inverse_norms(n):
    """1/n, with 0 where n = 0 (the zero-row convention of the module docstring)."""
    nonzero = n.real > 0
    return np.where(nonzero, 1 / np.where(nonzero, n, 1), 0)  # (d_out,)


class DoRASaved(NamedTuple):
    """What ``backward`` needs from ``forward``, beside the inputs."""

    u: np.ndarray  # (N, d_out) x_d Vᵀ, the LoRA output on x_d
    h: np.ndarray  # (N, r) x_d Aᵀ
    c: np.ndarray  # (d_out,) m / n
    inv_n: np.ndarray  # (d_out,) 1 / n (0 where n = 0)
    WA: np.ndarray | None  # (d_out, r) W Aᵀ, for the gradient through n (None with fixed norms)
    AA: np.ndarray | None  # (r, r) A Aᵀ, likewise
    x_d: np.ndarray  # (N, d_in) x ⊙ mask
    kept: np.ndarray | None = None  # what the LoRA backend's forward kept for its backward


def forward(backend, x, W, A, B, m, *, scaling, bias=None, mask=None, fan_in_fan_out=False,
            norms=None, norm_products=None):
    """DoRA forward on two-dimensional inputs, the LoRA part run by the ``backend`` module.

    Parameters
    ----------
    backend : module with ``forward``/``backward`` (``lora_numpy`` or ``lora_numba``)
    x : (N, d_in), W : (d_out, d_in) or (d_in, d_out) with ``fan_in_fan_out``,
    A : (r, d_in), B : (d_out, r), m : (d_out,), scaling : float, bias : (d_out,) or None,
    mask : broadcast to (N, d_in) or None
    norms : (d_out,) row norms n to use instead of computing them (for example n at a fixed
        point: a finite-difference check of the detached gradient holds n fixed that way); the
        gradient through n is then not available (WA and AA are not computed)
    norm_products : (WA, AA) = (W Aᵀ (d_out, r), A Aᵀ (r, r)) or None, with ``norms`` only:
        kept for the gradient through the given n (the oracle's emulation computes n, WA and
        AA in its own arithmetic and asks for the full gradient)

    Returns
    -------
    y : (N, d_out)
    saved : DoRASaved

    Notes
    -----
    y = c ⊙ u + (x − x_d) Wᵀ + bias with u = x_d Vᵀ and c = m / ‖V_j‖.
    """
    if norms is None:
        n, WA, AA, _ = row_norms(W, A, B, scaling, fan_in_fan_out)  # (d_out,), (d_out, r), (r, r)
    else:
        n = norms  # (d_out,)
        WA, AA = (None, None) if norm_products is None else norm_products  # (d_out, r), (r, r)
    inv_n = inverse_norms(n)  # (d_out,)
    c = m * inv_n  # (d_out,)
    x_d = x if mask is None else x * mask  # (N, d_in)
    u, h, kept = backend.forward(x_d, W, A, B, scaling=scaling,
                                 fan_in_fan_out=fan_in_fan_out)  # (N, d_out), (N, r)
    y = c * u  # (N, d_out)
    if mask is not None:
        dropped = x - x_d  # (N, d_in), what dropout removed from the LoRA branch's input
        y = y + (dropped @ W if fan_in_fan_out else dropped @ W.T)  # (N, d_out)
    if bias is not None:
        y = y + bias  # (N, d_out)
    return y, DoRASaved(u, h, c, inv_n, WA, AA, x_d, kept)


def backward(backend, dy, x, W, A, B, saved, *, scaling, mask=None, fan_in_fan_out=False,
             detach_norm=True, need_dx=True, need_dW=False, need_dbias=False):
    """DoRA backward on two-dimensional inputs (see the module docstring for the equations).

    Returns
    -------
    dx (N, d_in) or None, dA (r, d_in), dB (d_out, r), dm (d_out,), dW (W's layout) or None,
    dbias (d_out,) or None
    """
    u, c, inv_n, x_d = saved.u, saved.c, saved.inv_n, saved.x_d
    dc = np.einsum("nj,nj->j", dy, u)  # (d_out,) Σ_n dy ⊙ u
    dm = dc * inv_n  # (d_out,)
    du_dx, dA, dB, dW, _ = backend.backward(dy, x_d, W, A, B, saved.h, scaling=scaling,
                                            fan_in_fan_out=fan_in_fan_out, need_dx=need_dx,
                                            need_dW=need_dW, kept=saved.kept,
                                            dy_scale=c)  # upstream dy_c = c ⊙ dy
    dx = du_dx
    if mask is not None:
        if need_dx:
            base_dx = dy @ W.T if fan_in_fan_out else dy @ W  # (N, d_in)
            dx = du_dx * mask + base_dx * (1 - mask)  # (N, d_in)
        if need_dW:
            dropped = x - x_d  # (N, d_in)
            dW = dW + (dropped.T @ dy if fan_in_fan_out else dy.T @ dropped)  # W's layout
    if not detach_norm:
        w = -dc * c * inv_n * inv_n  # (d_out,) ∂L/∂n_j / n_j
        wB = w[:, None] * B  # (d_out, r)
        Wr = W.T if fan_in_fan_out else W  # (d_out, d_in) view
        dB = dB + scaling * (w[:, None] * saved.WA + scaling * (wB @ saved.AA))  # (d_out, r)
        dA = dA + scaling * (wB.T @ Wr + scaling * ((wB.T @ B) @ A))  # (r, d_in)
        if need_dW:
            dV = w[:, None] * Wr + scaling * (wB @ A)  # (d_out, d_in) diag(w) V
            dW = dW + (dV.T if fan_in_fan_out else dV)
    dbias = dy.sum(axis=0) if need_dbias else None  # (d_out,)
    return dx, dA, dB, dm, dW, dbias
