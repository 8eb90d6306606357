"""The fused blocks' cases (``minilora.ops.blocks``): the names of their tensors and the
magnitudes of their sums. (Each block's kind, ``minilora.oracle.kinds``, draws, evaluates and
checks its cases.)

A block case names its per-projection tensors with a suffix (docs/oracle.md lists them):

    qkv    inputs  x, W.j A.j B.j (bias.j dropout_mask.j) dy.j          j = 0 … P−1
           outputs y.j, dx, dA.j, dB.j (dW.j, dbias.j)
    mlp    inputs  x, W.j A.j B.j (bias.j dropout_mask.j) dy            j = 0 gate, 1 up, 2 down
           outputs y, dx, dA.j, dB.j (dW.j, dbias.j)
    multi  inputs  x, W (bias dropout_mask) A.k B.k adapter_index dy    k = 0 … K−1
           outputs y, dx, dA.k, dB.k (dW, dbias)

and carries a scaling per projection or adapter (``case.scaling`` is then a tuple).
"""

import math

import numpy as np

from minilora.oracle.tolerance import lora_magnitudes, lora_reduction_lengths

BLOCKS = ("qkv", "mlp", "multi")
# sup |act'| and sup |act''| over the reals, rounded up (tests/test_oracle_blocks.py checks
# them on a fine grid): the Lipschitz constants the MLP's magnitudes carry through act
ACTIVATION_BOUNDS = {"silu": (1.1, 0.51), "gelu": (1.13, 0.8), "gelu_tanh": (1.13, 0.8)}


def indexed(t, name):
    """[t["name.0"], t["name.1"], ...] for as long as they exist (None entries for an absent
    optional name between present ones are not allowed: every j is given or none is)."""
    out, j = [], 0
    while f"{name}.{j}" in t:
        out.append(t[f"{name}.{j}"])
        j += 1
    return out


def optional(t, name, P):
    """[t["name.0"], ..., t["name.P-1"]] with None for the absent, or None if all are."""
    values = [t.get(f"{name}.{j}") for j in range(P)]
    return None if all(v is None for v in values) else values


# -- magnitudes: each output's bound γ_K·mag (see minilora.oracle.tolerance and docs/oracle.md) ---

def _float64(case):
    return {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
            for k, v in case.tensors.items()}


def qkv_magnitudes(case):
    """``(mags, K)`` for every output of a qkv case: each projection's as a single layer's,
    dx summed over the P projections."""
    t = _float64(case)
    x = t["x"]
    N = math.prod(x.shape[:-1])
    n = len(indexed(t, "A"))
    mags, K = {"dx": 0.0}, {"dx": 0}
    for j in range(n):
        m, k = _projection(t, j, x, abs(case.scaling[j]), t[f"dy.{j}"], N)
        mags[f"y.{j}"], K[f"y.{j}"] = m["y"], k["y"]
        mags["dx"] = mags["dx"] + m["dx"]
        K["dx"] = max(K["dx"], k["dx"] + n)
        _grads(mags, K, m, k, j)
    return mags, K


def mlp_magnitudes(case):
    """``(mags, K)`` for every output of an mlp case (see ``_mlp_magnitudes``)."""
    t = _float64(case)
    x = t["x"]
    return _mlp_magnitudes(t, x, [abs(v) for v in case.scaling], case.activation,
                           math.prod(x.shape[:-1]))


def _projection(t, j, x, s, dy, N, extra_K=0):
    m = lora_magnitudes(x, t[f"W.{j}"], t[f"A.{j}"], t[f"B.{j}"], scaling=s, dy=dy,
                        bias=t.get(f"bias.{j}"), dropout_mask=t.get(f"dropout_mask.{j}"))
    k = lora_reduction_lengths(N, x.shape[-1], t[f"W.{j}"].shape[0], t[f"A.{j}"].shape[0])
    return m, {name: v + extra_K for name, v in k.items()}


def _grads(mags, K, m, k, j, factor=1.0):
    for name in ("dA", "dB", "dW", "dbias"):
        if name in m:
            mags[f"{name}.{j}"], K[f"{name}.{j}"] = factor * m[name], k[name]


def _mlp_magnitudes(t, x, s, activation, N):
    """The MLP's magnitudes, carried through act with L1 = sup|act'|, L2 = sup|act''| and
    |act(e)| ≤ |e|: an error δe moves z = act(e)⊙u by at most L1·|u|·δe, and act'(e) by
    L2·δe. Each stage's mag bounds both its own rounding and the error it inherits, and the
    stages' K add; outputs that inherit an error take twice their stage's mag (own + carried)."""
    L1, L2 = ACTIVATION_BOUNDS[activation]
    zero_dy = [np.zeros(x.shape[:-1] + (t[f"W.{j}"].shape[0],)) for j in range(2)]
    (m_e, k_e), (m_u, k_u) = (_projection(t, j, x, s[j], zero_dy[j], N) for j in range(2))
    mag_e, mag_u = m_e["y"], m_u["y"]  # (..., hidden)
    K_z = max(k_e["y"], k_u["y"]) + 2  # the activation, the product
    mag_z = (L1 + 2) * mag_e * mag_u  # carried (L1·|u|·δe + |act e|·δu) and z's own roundings
    m_d, k_d = _projection(t, 2, mag_z, s[2], t["dy"], N, extra_K=K_z)
    mags, K = {"y": 2 * m_d["y"]}, {"y": k_d["y"]}
    _grads(mags, K, m_d, k_d, 2, factor=2.0)
    if "dbias" in m_d:  # Σ dy: no z in it
        mags["dbias.2"], K["dbias.2"] = m_d["dbias"], N
    mag_dz = m_d["dx"]  # (..., hidden): dy through down alone, no z
    K_dz = k_d["dx"] - K_z
    K_up = max(K_dz, K_z) + 3
    mag_de = (2 * L1 + 1) * mag_dz * mag_u + L2 * mag_dz * mag_u * mag_e
    mag_du = (2 + L1) * mag_dz * mag_e
    mags["dx"], K["dx"] = 0.0, 0
    for j, upstream in ((0, mag_de), (1, mag_du)):
        m, k = _projection(t, j, x, s[j], upstream, N, extra_K=K_up)
        mags["dx"] = mags["dx"] + 2 * m["dx"]
        K["dx"] = max(K["dx"], k["dx"] + 1)
        _grads(mags, K, m, k, j, factor=2.0)
        if "dbias" in m:
            mags[f"dbias.{j}"] = 2 * m["dbias"]
    return mags, K
