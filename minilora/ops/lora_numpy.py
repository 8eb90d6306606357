"""LoRA linear layer, forward and backward, in plain NumPy: the readable reference.

This module is the specification. The Numba kernels in ``lora_numba.py`` implement the same two
functions and are tested against them. Inputs arrive validated and flattened to two dimensions
by ``minilora.ops.functional``: N rows, the leading dimensions of x folded together.

    forward:   x_d = x ⊙ mask                      (N, d_in)
               h   = x_d Aᵀ                        (N, r)
               y   = x Wᵀ + bias + s · h Bᵀ        (N, d_out)

    backward:  g   = dy B                          (N, r)
               dB  = s · dyᵀ h                     (d_out, r)
               dA  = s · gᵀ x_d                    (r, d_in)
               dx  = dy W + s · (g A) ⊙ mask       (N, d_in)
               dW  = dyᵀ x                         (d_out, d_in)   [(d_in, d_out) for Conv1D]
               dbias = Σ_n dy                      (d_out,)

docs/math.md derives each line.
"""


def forward(x, W, A, B, *, scaling, bias=None, mask=None, fan_in_fan_out=False):
    """LoRA forward on two-dimensional inputs (any float or complex dtype: complex-step checks
    run through this function, so it uses only analytic operations).

    Parameters
    ----------
    x : (N, d_in)
    W : (d_out, d_in), or (d_in, d_out) when ``fan_in_fan_out``
    A : (r, d_in)
    B : (d_out, r)
    scaling : float, s
    bias : (d_out,) or None
    mask : array broadcastable to (N, d_in), or None for no dropout
    fan_in_fan_out : bool

    Returns
    -------
    y : (N, d_out), a new array
    h : (N, r), x_d Aᵀ, kept for the backward pass
    kept : None: nothing else to keep (the numba backend keeps its merged weight here)

    Notes
    -----
    y = x Wᵀ + bias + s · (x_d Aᵀ) Bᵀ with x_d = x ⊙ mask.
    """
    x_d = x if mask is None else x * mask  # (N, d_in)
    base = x @ W if fan_in_fan_out else x @ W.T  # (N, d_out)
    h = x_d @ A.T  # (N, r)
    y = base + scaling * (h @ B.T)  # (N, d_out)
    if bias is not None:
        y = y + bias  # (N, d_out)
    return y, h, None


def backward(dy, x, W, A, B, h, *, scaling, mask=None, fan_in_fan_out=False, need_dx=True,
             need_dW=False, need_dbias=False, kept=None, dy_scale=None):
    """LoRA backward on two-dimensional inputs.

    Parameters
    ----------
    dy : (N, d_out), upstream gradient ∂L/∂y
    x, W, A, B : as passed to ``forward``
    h : (N, r), x_d Aᵀ from ``forward``
    scaling, mask, fan_in_fan_out : as passed to ``forward``
    need_dx, need_dW, need_dbias : bool
    kept : what ``forward`` returned as kept (None here; unused)
    dy_scale : (d_out,) or None, a factor c of each column of the upstream gradient: the
        gradients are those for upstream c ⊙ dy (DoRA's)

    Returns
    -------
    dx : (N, d_in) or None
    dA : (r, d_in)
    dB : (d_out, r)
    dW : (d_out, d_in) or (d_in, d_out) when ``fan_in_fan_out``, or None
    dbias : (d_out,) or None

    Notes
    -----
    With g = dy B:  dB = s·dyᵀ h,  dA = s·gᵀ x_d,  dx = dy W + s·(g A) ⊙ mask,  dW = dyᵀ x,
    dbias = Σ_n dy. x_d is recomputed from x and the mask rather than cached: it costs one
    elementwise product and saves an (N, d_in) array between the passes.
    """
    if dy_scale is not None:
        dy = dy * dy_scale  # (N, d_out), the upstream gradient c ⊙ dy
    x_d = x if mask is None else x * mask  # (N, d_in)
    g = dy @ B  # (N, r)
    dB = scaling * (dy.T @ h)  # (d_out, r)
    dA = scaling * (g.T @ x_d)  # (r, d_in)
    dx = None
    if need_dx:
        base_dx = dy @ W.T if fan_in_fan_out else dy @ W  # (N, d_in)
        lora_dx = scaling * (g @ A)  # (N, d_in)
        dx = base_dx + (lora_dx if mask is None else lora_dx * mask)  # (N, d_in)
    dW, dbias = frozen_grads(dy, x, fan_in_fan_out, need_dW, need_dbias)
    return dx, dA, dB, dW, dbias


def frozen_grads(dy, x, fan_in_fan_out, need_dW, need_dbias):
    """The gradients of the frozen weight and bias, the same for every backend:
    dW = dyᵀ x (W's layout: xᵀ dy for Conv1D) and dbias = Σ_n dy, each None unless asked for."""
    dW = (x.T @ dy if fan_in_fan_out else dy.T @ x) if need_dW else None  # W's layout
    dbias = dy.sum(axis=0) if need_dbias else None  # (d_out,)
    return dW, dbias
