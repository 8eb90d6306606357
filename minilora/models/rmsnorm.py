"""RMSNorm (Zhang & Sennrich, 2019), LLaMA's normalisation, with a frozen weight.

    r = 1 / sqrt(mean(x²) + eps)          (..., 1)   one per row
    x̂ = x ⊙ r                             (..., d)
    y = x̂ ⊙ weight                        (..., d)
    backward, g = dy ⊙ weight:   dx = r ⊙ (g − x̂ ⊙ mean(g ⊙ x̂))

transformers' ``LlamaRMSNorm`` computes the same lines but casts x to float32 first (whatever
the model's dtype); here every step runs in x's own dtype. docs/math.md derives dx. These NumPy
passes are the reference; ``backend="numba"`` runs one loop per row
(``minilora.models.rmsnorm_numba``).

The backward needs x̂, which the cache keeps, or with ``cache_output=True`` the output y itself
(a caller that keeps y anyway, such as the decoder whose projections keep their input, then
saves an (..., d) array per norm): g ⊙ x̂ = dy ⊙ weight ⊙ x̂ = dy ⊙ y, and x̂ = y / weight,
which holds to rounding wherever weight has no zero (with a zero, x̂ is kept as before).
"""

import math
from typing import NamedTuple

import numpy as np

from minilora.ops._checks import FLOAT_DTYPES, check_dtypes, is_plain, plain_array
from minilora.ops.backends import BACKENDS, resolve_backend


class RMSNormCache(NamedTuple):
    """What ``rmsnorm_backward`` needs: x̂ (or the output y, see the module docstring) and r, so
    the backward needs neither x nor a second pass over it, and the weight."""

    x_hat: np.ndarray | None  # (..., d) = x ⊙ r, or None when y is kept instead
    r: np.ndarray  # (..., 1) = 1 / sqrt(mean(x²) + eps)
    weight: np.ndarray  # (d,)
    backend: str  # "numpy" or "numba"
    y: np.ndarray | None = None  # (..., d) the forward's output, kept instead of x̂

    def normalized(self):
        """x̂ (..., d): the kept one, or y / weight."""
        return self.x_hat if self.x_hat is not None else self.y / self.weight

    def kept(self):
        """The (..., d) array the backward reads: x̂ or y."""
        return self.x_hat if self.x_hat is not None else self.y


def rmsnorm_forward(x, weight, *, eps, backend=None, cache_output=False):
    """RMSNorm, forward pass.

    Parameters
    ----------
    x : (..., d) float32 or float64
    weight : (d,) the frozen gain, x's dtype
    eps : float ≥ 0, added to the mean square (the config's rms_norm_eps)
    backend : "numpy", "numba" or None (``minilora.ops.backends``)
    cache_output : bool, let the cache keep y instead of x̂ (when weight has no zero): the
        caller then must not change y in place before the backward pass

    Returns
    -------
    y : (..., d), a new array
    cache : RMSNormCache for ``rmsnorm_backward``

    Notes
    -----
    y = x / sqrt(mean(x²) + eps) ⊙ weight, the mean over the last axis.
    """
    _, arrays = check_dtypes(x=x, weight=weight)
    x, weight = arrays["x"], arrays["weight"]
    if weight.ndim != 1 or x.ndim < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x must be (..., d) and weight (d,), got x {x.shape} and "
                         f"weight {weight.shape}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number ≥ 0, got {eps!r}")
    eps = float(eps)  # a Python float never promotes float32
    backend = resolve_backend(backend)
    keep_y = bool(cache_output) and bool(np.all(weight != 0))  # x̂ = y / weight holds
    if backend == "numba":
        from minilora.models import rmsnorm_numba

        y, x_hat, r = rmsnorm_numba.forward(x, weight, eps, keep_x_hat=not keep_y)
    else:
        ms = np.mean(x * x, axis=-1, keepdims=True)  # (..., 1)
        r = 1.0 / np.sqrt(ms + eps)  # (..., 1)
        x_hat = x * r  # (..., d)
        y = weight * x_hat  # (..., d)
    if keep_y:
        return y, RMSNormCache(None, r, weight.view(), backend, y.view())
    return y, RMSNormCache(x_hat, r, weight.view(), backend)


def _kept_array(cache):
    """The cache's x̂ or y, once its fields are checked to be what the forward made: exactly
    one of x̂ and y, r (..., 1) and the weight (d,) of its dtype, a backend."""
    kept = cache.kept()
    if (cache.x_hat is None) == (cache.y is None) or not is_plain(kept) or kept.ndim < 1 \
            or kept.dtype not in FLOAT_DTYPES or not is_plain(cache.r) \
            or cache.r.shape != kept.shape[:-1] + (1,) or cache.r.dtype != kept.dtype \
            or not is_plain(cache.weight) or cache.weight.shape != kept.shape[-1:] \
            or cache.weight.dtype != kept.dtype or cache.backend not in BACKENDS:
        raise ValueError("the RMSNorm cache was modified after the forward pass")
    return kept


def rmsnorm_backward(dy, cache, *, add_to=None):
    """RMSNorm, backward pass (the weight is frozen: no dweight).

    Parameters
    ----------
    dy : (..., d), ∂L/∂y, the forward's shape and dtype
    cache : RMSNormCache from ``rmsnorm_forward``
    add_to : None, or a C-ordered array of dy's shape and dtype into which dx is added in
        place (a residual stream's gradient: one pass instead of dx and then ``+=``)

    Returns
    -------
    dx : (..., d), a new array; ``add_to`` itself (holding add_to + dx) when given

    Notes
    -----
    With g = dy ⊙ weight:  dx = r ⊙ (g − x̂ ⊙ mean(g ⊙ x̂)),  the mean over the last axis.
    """
    if type(cache) is not RMSNormCache:
        raise TypeError(f"cache must be the RMSNormCache from rmsnorm_forward, "
                        f"got {type(cache).__name__}")
    dy = plain_array(dy, "dy")
    kept = _kept_array(cache)  # x̂ or y (..., d)
    if dy.shape != kept.shape or dy.dtype != kept.dtype:
        raise ValueError(f"dy must be {kept.dtype}{kept.shape} like the forward's y, got dy "
                         f"{dy.dtype}{dy.shape}")
    if add_to is not None:
        add_to = plain_array(add_to, "add_to")
        if add_to.shape != dy.shape or add_to.dtype != dy.dtype \
                or not add_to.flags.c_contiguous or not add_to.flags.writeable:
            raise ValueError(f"add_to must be a writeable C-ordered {dy.dtype}{dy.shape} array "
                             f"like dy, got {add_to.dtype}{add_to.shape}")
        if np.shares_memory(add_to, dy) or np.shares_memory(add_to, kept):
            raise ValueError("add_to must not share memory with dy or the cache")
    from_y = cache.x_hat is None
    if cache.backend == "numba":
        from minilora.models import rmsnorm_numba

        return rmsnorm_numba.backward(dy, kept, cache.r, cache.weight, from_y, add_to)
    g = dy * cache.weight  # (..., d)
    g_x_hat = dy * cache.y if from_y else g * cache.x_hat  # (..., d) g ⊙ x̂
    proj = np.mean(g_x_hat, axis=-1, keepdims=True)  # (..., 1)
    dx = cache.r * (g - cache.normalized() * proj)  # (..., d)
    if add_to is not None:
        add_to += dx
        return add_to
    return dx
