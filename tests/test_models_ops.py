"""The transformer's ops (minilora.models: rmsnorm, rope, attention, embedding, lm_loss):
every backward against central differences in float64 (fixed and Hypothesis-drawn shapes),
each forward against a naive transcription of its equation, and the validation at each entry.
torch parity lives in tests/test_models_ops_torch.py."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.models.attention import attention_backward, attention_forward
from minilora.models.embedding import embedding_backward, embedding_forward
from minilora.models.lm_loss import causal_lm_loss, causal_lm_loss_backward, lm_head_loss
from minilora.models.rmsnorm import rmsnorm_backward, rmsnorm_forward
from minilora.models.rope import rope_backward, rope_forward, rope_tables, rotate_half
from minilora.ops.gradcheck import gradcheck

FAST = settings(max_examples=25)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---- pairs in the gradcheck helper's form: forward(**inputs) -> (y, cache), backward(dy, cache)

def _attn_fwd(q, k, v, q_offset, block=64, backend="numpy"):
    return attention_forward(q, k, v, q_offset=q_offset, block=block, backend=backend)


def _attn_bwd(dout, cache):
    dq, dk, dv = attention_backward(dout, cache)
    return {"q": dq, "k": dk, "v": dv}


def _rope_fwd(x, cos, sin, backend="numpy"):
    return rope_forward(x, cos, sin, backend=backend), (cos, sin, backend)


def _rope_bwd(dy, cache):
    cos, sin, backend = cache
    return {"x": rope_backward(dy, cos, sin, backend=backend)}


def _rms_fwd(x, weight, eps, backend="numpy"):
    return rmsnorm_forward(x, weight, eps=eps, backend=backend)


def _rms_bwd(dy, cache):
    return {"x": rmsnorm_backward(dy, cache)}


def _emb_bwd(dh, cache):
    return {"weight": embedding_backward(dh, cache)}


def _loss_fwd(logits, input_ids, ignore_index):
    loss, cache = causal_lm_loss(logits, input_ids, ignore_index=ignore_index)
    return np.array(loss), cache


def _loss_bwd(dloss, cache):
    return {"logits": causal_lm_loss_backward(cache, float(dloss))}


def attention_inputs(B, H, Hkv, T, D, q_offset, seed=0, dtype=np.float64):
    rng = _rng(seed)
    S = q_offset + T
    q = rng.standard_normal((B, H, T, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
    return q, k, v


def naive_attention(q, k, v, q_offset, with_lse=False):
    """Loops over batch and heads, repeat_kv by index, the mask by comparison: the equation.
    With ``with_lse`` also each query row's log Σ exp of its masked scores (B, H, T)."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    out = np.empty_like(q)
    lse = np.empty((B, H, T))
    for b in range(B):
        for j in range(H):
            s = q[b, j] @ k[b, j // g].T / np.sqrt(D)  # (T, S)
            for t in range(T):
                s[t, q_offset + t + 1:] = -np.inf
            mx = s.max(axis=1, keepdims=True)
            p = np.exp(s - mx)
            out[b, j] = (p / p.sum(axis=1, keepdims=True)) @ v[b, j // g]
            lse[b, j] = (mx + np.log(p.sum(axis=1, keepdims=True)))[:, 0]
    return (out, lse) if with_lse else out


# ---- attention

@pytest.mark.parametrize("B,H,Hkv,T,D,q_offset,block", [
    (2, 4, 2, 5, 4, 0, 64),  # GQA, prefill
    (2, 4, 2, 7, 4, 0, 3),  # GQA, three query blocks (the last one short)
    (1, 3, 3, 4, 6, 0, 64),  # MHA
    (1, 3, 3, 4, 6, 0, 1),  # MHA, one query per block
    (2, 4, 1, 3, 4, 4, 64),  # MQA, with a KV cache
    (2, 4, 1, 5, 4, 4, 2),  # MQA, a KV cache and blocks
    (2, 6, 2, 1, 8, 7, 64),  # a one-token decode step
])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_attention_gradcheck_fixed(B, H, Hkv, T, D, q_offset, block, backend):
    q, k, v = attention_inputs(B, H, Hkv, T, D, q_offset, seed=B + H + T)
    report = gradcheck(_attn_fwd, _attn_bwd, {"q": q, "k": k, "v": v, "q_offset": q_offset,
                                              "block": block, "backend": backend},
                       wrt=["q", "k", "v"])
    assert report.passed and report.worst_rel_err < 1e-7


@st.composite
def attention_shapes(draw):
    Hkv = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    T = draw(st.integers(1, 6))
    return dict(B=draw(st.integers(1, 2)), H=g * Hkv, Hkv=Hkv, T=T,
                D=2 * draw(st.integers(1, 3)), q_offset=draw(st.integers(0, 3)),
                block=draw(st.integers(1, 7)))


@FAST
@given(shape=attention_shapes(), seed=st.integers(0, 2**16),
       backend=st.sampled_from(["numpy", "numba"]))
def test_attention_gradcheck_drawn(shape, seed, backend):
    sizes = {key: n for key, n in shape.items() if key != "block"}
    q, k, v = attention_inputs(**sizes, seed=seed)
    gradcheck(_attn_fwd, _attn_bwd, {"q": q, "k": k, "v": v, "q_offset": shape["q_offset"],
                                     "block": shape["block"], "backend": backend},
              wrt=["q", "k", "v"], seed=seed)


@given(shape=attention_shapes(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_attention_numba_equals_numpy(shape, seed, dtype):
    """The kernels' row passes against the NumPy reference's (sums in another order)."""
    sizes = {key: n for key, n in shape.items() if key != "block"}
    q, k, v = attention_inputs(**sizes, seed=seed, dtype=dtype)
    dout = _rng(seed + 1).standard_normal(q.shape).astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    ref = attention_forward(q, k, v, q_offset=shape["q_offset"], block=shape["block"],
                            backend="numpy")
    fast = attention_forward(q, k, v, q_offset=shape["q_offset"], block=shape["block"],
                             backend="numba")
    assert fast[0].dtype == dtype and fast[1].lse.dtype == dtype
    np.testing.assert_allclose(fast[0], ref[0], **tol)
    np.testing.assert_allclose(fast[1].lse, ref[1].lse, **tol)
    for a, b in zip(attention_backward(dout, fast[1]), attention_backward(dout, ref[1]),
                    strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, **tol)


@given(shape=attention_shapes(), seed=st.integers(0, 2**16))
def test_attention_forward_equals_naive(shape, seed):
    sizes = {key: n for key, n in shape.items() if key != "block"}
    q, k, v = attention_inputs(**sizes, seed=seed)
    out, cache = attention_forward(q, k, v, q_offset=shape["q_offset"], block=shape["block"])
    naive, lse = naive_attention(q, k, v, shape["q_offset"], with_lse=True)
    np.testing.assert_allclose(out, naive, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cache.lse.reshape(lse.shape), lse, rtol=1e-13, atol=1e-13)


@given(shape=attention_shapes(), seed=st.integers(0, 2**16))
def test_attention_blocks_equal_one_block(shape, seed):
    """Any query block size gives the single block's results (the order of the sums differs
    only in dk and dv, whose blocks' shares add up)."""
    sizes = {key: n for key, n in shape.items() if key != "block"}
    q, k, v = attention_inputs(**sizes, seed=seed)
    dout = _rng(seed + 1).standard_normal(q.shape)
    one = attention_forward(q, k, v, q_offset=shape["q_offset"], block=q.shape[2])
    many = attention_forward(q, k, v, q_offset=shape["q_offset"], block=shape["block"])
    np.testing.assert_allclose(many[0], one[0], rtol=1e-13, atol=1e-14)
    for a, b in zip(attention_backward(dout, many[1]), attention_backward(dout, one[1]),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_attention_decode_step_equals_full_sequence():
    """A KV cache step (T = 1, q_offset = S − 1) gives the full sequence's last row; a prefix
    of queries (q_offset > 0, T > 1) gives the full sequence's last T rows."""
    q, k, v = attention_inputs(2, 4, 2, 6, 8, 0, seed=3)
    full, _ = attention_forward(q, k, v)
    for T in (1, 3):
        part, _ = attention_forward(q[:, :, -T:].copy(), k, v, q_offset=6 - T)
        np.testing.assert_allclose(part, full[:, :, -T:], rtol=1e-13, atol=1e-14)


def test_attention_float32_is_float32_and_close():
    q, k, v = attention_inputs(2, 4, 2, 5, 8, 2, seed=4)
    out64, c64 = attention_forward(q, k, v, q_offset=2)
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    out32, c32 = attention_forward(q32, k32, v32, q_offset=2)
    dout = _rng(5).standard_normal(out64.shape)
    g64 = attention_backward(dout, c64)
    g32 = attention_backward(dout.astype(np.float32), c32)
    assert out32.dtype == np.float32 and all(g.dtype == np.float32 for g in g32)
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-5)
    for a, b in zip(g32, g64, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_attention_is_stable_for_large_scores():
    q, k, v = attention_inputs(1, 2, 1, 4, 4, 0, seed=6)
    out, _ = attention_forward(q * 1e3, k * 1e3, v)  # exp would overflow without the max
    assert np.all(np.isfinite(out))


def test_attention_leaves_inputs_alone_and_returns_new_arrays():
    q, k, v = attention_inputs(2, 4, 2, 3, 4, 1, seed=7)
    saved = [a.copy() for a in (q, k, v)]
    out, cache = attention_forward(q, k, v, q_offset=1)
    grads = attention_backward(np.ones_like(out), cache)
    for a, b in zip((q, k, v), saved, strict=True):
        np.testing.assert_array_equal(a, b)
    for g in (out, *grads):
        assert not any(np.shares_memory(g, a) for a in (q, k, v))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(q=(1, 3, 2, 4), k=(1, 2, 2, 4)), ValueError, "multiple of Hkv"),
    (dict(q=(1, 2, 2, 4), k=(1, 2, 3, 4)), ValueError, "q_offset \\+ T"),
    (dict(q=(1, 2, 2, 4), k=(2, 2, 2, 4)), ValueError, "B = 1"),
    (dict(q=(2, 2, 4), k=(1, 2, 2, 4)), ValueError, "q must be"),
])
def test_attention_rejects_bad_shapes(kwargs, error, match):
    q = np.zeros(kwargs["q"])
    k = np.zeros(kwargs["k"])
    with pytest.raises(error, match=match):
        attention_forward(q, k, k.copy())


def test_attention_rejects_bad_dtypes_offsets_and_dout():
    q, k, v = attention_inputs(1, 2, 1, 2, 4, 0)
    with pytest.raises(TypeError, match="share one dtype"):
        attention_forward(q, k.astype(np.float32), v)
    with pytest.raises(TypeError, match="dtype int64"):
        attention_forward(q.astype(np.int64), k, v)
    with pytest.raises(ValueError, match="q_offset must be at least 0"):
        attention_forward(q, k, v, q_offset=-1)
    with pytest.raises(TypeError, match="q_offset must be an integer"):
        attention_forward(q, k, v, q_offset=1.0)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        attention_forward(q, k, v, block=0)
    out, cache = attention_forward(q, k, v)
    with pytest.raises(ValueError, match="dout must be float64"):
        attention_backward(out[:, :1], cache)
    with pytest.raises(TypeError, match="AttentionCache"):
        attention_backward(out, (cache.q, cache.k))


# ---- rope

def test_rope_tables_layout():
    cos, sin = rope_tables(np.array([0, 1, 5]), 6, theta=100.0, dtype=np.float64)
    inv_freq = 100.0 ** (-np.arange(0, 6, 2) / 6)  # theta^(−2i/D)
    angles = np.array([0, 1, 5])[:, None] * inv_freq  # (T, D/2)
    np.testing.assert_allclose(cos, np.cos(np.concatenate([angles, angles], 1)), rtol=1e-15)
    np.testing.assert_allclose(sin, np.sin(np.concatenate([angles, angles], 1)), rtol=1e-15)
    cos2, sin2 = rope_tables(np.array([0, 2, 10]), 6, theta=100.0, scaling_factor=2.0,
                             dtype=np.float32)
    assert cos2.dtype == np.float32 and cos2.shape == (3, 6)
    np.testing.assert_allclose(cos2, cos, rtol=1e-6)  # linear scaling: positions / factor
    np.testing.assert_allclose(sin2, sin, rtol=1e-6, atol=1e-7)


def test_rope_is_a_rotation_of_relative_position():
    """q·k after rope depends on the positions only through their difference, and position 0 is
    the identity."""
    rng = _rng(8)
    q, k = rng.standard_normal((2, 1, 1, 1, 8))
    cos, sin = rope_tables(np.arange(12), 8, theta=10000.0, dtype=np.float64)

    def at(x, p):
        return rope_forward(x, cos[p:p + 1], sin[p:p + 1])[0, 0, 0]

    np.testing.assert_allclose(at(q, 0), q[0, 0, 0], rtol=1e-15)
    np.testing.assert_allclose(at(q, 7) @ at(k, 3), at(q, 5) @ at(k, 1), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(at(q, 9)), np.linalg.norm(q), rtol=1e-13)


def test_rotate_half_squares_to_minus_one():
    x = _rng(9).standard_normal((2, 3, 4, 6))
    np.testing.assert_array_equal(rotate_half(rotate_half(x)), -x)


@FAST
@given(B=st.integers(1, 2), h=st.integers(1, 3), T=st.integers(1, 4), half=st.integers(1, 4),
       offset=st.integers(0, 50), seed=st.integers(0, 2**16),
       backend=st.sampled_from(["numpy", "numba"]))
def test_rope_gradcheck_drawn(B, h, T, half, offset, seed, backend):
    x = _rng(seed).standard_normal((B, h, T, 2 * half))
    cos, sin = rope_tables(offset + np.arange(T), 2 * half, theta=10000.0, dtype=np.float64)
    gradcheck(_rope_fwd, _rope_bwd, {"x": x, "cos": cos, "sin": sin, "backend": backend},
              wrt=["x"], seed=seed)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_rope_gradcheck_fixed(backend):
    x = _rng(10).standard_normal((2, 3, 5, 8))
    cos, sin = rope_tables(np.arange(3, 8), 8, theta=500000.0, scaling_factor=4.0,
                           dtype=np.float64)
    report = gradcheck(_rope_fwd, _rope_bwd, {"x": x, "cos": cos, "sin": sin,
                                              "backend": backend}, wrt=["x"])
    assert report.passed and report.worst_rel_err < 1e-8


@FAST
@given(B=st.integers(0, 2), h=st.integers(1, 3), T=st.integers(1, 5), half=st.integers(1, 5),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float32, np.float64]),
       token_major=st.booleans())
def test_rope_numba_equals_numpy(B, h, T, half, seed, dtype, token_major):
    """The kernel against the NumPy reference, on C-ordered heads and on the projections'
    (B, T, h, D) layout seen as (B, h, T, D), with tables whose halves differ (any (T, D)
    table is taken as given); the inputs are left alone."""
    rng = _rng(seed)
    D = 2 * half
    x, dy = (rng.standard_normal((B, T, h, D)).astype(dtype) for _ in range(2))
    x, dy = (a.transpose(0, 2, 1, 3) if token_major else np.ascontiguousarray(
        a.transpose(0, 2, 1, 3)) for a in (x, dy))  # (B, h, T, D)
    cos, sin = (rng.standard_normal((T, D)).astype(dtype) for _ in range(2))
    saved = [a.copy() for a in (x, dy, cos, sin)]
    tol = dict(rtol=1e-13, atol=1e-13) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    for op, a in ((rope_forward, x), (rope_backward, dy)):
        ref, fast = (op(a, cos, sin, backend=b) for b in ("numpy", "numba"))
        assert fast.dtype == ref.dtype == dtype and fast.shape == ref.shape == a.shape
        np.testing.assert_allclose(fast, ref, **tol)
    for a, b in zip((x, dy, cos, sin), saved, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_the_backward_ops_give_token_major_arrays(backend):
    """rope's dx and attention's out, dq, dk, dv are (B, heads, T, D) views of (B, T, heads, D)
    memory: the model's transposes back to (B, T, heads·D) are views, not copies."""
    q, k, v = attention_inputs(2, 4, 2, 5, 6, 0, seed=12)
    cos, sin = rope_tables(np.arange(5), 6, theta=1e4, dtype=np.float64)
    out, cache = attention_forward(q, k, v, block=2, backend=backend)
    arrays = [out, *attention_backward(out * 0.5, cache),
              rope_backward(q, cos, sin, backend=backend)]
    for a in arrays:
        t = a.transpose(0, 2, 1, 3)  # (B, T, heads, D)
        assert t.flags.c_contiguous
        assert np.shares_memory(t.reshape(t.shape[0], t.shape[1], -1), a)


def test_rope_rejects_bad_input():
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_tables(np.arange(3), 5, theta=1e4, dtype=np.float64)
    with pytest.raises(ValueError, match=r"positions\[1\] = -2"):
        rope_tables(np.array([0, -2]), 4, theta=1e4, dtype=np.float64)
    with pytest.raises(TypeError, match="positions must be an integer"):
        rope_tables(np.array([0.0, 1.0]), 4, theta=1e4, dtype=np.float64)
    with pytest.raises(ValueError, match="theta must be"):
        rope_tables(np.arange(2), 4, theta=0.0, dtype=np.float64)
    with pytest.raises(TypeError, match="dtype must be"):
        rope_tables(np.arange(2), 4, theta=1e4, dtype=np.int32)
    cos, sin = rope_tables(np.arange(3), 4, theta=1e4, dtype=np.float64)
    with pytest.raises(ValueError, match=r"x must be \(B, h, T, D\)"):
        rope_forward(np.zeros((1, 1, 2, 4)), cos, sin)
    with pytest.raises(TypeError, match="share one dtype"):
        rope_forward(np.zeros((1, 1, 3, 4), np.float32), cos, sin)
    with pytest.raises(ValueError, match=r"dy must be"):
        rope_backward(np.zeros((1, 3, 4)), cos, sin)


# ---- rmsnorm

@FAST
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), d=st.integers(1, 9),
       eps=st.sampled_from([0.0, 1e-6, 0.5]), seed=st.integers(0, 2**16),
       backend=st.sampled_from(["numpy", "numba"]))
def test_rmsnorm_gradcheck_drawn(lead, d, eps, seed, backend):
    rng = _rng(seed)
    x = rng.standard_normal((*lead, d)) * rng.uniform(0.1, 10)
    w = rng.standard_normal(d)
    gradcheck(_rms_fwd, _rms_bwd, {"x": x, "weight": w, "eps": eps, "backend": backend},
              wrt=["x"], seed=seed)


@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), d=st.integers(1, 40),
       eps=st.sampled_from([0.0, 1e-6, 0.5]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_rmsnorm_numba_equals_numpy(lead, d, eps, seed, dtype):
    """The kernels against the NumPy reference (the row sums in float64, NumPy's in the
    dtype), y, the cache's x̂ and r, and dx; a non-contiguous x and dy taken as they are."""
    rng = _rng(seed)
    x = (rng.standard_normal((*lead, 2 * d)) * rng.uniform(0.1, 10)).astype(dtype)[..., ::2]
    w, dy = rng.standard_normal(d).astype(dtype), rng.standard_normal((*lead, d)).astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    ref, fast = (rmsnorm_forward(x, w, eps=eps, backend=b) for b in ("numpy", "numba"))
    for a, b in ((fast[0], ref[0]), (fast[1].x_hat, ref[1].x_hat), (fast[1].r, ref[1].r),
                 (rmsnorm_backward(dy, fast[1]), rmsnorm_backward(dy, ref[1]))):
        assert a.dtype == dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, **tol)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rmsnorm_backward_adds_into_a_residual_gradient(backend, dtype):
    """add_to gets dx added in place (the residual stream's gradient), and is returned; what
    it must be is checked before anything is written."""
    rng = _rng(13)
    x, dy, acc = (rng.standard_normal((2, 3, 7)).astype(dtype) for _ in range(3))
    w = rng.standard_normal(7).astype(dtype)
    _, cache = rmsnorm_forward(x, w, eps=1e-6, backend=backend)
    expected = acc + rmsnorm_backward(dy, cache)
    saved = acc.copy()
    assert rmsnorm_backward(dy, cache, add_to=acc) is acc
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(acc, expected, rtol=tol, atol=tol)
    acc[...] = saved
    for bad in (acc.astype(np.float64 if dtype == np.float32 else np.float32), acc[:1],
                np.asfortranarray(acc), dy, cache.x_hat):
        with pytest.raises(ValueError, match="add_to"):
            rmsnorm_backward(dy, cache, add_to=bad)
    np.testing.assert_array_equal(acc, saved)


@FAST
@given(lead=st.lists(st.integers(0, 3), min_size=0, max_size=2), d=st.integers(1, 12),
       seed=st.integers(0, 2**16), backend=st.sampled_from(["numpy", "numba"]),
       dtype=st.sampled_from([np.float32, np.float64]), zero=st.booleans())
def test_rmsnorm_cache_output_gives_the_same_gradient(lead, d, seed, backend, dtype, zero):
    """A cache keeping y (x̂ = y / weight) gives x̂'s dx to rounding, and adds into add_to the
    same way; a weight with a zero keeps x̂ instead (y / weight would not give it back)."""
    rng = _rng(seed)
    x, dy = (rng.standard_normal((*lead, d)).astype(dtype) for _ in range(2))
    w = (rng.uniform(0.1, 3.0, d) * rng.choice([-1, 1], d)).astype(dtype)
    if zero:
        w[rng.integers(d)] = 0
    y_ref, c_ref = rmsnorm_forward(x, w, eps=1e-6, backend=backend)
    y, c = rmsnorm_forward(x, w, eps=1e-6, backend=backend, cache_output=True)
    np.testing.assert_array_equal(y, y_ref)
    assert (c.x_hat is not None) == zero and (c.y is None) == zero
    if not zero and y.size:
        assert np.shares_memory(c.y, y)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c.normalized(), c_ref.x_hat, **tol)
    np.testing.assert_allclose(rmsnorm_backward(dy, c), rmsnorm_backward(dy, c_ref), **tol)
    acc = np.ones_like(dy)
    rmsnorm_backward(dy, c, add_to=acc)
    np.testing.assert_allclose(acc, 1 + rmsnorm_backward(dy, c_ref), **tol)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_rmsnorm_gradcheck_from_the_output(backend):
    rng = _rng(14)
    x, w = rng.standard_normal((2, 5, 16)), rng.uniform(0.5, 2.0, 16)

    def fwd(x, weight):
        return rmsnorm_forward(x, weight, eps=1e-5, backend=backend, cache_output=True)

    report = gradcheck(fwd, _rms_bwd, {"x": x, "weight": w}, wrt=["x"])
    assert report.passed and report.worst_rel_err < 1e-8


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_the_models_caches_refuse_modified_fields(backend):
    """A cache whose fields are not the forward's (a field dropped, reshaped, retyped, another
    backend) is one ValueError naming the cache, before any kernel runs."""
    rng = _rng(15)
    x, dy = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    for keep_y in (False, True):
        _, c = rmsnorm_forward(x, rng.uniform(1, 2, 4), eps=1e-6, backend=backend,
                               cache_output=keep_y)
        field = "y" if keep_y else "x_hat"
        for bad in (c._replace(**{field: None}), c._replace(**{field: [[1.0] * 4] * 3}),
                    c._replace(x_hat=c.kept(), y=c.kept()), c._replace(r=None),
                    c._replace(r=c.r[:1]), c._replace(weight=c.weight[:3]),
                    c._replace(weight=c.weight.astype(np.float32)), c._replace(backend="x")):
            with pytest.raises(ValueError, match="RMSNorm cache was modified"):
                rmsnorm_backward(dy, bad)
    q, k, v = attention_inputs(1, 2, 1, 3, 4, 1, seed=15)
    out, c = attention_forward(q, k, v, q_offset=1, backend=backend)
    for bad in (c._replace(lse=c.lse[..., :2]), c._replace(k=c.k[:, :, :3]),
                c._replace(v=None), c._replace(q_offset=2), c._replace(q_offset=1.0),
                c._replace(block=0), c._replace(scale=1.0), c._replace(backend="x"),
                c._replace(q_shape=(1, 2, 4, 3)), c._replace(q=c.q.astype(np.float32))):
        with pytest.raises(ValueError, match="attention cache was modified"):
            attention_backward(np.ones_like(out), bad)


def test_rmsnorm_gradcheck_fixed_and_forward():
    rng = _rng(11)
    x, w = rng.standard_normal((2, 5, 16)), rng.standard_normal(16)
    report = gradcheck(_rms_fwd, _rms_bwd, {"x": x, "weight": w, "eps": 1e-5}, wrt=["x"])
    assert report.passed and report.worst_rel_err < 1e-8
    y, _ = rmsnorm_forward(x, w, eps=1e-5)
    expected = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(y, expected, rtol=1e-14)
    y32, c32 = rmsnorm_forward(x.astype(np.float32), w.astype(np.float32), eps=1e-5)
    assert y32.dtype == np.float32
    assert rmsnorm_backward(y32, c32).dtype == np.float32
    np.testing.assert_allclose(y32, y, rtol=1e-5, atol=1e-5)
    assert not np.shares_memory(y, x)


def test_rmsnorm_gradient_is_orthogonal_to_x_without_eps():
    """With eps = 0, y(c·x) = y(x): the gradient has no component along x (docs/math.md §8)."""
    rng = _rng(14)
    x, w, dy = rng.standard_normal((4, 9)), rng.standard_normal(9), rng.standard_normal((4, 9))
    _, cache = rmsnorm_forward(x, w, eps=0.0)
    dx = rmsnorm_backward(dy, cache)
    np.testing.assert_allclose(np.sum(dx * x, axis=-1), 0.0, atol=1e-13)
    assert np.max(np.abs(dx)) > 0.1  # not zero altogether


def test_rmsnorm_rejects_bad_input():
    x, w = np.ones((2, 4)), np.ones(4)
    with pytest.raises(ValueError, match=r"weight \(d,\), got x \(2, 4\) and weight \(3,\)"):
        rmsnorm_forward(x, np.ones(3), eps=1e-6)
    with pytest.raises(ValueError, match="eps must be"):
        rmsnorm_forward(x, w, eps=-1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        rmsnorm_forward(x, w.astype(np.float32), eps=1e-6)
    _, cache = rmsnorm_forward(x, w, eps=1e-6)
    with pytest.raises(ValueError, match="dy must be float64"):
        rmsnorm_backward(np.ones((2, 4), np.float32), cache)


# ---- embedding

def test_embedding_copies_rows_and_scatter_adds():
    rng = _rng(12)
    W = rng.standard_normal((7, 3))
    ids = np.array([[1, 4, 1], [6, 0, 1]])
    h, cache = embedding_forward(ids, W)
    assert h.shape == (2, 3, 3) and not np.shares_memory(h, W)
    np.testing.assert_array_equal(h[1, 0], W[6])
    dh = rng.standard_normal(h.shape)
    dW = embedding_backward(dh, cache)
    np.testing.assert_allclose(dW[1], dh[0, 0] + dh[0, 2] + dh[1, 2], rtol=1e-15)
    np.testing.assert_array_equal(dW[[2, 3, 5]], 0.0)
    ids[0, 0] = 2  # the cache holds its own copy of the ids
    np.testing.assert_array_equal(embedding_backward(dh, cache), dW)
    report = gradcheck(embedding_forward, _emb_bwd, {"ids": ids, "weight": W}, wrt=["weight"])
    assert report.passed and report.worst_rel_err < 1e-8


@FAST
@given(B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(1, 6), d=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_embedding_gradcheck_drawn(B, T, V, d, seed):
    rng = _rng(seed)
    ids = rng.integers(0, V, (B, T))
    W = rng.standard_normal((V, d))
    gradcheck(embedding_forward, _emb_bwd, {"ids": ids, "weight": W}, wrt=["weight"], seed=seed)


def test_embedding_rejects_bad_ids():
    W = np.zeros((5, 2))
    with pytest.raises(ValueError, match=r"ids\[1, 0\] = 5 is out of range"):
        embedding_forward(np.array([[0, 1], [5, 2]]), W)
    with pytest.raises(ValueError, match=r"ids\[0, 1\] = -1"):
        embedding_forward(np.array([[0, -1]]), W)
    with pytest.raises(TypeError, match="ids must be an integer array"):
        embedding_forward(np.array([[0.0]]), W)
    with pytest.raises(ValueError, match=r"ids must be \(B, T\)"):
        embedding_forward(np.array([0, 1]), W)
    with pytest.raises(ValueError, match=r"weight must be \(V, d\)"):
        embedding_forward(np.array([[0]]), np.zeros(5))


# ---- causal LM loss

def naive_lm_loss(logits, ids, ignore_index):
    total, n = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            y = ids[b, t + 1]
            if y != ignore_index:
                row = logits[b, t]
                total -= row[y] - np.log(np.sum(np.exp(row)))
                n += 1
    return total / n


@FAST
@given(B=st.integers(1, 3), T=st.integers(2, 5), V=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_lm_loss_gradcheck_and_value_drawn(B, T, V, seed):
    rng = _rng(seed)
    logits = rng.standard_normal((B, T, V)) * 3
    ids = rng.integers(0, V, (B, T))
    ids[rng.random((B, T)) < 0.3] = -100
    ids[0, 1] = 0  # at least one target
    loss, cache = causal_lm_loss(logits, ids)
    assert isinstance(loss, float)
    np.testing.assert_allclose(loss, naive_lm_loss(logits, ids, -100), rtol=1e-12, atol=1e-14)
    dlogits = causal_lm_loss_backward(cache)
    assert np.all(dlogits[:, -1] == 0.0)
    gradcheck(_loss_fwd, _loss_bwd, {"logits": logits, "input_ids": ids, "ignore_index": -100},
              wrt=["logits"], seed=seed)


def test_lm_loss_ignore_index_and_stability():
    logits = _rng(13).standard_normal((2, 4, 5)) * 1e3  # exp would overflow without the max
    ids = np.array([[1, 2, 3, 4], [0, 7, 7, 2]])
    loss, cache = causal_lm_loss(logits, ids, ignore_index=7)
    assert np.isfinite(loss) and cache.n == 4
    d = causal_lm_loss_backward(cache, 2.0)
    np.testing.assert_array_equal(d[1, :2], 0.0)  # positions whose target is ignored
    np.testing.assert_allclose(d[0, 0].sum(), 0.0, atol=1e-15)  # softmax − onehot sums to 0


def test_lm_loss_rejects_bad_input():
    logits = np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="no target"):
        causal_lm_loss(logits, np.array([[1, -100, -100]]))
    with pytest.raises(ValueError, match="no target"):
        causal_lm_loss(np.zeros((2, 1, 4)), np.array([[1], [2]]))
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = 4 is out of range"):
        causal_lm_loss(logits, np.array([[1, 2, 4]]))
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        causal_lm_loss(logits, np.array([[1, 2]]))
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        causal_lm_loss(logits, np.array([[1.0, 2.0, 3.0]]))


# ---- the fused LM head and loss

@given(B=st.integers(1, 3), T=st.integers(2, 6), rows=st.integers(1, 8), seed=st.integers(0, 99))
def test_lm_head_loss_equals_head_then_loss(B, T, rows, seed):
    """Blocks of ``rows`` tokens give the (B, T, V) logits' loss, dh = dlogits head and
    dhead = dlogitsᵀ h, each summed in another order."""
    rng = _rng(seed)
    V, d = 11, 5
    h, head = rng.standard_normal((B, T, d)), rng.standard_normal((V, d))
    ids = rng.integers(0, V, (B, T))
    loss, cache = causal_lm_loss(h @ head.T, ids)
    dlogits = causal_lm_loss_backward(cache)  # (B, T, V)
    dhead = np.full((V, d), 0.5)  # added to, as a gradient accumulates
    fused, dh = lm_head_loss(h, head, ids, dhead=dhead, rows=rows)
    assert fused == pytest.approx(loss, rel=1e-13)
    np.testing.assert_allclose(dh, dlogits @ head, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dhead, 0.5 + dlogits.reshape(-1, V).T @ h.reshape(-1, d),
                               rtol=1e-12, atol=1e-14)


def test_lm_head_loss_gradcheck_and_float32():
    rng = _rng(3)
    h, head, ids = rng.standard_normal((2, 4, 3)), rng.standard_normal((7, 3)), \
        rng.integers(0, 7, (2, 4))

    def fwd(h, head):
        return np.array(lm_head_loss(h, head, ids, rows=3)[0]), (h, head)

    def bwd(dloss, c):
        dhead = np.zeros_like(c[1])
        _, dh = lm_head_loss(*c, ids, dhead=dhead, rows=3)
        return {"h": float(dloss) * dh, "head": float(dloss) * dhead}

    assert gradcheck(fwd, bwd, {"h": h, "head": head}, wrt=["h", "head"]).passed
    loss32, dh32 = lm_head_loss(h.astype(np.float32), head.astype(np.float32), ids)
    assert dh32.dtype == np.float32
    assert loss32 == pytest.approx(lm_head_loss(h, head, ids)[0], rel=1e-6)


def test_lm_head_loss_refuses_bad_input():
    h, head, ids = np.zeros((2, 4, 3)), np.zeros((7, 3)), np.zeros((2, 4), np.int64)
    with pytest.raises(ValueError, match="head"):
        lm_head_loss(h, np.zeros((7, 4)), ids)
    with pytest.raises(ValueError, match="input_ids must be"):
        lm_head_loss(h, head, ids[:, :3])
    with pytest.raises(ValueError, match="input_ids"):
        lm_head_loss(h, head, ids + 7)
    with pytest.raises(ValueError, match="no target"):
        lm_head_loss(h[:, :1], head, ids[:, :1])
    with pytest.raises(ValueError, match="dhead"):
        lm_head_loss(h, head, ids, dhead=np.zeros((7, 3), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        lm_head_loss(h, head.astype(np.float32), ids)


def test_the_model_kernels_check_what_they_index():
    """Numba's bounds checks are off: each kernel refuses shapes it would index past."""
    from minilora.models import attention_numba, rmsnorm_numba, rope_numba

    f = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="rmsnorm kernel"):
        rmsnorm_numba._backward(f, np.ones((3, 5), np.float32), np.ones((3, 1), np.float32),
                                np.ones(4, np.float32), f.copy(), False, True)
    with pytest.raises(ValueError, match="rmsnorm kernel"):
        rmsnorm_numba._forward(f, np.ones(4, np.float32), 1e-6, f.copy(), f.copy(),
                               np.ones((2, 1), np.float32), True)
    with pytest.raises(ValueError, match="attention kernel"):  # keys past S₁
        attention_numba._shift_rows(f.copy(), np.float32(1), 3, 2, np.ones(3, np.float32), True)
    with pytest.raises(ValueError, match="attention kernel"):  # one lse per row
        attention_numba._normalize_rows(f.copy(), 3, 0, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="attention kernel"):
        attention_numba._softmax_grad_rows(f, np.ones((3, 3), np.float32), 3, 0)
    x = np.ones((1, 2, 3, 4), np.float32)
    for cos, out in ((np.ones((3, 4), np.float32), np.ones((1, 2, 3, 2), np.float32)),
                     (np.ones((2, 4), np.float32), x.copy()),  # one row per position
                     (np.ones((3, 2), np.float32), x.copy())):  # D columns
        with pytest.raises(ValueError, match="rope kernel"):
            rope_numba._rotate(x, cos, cos, out)
    with pytest.raises(ValueError, match="rope kernel"):  # D even
        rope_numba._rotate(np.ones((1, 1, 1, 3)), np.ones((1, 3)), np.ones((1, 3)),
                           np.ones((1, 1, 1, 3)))
