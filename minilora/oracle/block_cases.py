"""Oracle cases for the fused blocks (``minilora.blocks``): their tensors, reference, shapes
and the magnitudes of their sums.

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

from minilora import blocks
from minilora._checks import check_layer_shapes
from minilora.tolerance import lora_magnitudes, lora_reduction_lengths

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


def _optional(t, name, P):
    values = [t.get(f"{name}.{j}") for j in range(P)]
    return None if all(v is None for v in values) else values


def block_of(names):
    """The block a case's tensor names describe (None for a single layer)."""
    if "adapter_index" in names:
        return "multi"
    if "dy.0" in names:
        return "qkv"
    return "mlp" if "W.0" in names else None


def count(case):
    """P (projections) or K (adapters)."""
    return len(indexed(case.tensors, "A"))


def evaluate(case, backend):
    """Every output of a block case, in the dtype of its tensors."""
    t, n = case.tensors, count(case)
    s = list(case.scaling)
    need = dict(need_dx=True, need_dW=True)
    if case.block == "qkv":
        ys, cache = blocks.lora_qkv_forward(
            t["x"], indexed(t, "W"), indexed(t, "A"), indexed(t, "B"), scaling=s,
            bias=_optional(t, "bias", n), dropout_mask=_optional(t, "dropout_mask", n),
            backend=backend)
        g = blocks.lora_qkv_backward(indexed(t, "dy"), cache, **need,
                                     need_dbias=_optional(t, "bias", n) is not None)
        out = {f"y.{j}": y for j, y in enumerate(ys)}
    elif case.block == "mlp":
        y, cache = blocks.lora_mlp_forward(
            t["x"], indexed(t, "W"), indexed(t, "A"), indexed(t, "B"), scaling=s,
            activation=case.activation, bias=_optional(t, "bias", 3),
            dropout_mask=_optional(t, "dropout_mask", 3), backend=backend)
        g = blocks.lora_mlp_backward(t["dy"], cache, **need,
                                     need_dbias=_optional(t, "bias", 3) is not None)
        out = {"y": y}
    else:
        y, cache = blocks.multi_lora_forward(
            t["x"], t["W"], indexed(t, "A"), indexed(t, "B"), t["adapter_index"], scaling=s,
            bias=t.get("bias"), dropout_mask=t.get("dropout_mask"),
            fan_in_fan_out=case.fan_in_fan_out, backend=backend)
        g = blocks.multi_lora_backward(t["dy"], cache, **need, need_dbias="bias" in t)
        out = {"y": y, "dx": g.dx, **{f"dA.{k}": a for k, a in enumerate(g.dA)},
               **{f"dB.{k}": b for k, b in enumerate(g.dB)}, "dW": g.dW}
        if "bias" in t:
            out["dbias"] = g.dbias
        return out
    out["dx"] = g.dx
    for j in range(len(g.dA)):
        out[f"dA.{j}"], out[f"dB.{j}"], out[f"dW.{j}"] = g.dA[j], g.dB[j], g.dW[j]
        if g.dbias is not None and g.dbias[j] is not None:
            out[f"dbias.{j}"] = g.dbias[j]
    return out


def shapes(case):
    """Every output's shape, in the canonical order, checking the case's shapes on the way
    (ValueError naming what is wrong)."""
    t = case.tensors
    x = t["x"]
    lead = x.shape[:-1]
    n = count(case)
    if n < 1 or len(indexed(t, "B")) != n:
        raise ValueError(f"a {case.block} case needs A.0, B.0, ... with one B.j per A.j")
    if case.block == "multi":
        for k in range(n):
            check_layer_shapes(x, t["W"], t[f"A.{k}"], t[f"B.{k}"],
                               fan_in_fan_out=case.fan_in_fan_out, bias=t.get("bias"),
                               dropout_mask=t.get("dropout_mask"))
        index = t.get("adapter_index")
        if index is None or index.shape != lead or index.dtype.kind not in "iu":
            raise ValueError(f"adapter_index must be integers shaped like x's leading "
                             f"dimensions {lead}")
        d_out = t["W"].shape[0 if not case.fan_in_fan_out else 1]
        out = {"y": lead + (d_out,), "dx": x.shape}
        out |= {f"dA.{k}": t[f"A.{k}"].shape for k in range(n)}
        out |= {f"dB.{k}": t[f"B.{k}"].shape for k in range(n)}
        out["dW"] = t["W"].shape
        if "bias" in t:
            out["dbias"] = t["bias"].shape
        return out
    if len(indexed(t, "W")) != n or (case.block == "mlp" and n != 3):
        raise ValueError(f"a {case.block} case needs W.j, A.j, B.j for every projection"
                         f"{' (gate, up, down)' if case.block == 'mlp' else ''}")
    inputs = [x] * n
    if case.block == "mlp":
        hidden = t["W.0"].shape[0]
        if t["W.1"].shape[0] != hidden:
            raise ValueError(f"gate and up must have one hidden size, got W.0 {t['W.0'].shape} "
                             f"and W.1 {t['W.1'].shape}")
        inputs[2] = np.broadcast_to(np.zeros((), x.dtype), lead + (hidden,))  # z's shape
    outs = []
    for j in range(n):
        _, d_j, _ = check_layer_shapes(inputs[j], t[f"W.{j}"], t[f"A.{j}"], t[f"B.{j}"],
                                       fan_in_fan_out=False, bias=t.get(f"bias.{j}"),
                                       dropout_mask=t.get(f"dropout_mask.{j}"))
        outs.append(lead + (d_j,))
    out = {"y": outs[2]} if case.block == "mlp" else {f"y.{j}": o for j, o in enumerate(outs)}
    out["dx"] = x.shape
    out |= {f"dA.{j}": t[f"A.{j}"].shape for j in range(n)}
    out |= {f"dB.{j}": t[f"B.{j}"].shape for j in range(n)}
    out |= {f"dbias.{j}": t[f"bias.{j}"].shape for j in range(n) if f"bias.{j}" in t}
    out |= {f"dW.{j}": t[f"W.{j}"].shape for j in range(n)}
    return out


def upstream_shapes(case):
    """The shapes of the cotangents: dy.j (qkv) or dy."""
    out = shapes(case)
    if case.block == "qkv":
        return {f"dy.{j}": out[f"y.{j}"] for j in range(count(case))}
    return {"dy": out["y"]}


def required(case):
    """The outputs a candidate must give: y (every y.j), dx, and every dA and dB."""
    return [k for k in shapes(case) if k.split(".")[0] in ("y", "dx", "dA", "dB")]


def make(block, *, d_in, d_out, r, batch, seq, alpha, rslora, dropout, bias, fan_in_fan_out,
         hidden=None, activation="silu", adapters=3, rng, draw):
    """The tensors and scalings of a block case, every term of comparable size (see
    ``cases.make_case``); ``draw`` rounds to the case's precision."""
    lead = (batch,) if seq is None else (batch, seq)

    def scaling_of(rank):
        s = alpha / (math.sqrt(rank) if rslora else rank)
        return s if abs(s) != 1.0 else 1.5 * s

    def adapter(d_o, d_i, rank, W):
        A = rng.uniform(-1, 1, (rank, d_i)) / np.sqrt(d_i)  # (r, d_i)
        B = rng.standard_normal((d_o, rank))  # (d_o, r)
        s = scaling_of(rank)
        B *= 1.25 * np.linalg.norm(W) / max(np.linalg.norm(s * B @ A), 1e-300)  # as make_case
        return A, B, s

    def mask(shape):
        keep = rng.random(shape) >= dropout
        if keep.size >= 2:
            keep.flat[rng.choice(keep.size, 2, replace=False)] = (True, False)
        return draw(keep / (1.0 - dropout))

    t = {"x": draw(rng.standard_normal((*lead, d_in)))}
    scalings = []
    if block == "multi":
        W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
        t["W"] = draw(W.T.copy() if fan_in_fan_out else W)
        ranks = [r if k % 2 == 0 else 2 * r for k in range(adapters)]  # r, 2r, r, 2r, ...
        for k in range(adapters):
            A, B, s = adapter(d_out, d_in, ranks[k], W)
            t[f"A.{k}"], t[f"B.{k}"] = draw(A), draw(B)
            scalings.append(s)
        index = rng.integers(-1, adapters, lead)
        if index.size >= adapters + 1:  # every adapter and the base layer present
            index.flat[rng.choice(index.size, adapters + 1, replace=False)] = \
                np.arange(-1, adapters)
        t["adapter_index"] = index.astype(np.int64)
        if bias:
            t["bias"] = draw(0.1 * rng.standard_normal(d_out))
        if dropout > 0:
            t["dropout_mask"] = mask(t["x"].shape)
        t["dy"] = draw(rng.standard_normal((*lead, d_out)))
        return t, tuple(scalings)
    if block == "qkv":
        dims = [(d_out, d_in), (max(1, d_out // 2), d_in), (max(1, d_out // 2), d_in)]
        inputs = [lead + (d_in,)] * 3
    else:
        hidden = hidden or 2 * d_in
        dims = [(hidden, d_in), (hidden, d_in), (d_out, hidden)]
        inputs = [lead + (d_in,)] * 2 + [lead + (hidden,)]
    for j, (d_o, d_i) in enumerate(dims):
        W = rng.standard_normal((d_o, d_i)) / np.sqrt(d_i)
        A, B, s = adapter(d_o, d_i, r, W)
        t[f"W.{j}"], t[f"A.{j}"], t[f"B.{j}"] = draw(W), draw(A), draw(B)
        scalings.append(s)
        if bias:
            t[f"bias.{j}"] = draw(0.1 * rng.standard_normal(d_o))
        if dropout > 0:
            t[f"dropout_mask.{j}"] = mask(inputs[j])
        if block == "qkv":
            t[f"dy.{j}"] = draw(rng.standard_normal(lead + (d_o,)))
    if block == "mlp":
        t["dy"] = draw(rng.standard_normal(lead + (d_out,)))
    return t, tuple(scalings)


# -- magnitudes: each output's bound γ_K·mag (see minilora.tolerance and docs/oracle.md) ---------

def magnitudes(case):
    """``(mags, K)`` for every output of a block case: mag the reference on absolute values
    (through the MLP's activation with its Lipschitz constants), K the length of the sums."""
    t = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in case.tensors.items()}
    x = t["x"]
    N = math.prod(x.shape[:-1])
    n = count(case)
    s = [abs(v) for v in case.scaling]
    if case.block == "multi":
        absolute = case.with_tensors({k: np.abs(v) if v.dtype.kind == "f" else v
                                      for k, v in t.items()}).with_scaling(s)
        mags = evaluate(absolute, "numpy")
        r_max = max(t[f"A.{k}"].shape[0] for k in range(n))
        d_in, d_out = x.shape[-1], t["dy"].shape[-1]
        K = {"y": d_in + r_max + 4, "dx": d_out + r_max + 3, "dW": N, "dbias": N}
        K |= {f"dA.{k}": d_out + N + 2 for k in range(n)}
        K |= {f"dB.{k}": d_in + N + 2 for k in range(n)}
        return mags, K
    if case.block == "qkv":
        mags, K = {"dx": 0.0}, {"dx": 0}
        for j in range(n):
            m, k = _projection(t, j, x, s[j], t[f"dy.{j}"], N)
            mags[f"y.{j}"], K[f"y.{j}"] = m["y"], k["y"]
            mags["dx"] = mags["dx"] + m["dx"]
            K["dx"] = max(K["dx"], k["dx"] + n)
            _grads(mags, K, m, k, j)
        return mags, K
    return _mlp_magnitudes(t, x, s, case.activation, N)


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
