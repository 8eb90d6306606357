"""The row passes of attention's blocks as Numba kernels (``attention`` with
``backend="numba"``): each pass over a block's scores is one loop instead of NumPy's three or
four whole-array passes and their temporaries. The products stay in BLAS, and exp in NumPy's
vectorised loop, about ten times faster than the scalar exp a Numba loop calls.

A block's scores are R = B·Hkv·g·n rows of S₁ keys, (R, S₁) C-ordered. Row ρ holds query
t = ρ mod n of the block, at absolute position ``first + t``, which sees the keys
j ≤ first + t: the causal mask is a bound on j, so no (n, S₁) mask is ever added. The NumPy
backend (``attention._softmax_block`` and ``_softmax_grad``) runs the same equations in
whole-array passes and is the reference these kernels are tested against.

The kernels are single-threaded, as every kernel in minilora is (``minilora.ops._jit`` says why).
"""

import numpy as np

from minilora.ops._jit import jit


@jit
def _check(R, S1, n, first):
    """Every row's last visible key first + t must lie inside the S₁ keys."""
    if n < 1 or R % n or first < 0 or first + n > S1:
        raise ValueError("attention kernel: rows must be whole blocks of n queries whose "
                         "keys lie inside S₁")


@jit
def _shift_rows(s, scale, n, first, shift, find_max):
    """In place: s = scale·s − shift (−∞ past each row's diagonal). With ``find_max``,
    shift[ρ] := the row's max of scale·s over its visible keys first (the softmax's shift);
    else shift holds each row's lse (the backward's P = exp(S_ − lse))."""
    R, S1 = s.shape
    _check(R, S1, n, first)
    if shift.shape[0] != R:
        raise ValueError("attention kernel: shift must hold one value per row")
    for row in range(R):
        last = first + row % n  # the row's last visible key
        if find_max:
            m = -np.inf
            for j in range(last + 1):
                m = max(m, s[row, j] * scale)
            shift[row] = m
        m = shift[row]
        for j in range(last + 1):
            s[row, j] = s[row, j] * scale - m
        for j in range(last + 1, S1):
            s[row, j] = -np.inf


@jit
def _normalize_rows(e, n, first, lse):
    """In place: e = e / Σ e over each row's visible keys (P); lse[ρ] += log Σ e (lse holds
    the row's max on entry, so it leaves as max + log Σ exp(S_ − max))."""
    R, S1 = e.shape
    _check(R, S1, n, first)
    if lse.shape[0] != R:
        raise ValueError("attention kernel: lse must hold one value per row")
    for row in range(R):
        last = first + row % n
        den = 0.0
        for j in range(last + 1):
            den += e[row, j]
        for j in range(last + 1):
            e[row, j] = e[row, j] / den
        lse[row] += np.log(den)


@jit
def _softmax_grad_rows(P, dP, n, first):
    """In place: dP = P ⊙ (dP − Σ_j dP ⊙ P) over each row's visible keys (dS), 0 past them."""
    R, S1 = P.shape
    _check(R, S1, n, first)
    if dP.shape[0] != R or dP.shape[1] != S1:
        raise ValueError("attention kernel: dP must be (R, S₁) like P")
    for row in range(R):
        last = first + row % n
        delta = 0.0
        for j in range(last + 1):
            delta += dP[row, j] * P[row, j]
        for j in range(last + 1):
            dP[row, j] = P[row, j] * (dP[row, j] - delta)
        for j in range(last + 1, S1):
            dP[row, j] = 0.0


def softmax_block(s, scale, n, first):
    """P (in place of s, (R, S₁) raw q kᵀ) and lse (R,) of one block (see the module
    docstring)."""
    lse = np.empty(s.shape[0], s.dtype)  # (R,)
    _shift_rows(s, s.dtype.type(scale), n, first, lse, True)  # s = S_ − max, lse = max
    np.exp(s, out=s)
    _normalize_rows(s, n, first, lse)
    return s, lse


def probabilities_block(s, scale, n, first, lse):
    """P = exp(S_ − lse) in place of s (R, S₁), the backward's recomputation."""
    _shift_rows(s, s.dtype.type(scale), n, first, lse, False)
    return np.exp(s, out=s)


def softmax_grad_block(P, dP, n, first):
    """dS = P ⊙ (dP − rowsum(dP ⊙ P)) in place of dP (R, S₁)."""
    _softmax_grad_rows(P, dP, n, first)
    return dP
