"""Fused blocks: the shapes real LoRA kernels take, built from the LoRA layer's own pair.

Three ops, each a forward/backward pair like ``lora_forward``/``lora_backward``, whose every
projection is one validated LoRA layer (``minilora.ops.functional``, either backend) so that the
core's guarantees (validation, dtype preservation, any leading dimensions, no input mutation,
new output arrays, checked caches) hold for the block; the block adds only its own algebra.
docs/math.md derives each backward.

**Projections sharing an input** (attention's q, k, v is P = 3; an MLP's gate and up P = 2):

    y_j = x W_jᵀ + bias_j + s_j · (x_dj A_jᵀ) B_jᵀ,   x_dj = x ⊙ mask_j        j = 1 … P
    dx  = Σ_j dx_j    (x feeds every projection: its gradient is the sum of theirs)

**The gated MLP** (LLaMA's SwiGLU and its GELU cousins), LoRA on gate, up and down:

    e = gate(x),  u = up(x)                     (N, hidden)   the projections above, P = 2
    z = act(e) ⊙ u                              (N, hidden)
    y = down(z)                                 (N, d_out)    a LoRA layer whose input is z
    backward:  dz = down's dx;   de = dz ⊙ u ⊙ act'(e);   du = dz ⊙ act(e)
               dx = gate's dx (upstream de) + up's dx (upstream du)

The forward keeps e, u and z (N, hidden each; z as down's input): the backward runs down's
backward on the kept z, then forms de and du in one pass over dz, e and u (``gated_backward``).
Recomputing z instead would hold two hidden-sized arrays between the passes, not three, for one
more pass of the activation (2% of issue 18's LLaMA training step; docs/performance.md).

**K adapters on one layer, per token** (multi-tenant training, punica's SGMV, PEFT's
``adapter_names=``): token n uses adapter k = adapter_index[n], or none for k = −1:

    y_n  = x_n Wᵀ + bias + s_k · (x_dn A_kᵀ) B_kᵀ                    (d_out,)
    dA_k = s_k · Σ_{n: k} g_nᵀ x_dn,   g_n = dy_n B_k                 (r_k, d_in)
    dB_k = s_k · Σ_{n: k} dy_nᵀ h_n,   h_n = x_dn A_kᵀ                (d_out, r_k)
    dx_n = dy_n W + s_k · (g_n A_k) ⊙ mask_n                         (d_in,)

computed per adapter on the rows that use it (a stable sort groups them once). The numpy
backend, the reference, runs each adapter's tokens through one LoRA layer (``lora_forward``);
the numba backend runs the frozen product once over every token and each adapter's low-rank
work on its gathered tokens, so the cost is the frozen layer's plus each adapter's on its own.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from minilora.ops import lora_numba
from minilora.ops._checks import (
    FLOAT_DTYPES,
    check_dtypes,
    check_dy,
    check_layer_shapes,
    check_scaling,
    is_plain,
    plain_array,
)
from minilora.ops.backends import resolve_backend
from minilora.ops.functional import LoRACache, _prepare, lora_backward, lora_forward
from minilora.ops.lora_numpy import frozen_grads

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


# -- activations, forward and derivative side by side -----------------------------------------

def _erf(a):
    """erf elementwise in a's dtype (NumPy has none; math.erf is correctly rounded to double)."""
    return np.frompyfunc(math.erf, 1, 1)(a).astype(a.dtype)


def _exp_minus(e):
    """exp(−e). It overflows to inf for e ≪ 0 (e < −89 in float32), which is exact there
    (σ = 1/(1 + inf) = 0, silu = −0): no warning."""
    with np.errstate(over="ignore"):
        return np.exp(-e)


def activation_forward(e, activation):
    """act(e), elementwise:
        silu       e · σ(e),                 σ(e) = 1 / (1 + exp(−e))
        gelu       e · Φ(e),                 Φ(e) = (1 + erf(e/√2)) / 2
        gelu_tanh  e · (1 + tanh(t)) / 2,    t = √(2/π) · (e + 0.044715 e³)
    """
    if activation == "silu":
        return e / (1 + _exp_minus(e))
    if activation == "gelu":
        return e * (0.5 * (1 + _erf(e * _SQRT_HALF)))
    t = np.tanh(_SQRT_2_OVER_PI * (e + _GELU_TANH_C * e**3))
    return 0.5 * e * (1 + t)


def activation_derivative(e, activation):
    """(act(e), act'(e)), elementwise:
        silu       act' = σ(e) · (1 + e · (1 − σ(e)))
        gelu       act' = Φ(e) + e · φ(e),     φ(e) = exp(−e²/2) / √(2π)
        gelu_tanh  act' = (1 + tanh t)/2 + e/2 · (1 − tanh² t) · √(2/π) · (1 + 3·0.044715 e²)
    """
    if activation == "silu":
        sig = 1 / (1 + _exp_minus(e))
        return e * sig, sig * (1 + e * (1 - sig))
    if activation == "gelu":
        cdf = 0.5 * (1 + _erf(e * _SQRT_HALF))
        return e * cdf, cdf + e * (_INV_SQRT_2PI * np.exp(-0.5 * e * e))
    t = np.tanh(_SQRT_2_OVER_PI * (e + _GELU_TANH_C * e**3))
    dt = (1 - t * t) * (_SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * e * e))
    return 0.5 * e * (1 + t), 0.5 * (1 + t) + 0.5 * e * dt


def gated_product(e, u, activation, backend="numpy"):
    """z = act(e) ⊙ u, (N, hidden); the numba backend makes one pass (``lora_numba``)."""
    if backend == "numba":
        return lora_numba.gated_forward(e, u, ACTIVATIONS.index(activation))
    return activation_forward(e, activation) * u


def gated_backward(dz, e, u, activation, backend="numpy"):
    """The gated product's backward: (de, du) = (dz ⊙ u ⊙ act'(e), dz ⊙ act(e)), (N, hidden)
    each; the numba backend makes one pass over dz, e and u (``lora_numba``)."""
    if backend == "numba":
        return lora_numba.gated_backward(dz, e, u, ACTIVATIONS.index(activation))
    act, dact = activation_derivative(e, activation)
    return dz * u * dact, dz * act


# -- validation --------------------------------------------------------------------------------

def _count(seq, name):
    if isinstance(seq, np.ndarray) or not isinstance(seq, Sequence) or isinstance(seq, str):
        raise TypeError(f"{name} must be a list or tuple of arrays (one per projection), got "
                        f"{type(seq).__name__}")
    return len(seq)


def _per_projection(value, P, name, *, required=False):
    """``value`` as a tuple of P entries: a sequence of P, or one value for every projection
    (None for none). A sequence of another length is a ValueError naming it."""
    if isinstance(value, (list, tuple)):
        if len(value) != P:
            raise ValueError(f"{name} has {len(value)} entries but there are {P} projections "
                             f"(W, A and B have {P})")
        return tuple(value)
    if value is None and required:
        raise TypeError(f"{name} is required")
    return (value,) * P


def _scalings(scaling, P, name="scaling"):
    """The P scalings as a tuple: a list, tuple or 1-D NumPy array of P reals, or one real
    (a 0-d array is one value) for every projection or adapter. Each entry is checked by the
    layer (``check_scaling``); an array of another dtype or rank is a TypeError naming it."""
    if isinstance(scaling, np.ndarray):
        if scaling.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold real numbers, got an array of dtype "
                            f"{scaling.dtype}")
        if scaling.ndim > 1:
            raise TypeError(f"{name} must be one real number or a 1-D array of {P} (one per "
                            f"projection or adapter), got an array of shape {scaling.shape}")
        scaling = scaling[()] if scaling.ndim == 0 else scaling.tolist()  # NumPy scalar, list
    return _per_projection(scaling, P, name, required=True)


def _projections(W, A, B):
    """The number of projections (at least one), checking that W, A and B are sequences of
    one length."""
    counts = {"W": _count(W, "W"), "A": _count(A, "A"), "B": _count(B, "B")}
    if len(set(counts.values())) != 1:
        raise ValueError(f"W, A and B must have one entry per projection, got "
                         f"{', '.join(f'{k} {v}' for k, v in counts.items())}")
    if counts["W"] < 1:
        raise ValueError("W, A and B need at least one entry")
    return counts["W"]


def _upstream(dys, P, shapes, dtype, names):
    """The block's upstream gradients as a tuple of P plain arrays, checked against the
    forward's outputs."""
    if _count(dys, "dys") != P:
        raise ValueError(f"dys has {len(dys)} entries but the forward pass made {P} outputs")
    return tuple(_check_dy_named(dy, shape, dtype, name)
                 for dy, shape, name in zip(dys, shapes, names, strict=True))


def _check_dy_named(dy, shape, dtype, name):
    try:
        return check_dy(dy, shape, dtype)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


# -- projections sharing an input ----------------------------------------------------------------

class QKVCache(NamedTuple):
    """What ``lora_qkv_backward`` needs: one LoRACache per projection."""

    caches: tuple  # P LoRACaches (each holds views of x, W_j, A_j, B_j and h_j = x_dj A_jᵀ)
    y_shapes: tuple  # the P outputs' shapes
    dtype: np.dtype


class BlockGrads(NamedTuple):
    """Gradients of a block: dx, and per projection dA, dB (and dW, dbias when asked for)."""

    dx: np.ndarray | None  # (..., d_in)
    dA: tuple  # (r_j, d_in) per projection
    dB: tuple  # (d_j, r_j) per projection
    dW: tuple | None  # W_j's layout per projection
    dbias: tuple | None  # (d_j,) per projection (None for a projection without bias)


def lora_qkv_forward(x, W, A, B, *, scaling, bias=None, dropout_mask=None, backend=None):
    """P LoRA projections of one input (q, k, v: P = 3), forward.

    Parameters
    ----------
    x : (..., d_in)
    W, A, B : sequences of P ≥ 1 arrays: W[j] (d_j, d_in), A[j] (r_j, d_in), B[j] (d_j, r_j)
    scaling : one float for all, or P of them (a list, tuple or 1-D array)
    bias : None, one (d_j,) array per projection in a sequence of P (entries may be None)
    dropout_mask : None, one array broadcastable to x for all, or a sequence of P (entries may be
        None): PEFT draws each projection's dropout separately
    backend : "numpy", "numba" or None

    Returns
    -------
    ys : tuple of P new arrays (..., d_j), y_j = x W_jᵀ + bias_j + s_j·(x_dj A_jᵀ) B_jᵀ
    cache : QKVCache for ``lora_qkv_backward``
    """
    P = _projections(W, A, B)
    scalings = _scalings(scaling, P)
    if bias is not None and not isinstance(bias, (list, tuple)):
        raise TypeError("bias must be None or a list or tuple of one array (or None) per "
                        "projection")
    biases = _per_projection(bias, P, "bias")
    masks = _per_projection(dropout_mask, P, "dropout_mask")
    merge = _weights_are_small(x, W, sum(_rows(w) for w in W))
    return _shared_input_forward(x, W, A, B, scalings, biases, masks, resolve_backend(backend),
                                 merge)


def _rows(a):
    """a.shape[0] for a 2-D array, else 0 (the layer's validation names what is wrong)."""
    return a.shape[0] if isinstance(a, np.ndarray) and a.ndim == 2 else 0


def _weights_are_small(x, W, per_row):
    """Whether the block's projections merge their weights (``lora_forward``'s
    ``merge_weight``): when the largest weight is at most an eighth of the activations the
    block makes and keeps, N·(d_in + per_row) numbers (its outputs, what its cache keeps and
    dx): the single layer's size rule (a kept weight at most an eighth of y and dx) with the
    block's activations."""
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        return False  # the layer's validation names what is wrong
    N = math.prod(x.shape[:-1])
    largest = max(w.size if isinstance(w, np.ndarray) else 0 for w in W)
    return 8 * largest <= N * (x.shape[-1] + per_row)


def _shared_input_forward(x, W, A, B, scalings, biases, masks, backend, merge):
    """``lora_qkv_forward`` after its arguments are checked: (ys, QKVCache)."""
    ys, caches = [], []
    for j in range(len(W)):
        try:
            y, cache = lora_forward(x, W[j], A[j], B[j], scaling=scalings[j], bias=biases[j],
                                    dropout_mask=masks[j], backend=backend, merge_weight=merge)
        except (TypeError, ValueError) as e:
            raise type(e)(f"projection {j}: {e}") from None
        ys.append(y)
        caches.append(cache)
    return tuple(ys), QKVCache(tuple(caches), tuple(y.shape for y in ys), ys[0].dtype)


def lora_qkv_backward(dys, cache, *, need_dx=True, need_dW=False, need_dbias=False):
    """P LoRA projections of one input, backward.

    Parameters
    ----------
    dys : sequence of P arrays (..., d_j), the upstream gradients of the forward's ys
    cache : QKVCache from ``lora_qkv_forward``

    Returns
    -------
    BlockGrads: dx (..., d_in) = Σ_j dx_j; dA, dB tuples of P; dW, dbias tuples of P or None
    """
    if type(cache) is not QKVCache:
        raise TypeError(f"cache must be the QKVCache from lora_qkv_forward, got "
                        f"{type(cache).__name__}")
    P = len(cache.caches)
    dys = _upstream(dys, P, cache.y_shapes, cache.dtype, [f"dys[{j}]" for j in range(P)])
    grads = [_projection_backward(dys[j], cache.caches[j], need_dx, need_dW, need_dbias, j)
             for j in range(P)]
    return _block_grads(grads, need_dx, need_dW, need_dbias)


def _projection_backward(dy, cache, need_dx, need_dW, need_dbias, j):
    has_bias = getattr(cache, "has_bias", False)
    try:
        return lora_backward(dy, cache, need_dx=need_dx, need_dW=need_dW,
                             need_dbias=bool(need_dbias) and has_bias)
    except (TypeError, ValueError, RuntimeError) as e:
        raise type(e)(f"projection {j}: {e}") from None


def _block_grads(grads, need_dx, need_dW, need_dbias, inputs=None):
    """BlockGrads from per-projection LoRAGrads; dx sums the dx of the projections that read
    the block's input (the first ``inputs``, default all)."""
    dx = None
    if need_dx:
        readers = grads[:inputs]
        dx = readers[0].dx  # (..., d_in), lora_backward's new array: summed into in place
        for g in readers[1:]:
            dx += g.dx
    return BlockGrads(dx, tuple(g.dA for g in grads), tuple(g.dB for g in grads),
                      tuple(g.dW for g in grads) if need_dW else None,
                      tuple(g.dbias for g in grads) if need_dbias else None)


# -- the gated MLP ---------------------------------------------------------------------------------

class MLPCache(NamedTuple):
    """What ``lora_mlp_backward`` needs: gate's and up's caches, down's (with its input z), e
    and u, and the activation. Keeping z costs N × hidden numbers and saves the backward a
    pass of the activation over them (issue 18's training step: 2% of its time)."""

    gate_up: QKVCache  # gate and up: views of x and their weights, h_gate, h_up
    down: object  # down's LoRACache: z, its weights, h_down
    e: np.ndarray  # (N, hidden) gate's output
    u: np.ndarray  # (N, hidden) up's output
    activation: str
    y_shape: tuple


def lora_mlp_forward(x, W, A, B, *, scaling, activation="silu", bias=None, dropout_mask=None,
                     backend=None):
    """The gated MLP with a LoRA adapter on each of gate, up and down, forward.

    Parameters
    ----------
    x : (..., d_in)
    W, A, B : triples (gate, up, down): W[0], W[1] (hidden, d_in), W[2] (d_out, hidden);
        A[j], B[j] the adapters' (r_j, d_in_j), (d_out_j, r_j)
    scaling : one float for all, or a triple (a list, tuple or 1-D array)
    activation : "silu" (SwiGLU), "gelu" (erf) or "gelu_tanh"
    bias : None or a triple (entries may be None)
    dropout_mask : None or a triple (entries may be None): gate's and up's broadcastable to x,
        down's to z (..., hidden); PEFT applies each projection's dropout to its own input
    backend : "numpy", "numba" or None

    Returns
    -------
    y : (..., d_out), y = down(act(gate(x)) ⊙ up(x))
    cache : MLPCache for ``lora_mlp_backward``
    """
    if _projections(W, A, B) != 3:
        raise ValueError(f"W, A and B must be triples (gate, up, down), got {len(W)} entries")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    scalings = _scalings(scaling, 3)
    if bias is not None and not isinstance(bias, (list, tuple)):
        raise TypeError("bias must be None or a triple (gate, up, down), entries may be None")
    biases = _per_projection(bias, 3, "bias")
    if dropout_mask is not None and not isinstance(dropout_mask, (list, tuple)):
        raise TypeError("dropout_mask must be None or a triple (gate, up, down): down's mask "
                        "has z's shape, not x's")
    masks = _per_projection(dropout_mask, 3, "dropout_mask")
    backend = resolve_backend(backend)
    # the block makes and keeps e, u, z (hidden each), y (d_out) and dx per row
    merge = _weights_are_small(x, W, 3 * _rows(W[0]) + _rows(W[2]))
    (e, u), gate_up = _shared_input_forward(x, W[:2], A[:2], B[:2], scalings[:2], biases[:2],
                                            masks[:2], backend, merge)  # (..., hidden) each
    if e.shape != u.shape:
        raise ValueError(f"gate and up must have one output size (hidden), got gate "
                         f"{e.shape[-1]} and up {u.shape[-1]}")
    hidden = e.shape[-1]
    z = gated_product(e.reshape(-1, hidden), u.reshape(-1, hidden), activation,
                      backend).reshape(e.shape)  # (..., hidden)
    try:
        y, down = lora_forward(z, W[2], A[2], B[2], scaling=scalings[2], bias=biases[2],
                               dropout_mask=masks[2], backend=backend,
                               merge_weight=merge)  # (..., d_out)
    except (TypeError, ValueError) as err:
        raise type(err)(f"down projection: {err}") from None
    return y, MLPCache(gate_up, down, e, u, activation, y.shape)


def lora_mlp_backward(dy, cache, *, need_dx=True, need_dW=False, need_dbias=False):
    """The gated MLP with LoRA adapters, backward.

    Returns
    -------
    BlockGrads: dx (..., d_in); dA, dB (gate, up, down); dW, dbias triples or None

    Notes
    -----
    dz = down's dx (down's cache keeps z); act(e) and act'(e) recomputed from e;
    de = dz ⊙ u ⊙ act'(e), du = dz ⊙ act(e); dx = gate's dx + up's dx.
    """
    if type(cache) is not MLPCache or type(cache.gate_up) is not QKVCache \
            or cache.activation not in ACTIVATIONS:
        raise TypeError(f"cache must be the MLPCache from lora_mlp_forward, got "
                        f"{type(cache).__name__}")
    e, u = cache.e, cache.u
    if not is_plain(e) or not is_plain(u) or e.shape != u.shape \
            or e.shape != cache.gate_up.y_shapes[0] or e.dtype != cache.gate_up.dtype \
            or u.dtype != e.dtype:
        raise ValueError("the cache's e and u are not the forward pass's: the cache was "
                         "modified after the forward pass")
    dy = check_dy(dy, cache.y_shape, e.dtype)
    hidden = e.shape[-1]
    e2, u2 = e.reshape(-1, hidden), u.reshape(-1, hidden)  # (N, hidden)
    backend = cache.down.backend
    # down's backward (its cache keeps z, its input) gives dz; the activation's pass needs dz
    g_down = _projection_backward(dy, cache.down, True, need_dW, need_dbias, 2)
    dz2 = g_down.dx.reshape(-1, hidden)  # (N, hidden)
    de, du = gated_backward(dz2, e2, u2, cache.activation, backend)
    g_gate = _projection_backward(de.reshape(e.shape), cache.gate_up.caches[0], need_dx,
                                  need_dW, need_dbias, 0)
    g_up = _projection_backward(du.reshape(e.shape), cache.gate_up.caches[1], need_dx, need_dW,
                                need_dbias, 1)
    return _block_grads([g_gate, g_up, g_down], need_dx, need_dW, need_dbias, inputs=2)


# -- K adapters on one layer -----------------------------------------------------------------------

class MultiLoRACache(NamedTuple):
    """What ``multi_lora_backward`` needs: one LoRACache per adapter (the layer on its own
    tokens, checked by ``lora_backward`` as any layer's), the rows of each and of the base
    tokens, and x and W for the frozen layer's gradients."""

    caches: tuple  # K LoRACaches: adapter k's layer on its tokens x[rows[k]] (n_k, d_in)
    rows: tuple  # K int64 arrays: the rows of x that use adapter k, in token order
    base: np.ndarray  # int64: the rows with adapter −1 (the frozen layer alone)
    x: np.ndarray  # (N, d_in), a new view of x
    W: np.ndarray  # (d_out, d_in), or (d_in, d_out) when fan_in_fan_out
    x_shape: tuple  # (..., d_in)
    has_bias: bool
    fan_in_fan_out: bool


class MultiLoRAGrads(NamedTuple):
    """Gradients of ``multi_lora_forward``: dA and dB are lists of K."""

    dx: np.ndarray | None  # (..., d_in)
    dA: list  # K arrays (r_k, d_in), zeros for an adapter no token used
    dB: list  # K arrays (d_out, r_k)
    dW: np.ndarray | None  # W's layout
    dbias: np.ndarray | None  # (d_out,)


def _adapter_rows(adapter_index, lead_shape, K):
    """The rows of each adapter and then of the base tokens (−1), each in token order (a
    stable sort groups them once): K + 1 int64 arrays."""
    index = plain_array(adapter_index, "adapter_index")
    if index.dtype.kind not in "iu":
        raise TypeError(f"adapter_index must hold integers, got dtype {index.dtype}")
    if index.shape != lead_shape:
        raise ValueError(f"adapter_index must have x's leading shape {lead_shape}, got "
                         f"{index.shape}")
    flat = index.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -1 or flat.max() >= K):
        bad = flat[(flat < -1) | (flat >= K)]
        raise ValueError(f"adapter_index holds {int(bad[0])}: adapters are numbered 0 to "
                         f"{K - 1}, and -1 means the base layer alone")
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(-1, K + 1))  # −1 first, then 0 … K−1
    groups = [order[bounds[k]:bounds[k + 1]] for k in range(K + 1)]
    return tuple(groups[1:]), groups[0]


def _take(a, rows):
    """a's rows ``rows`` (sorted): a view when they are one run of consecutive rows (each
    sample with its adapter, as PEFT's mixed batches give), else a gathered copy."""
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return a[int(rows[0]):int(rows[-1]) + 1]  # (n, d), a view
    return a[rows]  # (n, d), a copy


def _multi_forward_layers(x2, W, A, B, scalings, bias, mask, rows, base, fan_in_fan_out):
    """The reference (backend "numpy"): adapter k's tokens through one LoRA layer
    (``lora_forward``, which validates them and keeps its own cache), the base tokens through
    the frozen layer alone. Returns y (N, d_out) and the K LoRACaches."""
    d_out = W.shape[1] if fan_in_fan_out else W.shape[0]
    y = np.empty((x2.shape[0], d_out), x2.dtype)  # (N, d_out)
    caches = []
    for k in range(len(A)):
        try:
            y_k, cache_k = lora_forward(
                _take(x2, rows[k]), W, A[k], B[k], scaling=scalings[k], bias=bias,
                dropout_mask=None if mask is None else _take(mask, rows[k]),
                fan_in_fan_out=fan_in_fan_out, backend="numpy")  # (n_k, d_out)
        except (TypeError, ValueError) as e:
            raise type(e)(f"adapter {k}: {e}") from None
        y[rows[k]] = y_k
        caches.append(cache_k)
    x_base = x2[base]  # (n_base, d_in)
    y[base] = x_base @ W if fan_in_fan_out else x_base @ W.T  # (n_base, d_out), frozen alone
    if bias is not None:
        y[base] += bias
    return y, caches


def _multi_forward_fused(x2, W, A, B, scalings, bias, mask, rows, fan_in_fan_out):
    """The fast route (backend "numba"): the frozen product once over every token (one large
    BLAS call), then each adapter's low-rank update on its gathered tokens, whose gathered x
    (and mask) its LoRACache keeps for the backward (checked there by ``_check_cache``):
        y = x Wᵀ + bias;   h_k = x_d[rows_k] A_kᵀ;   y[rows_k] += h_k (s_k·B_k)ᵀ."""
    y = x2 @ W if fan_in_fan_out else x2 @ W.T  # (N, d_out), the frozen layer on every token
    if bias is not None:
        y += bias
    caches = []
    for k in range(len(A)):
        try:
            _, v = check_dtypes(x=x2, A=A[k], B=B[k])
            check_layer_shapes(x2, W, v["A"], v["B"], fan_in_fan_out=fan_in_fan_out)
        except (TypeError, ValueError) as e:
            raise type(e)(f"adapter {k}: {e}") from None
        x_k = _take(x2, rows[k])  # (n_k, d_in)
        mask_k = None if mask is None else _take(mask, rows[k])  # (n_k, d_in)
        h = x_k @ v["A"].T if mask_k is None else (x_k * mask_k) @ v["A"].T  # (n_k, r_k)
        y[rows[k]] += h @ (scalings[k] * v["B"]).T  # (n_k, d_out)
        caches.append(LoRACache(x_k, W, v["A"].view(), v["B"].view(), scalings[k], mask_k, h,
                                fan_in_fan_out, x_k.shape, bias is not None, "numba"))
    return y, caches


def multi_lora_forward(x, W, A, B, adapter_index, *, scaling, bias=None, dropout_mask=None,
                       fan_in_fan_out=False, backend=None):
    """K LoRA adapters on one frozen layer, each token with its own, forward.

    Parameters
    ----------
    x : (..., d_in);  W : (d_out, d_in) ((d_in, d_out) with fan_in_fan_out)
    A, B : sequences of K ≥ 1: A[k] (r_k, d_in), B[k] (d_out, r_k) (ranks may differ)
    adapter_index : integers shaped like x's leading dimensions: the adapter of each token,
        −1 for the base layer alone (PEFT's "__base__", punica's −1)
    scaling : one float, or K of them (a list, tuple or 1-D array)
    bias : (d_out,) or None;  dropout_mask : broadcastable to x, or None
    backend : "numpy", "numba" or None. "numpy", the reference: adapter k's tokens through one
        LoRA layer (``lora_forward``) each. "numba", the fast route: the frozen product once
        over every token (one large BLAS call) and each adapter's low-rank update on its
        gathered tokens (docs/performance.md, issue 20)

    Returns
    -------
    y : (..., d_out), a new array
    cache : MultiLoRACache for ``multi_lora_backward``

    Notes
    -----
    y[rows_k] = x[rows_k] Wᵀ + bias + s_k · (x_d[rows_k] A_kᵀ) B_kᵀ,   y[base] = x[base] Wᵀ + bias.
    """
    if _count(A, "A") != _count(B, "B") or len(A) < 1:
        raise ValueError(f"A and B must have one entry per adapter (at least one), got "
                         f"A {len(A)} and B {len(B)}")
    K = len(A)
    scalings = tuple(check_scaling(s, "scaling") for s in _scalings(scaling, K))
    fan_in_fan_out = bool(fan_in_fan_out)
    try:  # x, W, bias and the mask, once, by the core's own check (with adapter 0)
        _, d_out, backend, v = _prepare(x, W, A[0], B[0], None, scalings[0], bias,
                                        dropout_mask, fan_in_fan_out, backend)
    except (TypeError, ValueError) as e:
        raise type(e)(f"adapter 0: {e}") from None
    x2, mask, W = v["x"], v["mask"], v["W"]  # (N, d_in), (N, d_in) or None, new views
    rows, base = _adapter_rows(adapter_index, x.shape[:-1], K)
    if backend == "numba":
        y, caches = _multi_forward_fused(x2, W, A, B, scalings, v["bias"], mask, rows,
                                         fan_in_fan_out)
    else:
        y, caches = _multi_forward_layers(x2, W, A, B, scalings, v["bias"], mask, rows, base,
                                          fan_in_fan_out)
    cache = MultiLoRACache(tuple(caches), rows, base, x2, W, x.shape, bias is not None,
                           fan_in_fan_out)
    return y.reshape(x.shape[:-1] + (d_out,)), cache


def _check_multi_cache(cache):
    """The block's own fields as the forward made them (each adapter's LoRACache is checked by
    ``lora_backward``, the core's ``_check_cache``); returns d_out, or raises."""
    if type(cache) is not MultiLoRACache:
        raise TypeError(f"cache must be the MultiLoRACache from multi_lora_forward, got "
                        f"{type(cache).__name__}")
    x, W = cache.x, cache.W
    if type(cache.caches) is not tuple or type(cache.rows) is not tuple \
            or len(cache.rows) != len(cache.caches) or not is_plain(x) or x.ndim != 2 \
            or x.dtype not in FLOAT_DTYPES or not is_plain(W) or W.ndim != 2 \
            or W.dtype != x.dtype or type(cache.fan_in_fan_out) is not bool \
            or type(cache.has_bias) is not bool or type(cache.x_shape) is not tuple \
            or not cache.x_shape or cache.x_shape[-1] != x.shape[1] \
            or math.prod(cache.x_shape[:-1]) != x.shape[0]:
        raise ValueError("the cache was modified after the forward pass")
    N = x.shape[0]
    seen = 0
    for rows, c in zip(cache.rows + (cache.base,), cache.caches + (None,), strict=True):
        if not is_plain(rows) or rows.dtype != np.int64 or rows.ndim != 1 \
                or (rows.size and (rows.min() < 0 or rows.max() >= N)) \
                or (c is not None and (type(c) is not LoRACache or not is_plain(c.x)
                                       or c.x.shape[0] != rows.size)):
            raise ValueError("the cache's rows were modified after the forward pass")
        seen += rows.size
    if seen != N:
        raise ValueError("the cache's rows were modified after the forward pass")
    return W.shape[1] if cache.fan_in_fan_out else W.shape[0]


def _multi_backward_layers(dy2, cache, need_dx):
    """The reference's backward: each adapter's layer's (``lora_backward``) on its tokens' dy,
    dx[base] = dy[base] W. Returns dx (N, d_in) or None, dA and dB lists of K."""
    x2, W = cache.x, cache.W
    dx = np.empty(x2.shape, x2.dtype) if need_dx else None  # (N, d_in)
    dA, dB = [], []
    for k, (rows, cache_k) in enumerate(zip(cache.rows, cache.caches, strict=True)):
        try:
            g = lora_backward(_take(dy2, rows), cache_k, need_dx=need_dx)
        except (TypeError, ValueError, RuntimeError) as e:
            raise type(e)(f"adapter {k}: {e}") from None
        if need_dx:
            dx[rows] = g.dx  # (n_k, d_in)
        dA.append(g.dA)
        dB.append(g.dB)
    if need_dx:
        dy_base = dy2[cache.base]  # (n_base, d_out)
        dx[cache.base] = dy_base @ W.T if cache.fan_in_fan_out else dy_base @ W
    return dx, dA, dB


def _multi_backward_fused(dy2, cache, need_dx):
    """The fast route's backward: dx = dy W once over every token, then per adapter, on its
    gathered tokens (each LoRACache checked by the core's ``_check_cache`` first):
        g = dy_k B_k;  dB_k = s_k·dy_kᵀ h_k;  dA_k = s_k·gᵀ x_d,k;
        dx[rows_k] += s_k·(g A_k) ⊙ mask_k."""
    from minilora.ops.functional import _check_cache

    W = cache.W
    dx = None
    if need_dx:
        dx = dy2 @ W.T if cache.fan_in_fan_out else dy2 @ W  # (N, d_in), one BLAS call
    dA, dB = [], []
    for k, (rows, c) in enumerate(zip(cache.rows, cache.caches, strict=True)):
        try:
            _check_cache(c, LoRACache)
        except (TypeError, ValueError, RuntimeError) as e:
            raise type(e)(f"adapter {k}: {e}") from None
        dy_k = _take(dy2, rows)  # (n_k, d_out)
        x_d = c.x if c.mask is None else c.x * c.mask  # (n_k, d_in)
        g = dy_k @ c.B  # (n_k, r_k)
        dB.append(c.scaling * (dy_k.T @ c.h))  # (d_out, r_k)
        dA.append(c.scaling * (g.T @ x_d))  # (r_k, d_in)
        if need_dx:
            lora_dx = (c.scaling * g) @ c.A  # (n_k, d_in)
            dx[rows] += lora_dx if c.mask is None else lora_dx * c.mask
    return dx, dA, dB


def multi_lora_backward(dy, cache, *, need_dx=True, need_dW=False, need_dbias=False):
    """K LoRA adapters on one frozen layer, backward.

    Returns
    -------
    MultiLoRAGrads: dx (..., d_in); dA, dB lists of K (zeros for an adapter no token used);
    dW (W's layout) and dbias (d_out,) when asked for

    Notes
    -----
    Each adapter's layer's backward (``lora_backward``) on its tokens' dy:
        dA_k = s_k · Σ_{n: k} g_nᵀ x_dn,  dB_k = s_k · Σ_{n: k} dy_nᵀ h_n,
        dx[rows_k] = dy[rows_k] W + s_k · (g A_k) ⊙ mask;   dx[base] = dy[base] W;
    dW = dyᵀ x and dbias = Σ_n dy over every token.
    """
    d_out = _check_multi_cache(cache)
    x2 = cache.x
    dy = check_dy(dy, cache.x_shape[:-1] + (d_out,), x2.dtype)
    if need_dbias and not cache.has_bias:
        raise ValueError("need_dbias=True but the forward pass had no bias")
    dy2 = dy.reshape(x2.shape[0], d_out)  # (N, d_out)
    if cache.caches[0].backend == "numba":  # the route the forward took (any is checked)
        dx, dA, dB = _multi_backward_fused(dy2, cache, need_dx)
    else:
        dx, dA, dB = _multi_backward_layers(dy2, cache, need_dx)
    dW, dbias = frozen_grads(dy2, x2, cache.fan_in_fan_out, need_dW, need_dbias)
    return MultiLoRAGrads(None if dx is None else dx.reshape(cache.x_shape), dA, dB, dW, dbias)


__all__ = ["ACTIVATIONS", "BlockGrads", "MLPCache", "MultiLoRACache", "MultiLoRAGrads",
           "QKVCache", "activation_derivative", "activation_forward", "gated_backward",
           "gated_product", "lora_mlp_backward", "lora_mlp_forward", "lora_qkv_backward",
           "lora_qkv_forward", "multi_lora_backward", "multi_lora_forward"]
