"""LoRA initialisation schemes, with PEFT's semantics (``init_lora_weights=...``).

Every scheme returns ``(A, B, W)`` where W is the base weight the layer should use from now on:
the given one for ``default`` and ``gaussian`` (B = 0, so B A = 0), or the residual
W − s·B A for ``pissa`` and ``olora``. Either way the fresh layer's output equals the base
layer's output: x Wᵀ + s·x Aᵀ Bᵀ = x W₀ᵀ. Weights here are (d_out, d_in); the layer handles the
Conv1D layout. The factorisations run in float64 and are rounded to the layer's dtype once.
"""

import numpy as np

INIT_SCHEMES = ("default", "gaussian", "pissa", "olora")


def kaiming_uniform(rng, shape, dtype):
    """torch's ``kaiming_uniform_(w, a=√5)`` of a (fan_out, fan_in) matrix: U(±1/√fan_in).

    gain = √(2/(1+a²)) = √(1/3), std = gain/√fan_in, bound = √3·std = 1/√fan_in. This is also the
    default init of ``nn.Linear``'s weight and bias.
    """
    bound = 1.0 / np.sqrt(shape[-1]) if shape[-1] > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def linear_bias(rng, in_features, out_features, dtype):
    """torch's ``nn.Linear`` bias init: U(±1/√in_features), the bound of its weight."""
    bound = 1.0 / np.sqrt(in_features) if in_features > 0 else 0.0
    return rng.uniform(-bound, bound, out_features).astype(dtype)


def init_lora(scheme, W, r, scaling, rng):
    """Initialise a LoRA adapter for the frozen weight W (d_out, d_in).

    Parameters
    ----------
    scheme : "default" | "gaussian" | "pissa" | "olora"
    W : (d_out, d_in), not modified
    r : int, rank
    scaling : float, s
    rng : numpy.random.Generator

    Returns
    -------
    A : (r, d_in), B : (d_out, r), W : (d_out, d_in) the base weight to use (a new array).

    Notes
    -----
    default : A ~ U(−1/√d_in, 1/√d_in) (Kaiming-uniform, a=√5), B = 0   [Hu et al., microsoft/LoRA]
    gaussian: A ~ N(0, 1/r²), B = 0
    pissa   : W = U S Vᵀ; A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s); W ← W − s·B A   [Meng et al., 2024]
    olora   : W = Q R;    A = R_r (first r rows), B = Q_r (first r columns); W ← W − s·B A
    """
    d_out, d_in = W.shape
    dtype = W.dtype
    if scheme in ("default", "gaussian"):
        if scheme == "default":
            A = kaiming_uniform(rng, (r, d_in), dtype)  # (r, d_in)
        else:
            A = rng.normal(0.0, 1.0 / r, size=(r, d_in)).astype(dtype)  # (r, d_in)
        return A, np.zeros((d_out, r), dtype), W.copy()
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    if r > min(d_out, d_in):
        raise ValueError(
            f"init={scheme!r} takes r components of W {W.shape}, so r must be at most "
            f"min(d_out, d_in) = {min(d_out, d_in)}, got r = {r}"
        )
    if scheme == "pissa" and not scaling > 0.0:
        raise ValueError(f"init='pissa' takes square roots of S/s, so the scaling must be > 0, "
                         f"got {scaling}")
    W64 = W.astype(np.float64)  # (d_out, d_in)
    if scheme == "pissa":
        U, S, Vt = np.linalg.svd(W64, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        root = np.sqrt(S[:r] / scaling)  # (r,)
        A64 = root[:, None] * Vt[:r]  # (r, d_in)
        B64 = U[:, :r] * root  # (d_out, r)
    else:
        Q, R = np.linalg.qr(W64)  # (d_out, k), (k, d_in)
        A64, B64 = R[:r], Q[:, :r]  # (r, d_in), (d_out, r)
    A, B = A64.astype(dtype), B64.astype(dtype)
    # The residual from the rounded factors, so that x Wᵀ + s·x Aᵀ Bᵀ reproduces x W₀ᵀ as closely
    # as the dtype allows.
    W_res = (W64 - scaling * (B.astype(np.float64) @ A.astype(np.float64))).astype(dtype)
    return A, B, W_res
