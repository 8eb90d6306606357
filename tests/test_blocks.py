"""Fused blocks (minilora.ops.blocks): every gradient against finite differences in float64 on both
backends, numba against numpy, the core's promises (dtypes, leading dims, zero-size batches, no
mutation, clear errors), and parity with PEFT's modules and mixed batches."""

import warnings

import numpy as np
import pytest
from _helpers import BACKENDS, dropout_mask
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora.ops import blocks


def qkv_problem(rng, lead=(2, 3), d_in=5, outs=(4, 3, 6), ranks=(2, 1, 3), bias=True,
                dropout=True):
    W = [rng.standard_normal((d, d_in)) for d in outs]
    A = [rng.standard_normal((r, d_in)) for r in ranks]
    B = [rng.standard_normal((d, r)) for d, r in zip(outs, ranks, strict=True)]
    x = rng.standard_normal((*lead, d_in))
    kw = dict(scaling=[0.5, 2.0, -1.5][:len(outs)],
              bias=[rng.standard_normal(d) if bias and j != 1 else None
                    for j, d in enumerate(outs)],
              dropout_mask=[dropout_mask(rng, x.shape) if dropout and j != 2 else None
                            for j in range(len(outs))])
    return x, W, A, B, kw


def _named(W, A, B):
    """{"W0": W[0], "A0": A[0], ...}: the projections' weights as gradcheck inputs."""
    return {f"{n}{j}": a[j] for j in range(len(W)) for n, a in zip("WAB", (W, A, B), strict=True)}


def _flat_qkv(P, kw, backend):
    """gradcheck's view of the block: one output (the ys concatenated), inputs x, A0, B0, ..."""
    def forward(x, **ab):
        ys, cache = blocks.lora_qkv_forward(x, [ab[f"W{j}"] for j in range(P)],
                                            [ab[f"A{j}"] for j in range(P)],
                                            [ab[f"B{j}"] for j in range(P)], backend=backend,
                                            **kw)
        return np.concatenate(ys, axis=-1), (cache, [y.shape[-1] for y in ys])

    def backward(dy, state):
        cache, sizes = state
        dys = np.split(dy, np.cumsum(sizes)[:-1], axis=-1)
        g = blocks.lora_qkv_backward([d.copy() for d in dys], cache, need_dW=True)
        out = {"x": g.dx}
        for j in range(P):
            out |= {f"A{j}": g.dA[j], f"B{j}": g.dB[j], f"W{j}": g.dW[j]}
        return out

    return forward, backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P", [1, 2, 3])
def test_qkv_gradients_match_finite_differences(backend, P):
    rng = np.random.default_rng(P)
    x, W, A, B, kw = qkv_problem(rng, outs=(4, 3, 6)[:P], ranks=(2, 1, 3)[:P])
    kw = {k: v[:P] for k, v in kw.items()}
    forward, backward = _flat_qkv(P, kw, backend)
    inputs = {"x": x} | _named(W, A, B)
    ml.gradcheck(forward, backward, inputs)


def mlp_problem(rng, lead=(2, 3), d_in=5, hidden=7, d_out=4, ranks=(2, 3, 1), dropout=True,
                bias=True):
    shapes = [(hidden, d_in), (hidden, d_in), (d_out, hidden)]
    W = [rng.standard_normal(s) / np.sqrt(s[1]) for s in shapes]
    A = [rng.standard_normal((r, s[1])) for r, s in zip(ranks, shapes, strict=True)]
    B = [rng.standard_normal((s[0], r)) for r, s in zip(ranks, shapes, strict=True)]
    x = rng.standard_normal((*lead, d_in))
    masks = [dropout_mask(rng, shape) for shape in (x.shape, x.shape, (*lead, hidden))] \
        if dropout else None
    biases = [rng.standard_normal(hidden), None, rng.standard_normal(d_out)] if bias else None
    return x, W, A, B, dict(scaling=[0.7, 1.5, -2.0], bias=biases, dropout_mask=masks)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", blocks.ACTIVATIONS)
def test_mlp_gradients_match_finite_differences(backend, activation):
    rng = np.random.default_rng(3)
    x, W, A, B, kw = mlp_problem(rng)

    def forward(x, **p):
        return blocks.lora_mlp_forward(x, [p[f"W{j}"] for j in range(3)],
                                       [p[f"A{j}"] for j in range(3)],
                                       [p[f"B{j}"] for j in range(3)], activation=activation,
                                       backend=backend, **kw)

    def backward(dy, cache):
        g = blocks.lora_mlp_backward(dy, cache, need_dW=True, need_dbias=True)
        out = {"x": g.dx}
        for j in range(3):
            out |= {f"A{j}": g.dA[j], f"B{j}": g.dB[j], f"W{j}": g.dW[j]}
        return out

    inputs = {"x": x} | _named(W, A, B)
    ml.gradcheck(forward, backward, inputs)


def multi_problem(rng, lead=(3, 4), d_in=6, d_out=5, ranks=(2, 3, 1), dropout=True, bias=True,
                  unused=()):
    K = len(ranks)
    x = rng.standard_normal((*lead, d_in))
    index = rng.integers(-1, K, lead)
    for k in unused:
        index[index == k] = -1
    kw = dict(scaling=[0.5, -1.5, 3.0][:K] if K <= 3 else 2.0,
              bias=rng.standard_normal(d_out) if bias else None,
              dropout_mask=dropout_mask(rng, x.shape) if dropout else None)
    return (x, rng.standard_normal((d_out, d_in)), [rng.standard_normal((r, d_in)) for r in ranks],
            [rng.standard_normal((d_out, r)) for r in ranks], index, kw)


def _flat_multi(x, W, A, B, index, kw, backend, fan_in_fan_out=False):
    """gradcheck's view of the mixed batch: (forward, backward, inputs) over x, W, A0, B0, ..."""
    K = len(A)

    def forward(x, W, **p):
        return blocks.multi_lora_forward(x, W, [p[f"A{k}"] for k in range(K)],
                                         [p[f"B{k}"] for k in range(K)], index,
                                         fan_in_fan_out=fan_in_fan_out, backend=backend, **kw)

    def backward(dy, cache):
        g = blocks.multi_lora_backward(dy, cache, need_dW=True,
                                       need_dbias=kw["bias"] is not None)
        return {"x": g.dx, "W": g.dW} | {f"A{k}": g.dA[k] for k in range(K)} \
            | {f"B{k}": g.dB[k] for k in range(K)}

    inputs = {"x": x, "W": W} | {f"A{k}": A[k] for k in range(K)} \
        | {f"B{k}": B[k] for k in range(K)}
    return forward, backward, inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_multi_lora_gradients_match_finite_differences(backend, fan_in_fan_out):
    rng = np.random.default_rng(4)
    x, W, A, B, index, kw = multi_problem(rng)
    if fan_in_fan_out:
        W = W.T.copy()
    forward, backward, inputs = _flat_multi(x, W, A, B, index, kw, backend,
                                            fan_in_fan_out=fan_in_fan_out)
    ml.gradcheck(forward, backward, inputs)


@given(seed=st.integers(0, 2**32 - 1), samples=st.integers(0, 9), K=st.integers(1, 4),
       with_mask=st.booleans(), run=st.sampled_from([1, 16, 40]))
def test_multi_lora_is_each_token_through_its_own_adapter(seed, samples, K, with_mask, run):
    """Token n's y, dx and its share of dA_k, dB_k are those of lora_forward with adapter k
    (or of the frozen layer alone for −1); an adapter no token uses gets zero gradients. With
    ``run`` tokens per sample sharing an adapter (PEFT's mixed batches), adapters are done
    run by run; with single scattered tokens, gathered."""
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, 4, K)
    N = samples * run
    x, W, A, B, index, kw = multi_problem(rng, lead=(N,), ranks=tuple(ranks), dropout=with_mask)
    index = np.repeat(rng.integers(-1, K, samples), run)
    y, cache = blocks.multi_lora_forward(x, W, A, B, index, **kw)
    dy = rng.standard_normal(y.shape)
    g = blocks.multi_lora_backward(dy, cache, need_dbias=True)
    scalings = kw["scaling"] if isinstance(kw["scaling"], list) else [kw["scaling"]] * K
    dA = [np.zeros_like(a) for a in A]
    dB = [np.zeros_like(b) for b in B]
    for n in range(N):
        k = int(index[n])
        mask = None if kw["dropout_mask"] is None else kw["dropout_mask"][n:n + 1]
        Ak, Bk = (A[k], B[k]) if k >= 0 else (A[0], B[0] * 0)
        y1, c1 = ml.lora_forward(x[n:n + 1], W, Ak, Bk, scaling=scalings[max(k, 0)],
                                 bias=kw["bias"], dropout_mask=mask, backend="numpy")
        g1 = ml.lora_backward(dy[n:n + 1], c1)
        np.testing.assert_allclose(y[n:n + 1], y1, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g.dx[n:n + 1], g1.dx, rtol=1e-12, atol=1e-12)
        if k >= 0:
            dA[k] += g1.dA
            dB[k] += g1.dB
    for k in range(K):
        np.testing.assert_allclose(g.dA[k], dA[k], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(g.dB[k], dB[k], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(g.dbias, dy.sum(axis=0), rtol=1e-12, atol=1e-12)


BLOCK_OPS = {"qkv": (blocks.lora_qkv_forward, blocks.lora_qkv_backward),
             "mlp": (blocks.lora_mlp_forward, blocks.lora_mlp_backward),
             "multi": (blocks.multi_lora_forward, blocks.multi_lora_backward)}
PROBLEMS = {"qkv": qkv_problem, "mlp": mlp_problem, "multi": multi_problem}


def _block_run(name, problem, scaling=None, backend="numpy"):
    """(outputs, grads) of one block on a problem (x, ..., kw), with ``scaling`` in place of the
    problem's when given; the upstream gradients are drawn from a fixed seed."""
    forward, backward = BLOCK_OPS[name]
    *arrays, kw = problem
    if scaling is not None:
        kw = kw | {"scaling": scaling}
    y, cache = forward(*arrays, backend=backend, **kw)
    ys = y if isinstance(y, tuple) else (y,)
    dys = tuple(np.random.default_rng(9).standard_normal(v.shape) for v in ys)
    g = backward(dys if isinstance(y, tuple) else dys[0], cache, need_dW=True)
    return ys, g


def _in_dtype(problem, dtype):
    """A block's problem (x, ..., kw) with its float arrays in ``dtype`` (scaling untouched)."""
    arrays = [a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f"
              else [b.astype(dtype) for b in a] if isinstance(a, list) else a
              for a in problem[:-1]]
    kw = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else
              [b if b is None else b.astype(dtype) for b in v] if isinstance(v, list)
              and k != "scaling" else v) for k, v in problem[-1].items()}
    return (*arrays, kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_agree_across_backends_and_keep_dtype_and_inputs(dtype):
    rng = np.random.default_rng(5)
    problems = {name: make(rng) for name, make in PROBLEMS.items()}
    results = {}
    for backend in BACKENDS:
        for name, problem in problems.items():
            *arrays, kw = _in_dtype(problem, dtype)
            before = [np.copy(a) if isinstance(a, np.ndarray) else [np.copy(b) for b in a]
                      for a in arrays]
            forward, backward = BLOCK_OPS[name]
            y, cache = forward(*arrays, backend=backend, **kw)
            ys = y if isinstance(y, tuple) else (y,)
            assert all(v.dtype == dtype for v in ys)
            same = np.random.default_rng(len(name))  # the same upstream for both backends
            dys = tuple(same.standard_normal(v.shape).astype(dtype) for v in ys)
            g = backward(dys if isinstance(y, tuple) else dys[0], cache, need_dW=True)
            assert g.dx.dtype == dtype and g.dx.shape == arrays[0].shape
            assert all(a.dtype == dtype for a in list(g.dA) + list(g.dB))
            for a, b in zip(arrays, before, strict=True):  # no input modified
                for u, v in zip(a if isinstance(a, list) else [a],
                                b if isinstance(b, list) else [b], strict=True):
                    assert np.array_equal(u, v)
            results.setdefault(name, []).append((ys, g))
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for name, ((ys0, g0), (ys1, g1)) in results.items():
        for a, b in zip(ys0 + (g0.dx,) + tuple(g0.dA) + tuple(g0.dB),
                        ys1 + (g1.dx,) + tuple(g1.dA) + tuple(g1.dB), strict=True):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.max(np.abs(a)), err_msg=name)


def test_zero_size_batches_and_one_dimensional_x():
    """A 1-D x is one token: the outputs and gradients of the same block on x[None], without
    the leading 1. A zero-size batch gives outputs of shape (*lead, d) and gradients that sum
    over no token: exactly 0."""
    rng = np.random.default_rng(6)
    for name, make in PROBLEMS.items():
        for lead in [(0,), (2, 0), ()]:
            problem = make(rng, lead=lead, dropout=False)
            x = problem[0]
            ys, g = _block_run(name, problem)
            assert g.dx.shape == x.shape and all(v.shape[:-1] == lead for v in ys), name
            weights = (*g.dA, *g.dB, *(g.dW if isinstance(g.dW, list | tuple) else [g.dW]))
            if lead:
                assert all(d.size and not d.any() for d in weights), name
                continue
            one = [x[None], *problem[1:]]
            if name == "multi":
                one[4] = np.asarray(one[4])[None]  # adapter_index, one entry per token
            ys1, g1 = _block_run(name, one)
            weights1 = (*g1.dA, *g1.dB, *(g1.dW if isinstance(g1.dW, list | tuple) else [g1.dW]))
            for a, b in zip((*ys, g.dx), (*ys1, g1.dx), strict=True):
                np.testing.assert_allclose(a, b[0], rtol=1e-14, atol=1e-14, err_msg=name)
            for a, b in zip(weights, weights1, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14, err_msg=name)


def test_bad_input_is_a_clear_error():
    rng = np.random.default_rng(7)
    x, W, A, B, kw = qkv_problem(rng)
    with pytest.raises(ValueError, match="W, A and B must have one entry per projection"):
        blocks.lora_qkv_forward(x, W, A[:2], B, **kw)
    with pytest.raises(ValueError, match="scaling has 2 entries but there are 3 projections"):
        blocks.lora_qkv_forward(x, W, A, B, **(kw | {"scaling": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="projection 1"):
        blocks.lora_qkv_forward(x, W, A, [B[0], B[0], B[2]], **kw)
    with pytest.raises(TypeError, match="list or tuple"):
        blocks.lora_qkv_forward(x, np.stack([W[0], W[0]]), A[:2], B[:2], scaling=1.0)
    ys, cache = blocks.lora_qkv_forward(x, W, A, B, **kw)
    with pytest.raises(ValueError, match="dys has 2 entries"):
        blocks.lora_qkv_backward(list(ys[:2]), cache)
    with pytest.raises(ValueError, match=r"dys\[1\]"):
        blocks.lora_qkv_backward([ys[0], ys[0], ys[2]], cache)

    x, W, A, B, kw = mlp_problem(rng)
    with pytest.raises(ValueError, match="activation must be one of"):
        blocks.lora_mlp_forward(x, W, A, B, activation="relu", **kw)
    with pytest.raises(ValueError, match="triples"):
        blocks.lora_mlp_forward(x, W[:2], A[:2], B[:2], scaling=1.0)
    with pytest.raises(ValueError, match="down projection"):
        blocks.lora_mlp_forward(x, W, A, B, **(kw | {"dropout_mask": kw["dropout_mask"][:2]
                                                     + [kw["dropout_mask"][0]]}))

    x, W, A, B, index, kw = multi_problem(rng)
    with pytest.raises(ValueError, match="adapter_index holds 3"):
        blocks.multi_lora_forward(x, W, A, B, np.where(index == 0, 3, index), **kw)
    with pytest.raises(ValueError, match="adapter_index holds -2"):
        blocks.multi_lora_forward(x, W, A, B, np.where(index == 0, -2, index), **kw)
    with pytest.raises(TypeError, match="integers"):
        blocks.multi_lora_forward(x, W, A, B, index.astype(float), **kw)
    with pytest.raises(ValueError, match="leading shape"):
        blocks.multi_lora_forward(x, W, A, B, index[:, :2], **kw)
    with pytest.raises(ValueError, match="adapter 1"):
        blocks.multi_lora_forward(x, W, A, [B[0], B[0], B[2]], index, **kw)
    with pytest.raises(ValueError, match="one entry per adapter"):
        blocks.multi_lora_forward(x, W, A, B[:2], index, **kw)
    y, cache = blocks.multi_lora_forward(x, W, A, B, index, **kw)
    with pytest.raises(ValueError, match="modified"):
        blocks.multi_lora_backward(y, cache._replace(rows=(cache.rows[0] + 10**6,)
                                                     + cache.rows[1:]))


@given(seed=st.integers(0, 2**32 - 1), N=st.integers(0, 7), H=st.integers(0, 9),
       activation=st.sampled_from(blocks.ACTIVATIONS),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_the_gated_kernels_match_their_numpy_reference(seed, N, H, activation, dtype):
    rng = np.random.default_rng(seed)
    e, u, dz = (rng.standard_normal((N, H)).astype(dtype) * 4 for _ in range(3))
    tol = 1e-5 if dtype == np.float32 else 1e-13
    z = blocks.gated_product(e, u, activation, "numba")
    assert z.dtype == dtype
    np.testing.assert_allclose(z, blocks.gated_product(e, u, activation), rtol=tol, atol=tol)
    for a, b in zip(blocks.gated_backward(dz, e, u, activation, "numba"),
                    blocks.gated_backward(dz, e, u, activation), strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 10)


@given(seed=st.integers(0, 2**32 - 1), N=st.integers(0, 7), H=st.integers(0, 9),
       pad=st.integers(1, 3), activation=st.sampled_from(blocks.ACTIVATIONS),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_the_gated_kernels_take_strided_views_as_they_are(seed, N, H, pad, activation, dtype):
    """A merged projection's outputs are views whose rows are hidden + r apart: the kernels
    read them in place and give the bits of contiguous copies, leaving the views untouched."""
    rng = np.random.default_rng(seed)
    wide = [rng.standard_normal((N, H + pad)).astype(dtype) * 4 for _ in range(3)]
    before = [w.copy() for w in wide]
    e, u, dz = (w[:, :H] for w in wide)  # (N, H) views, rows H + pad apart
    assert H == 0 or N < 2 or not e.flags.c_contiguous
    e_c, u_c, dz_c = (np.ascontiguousarray(a) for a in (e, u, dz))
    np.testing.assert_array_equal(blocks.gated_product(e, u, activation, "numba"),
                                  blocks.gated_product(e_c, u_c, activation, "numba"))
    for a, b in zip(blocks.gated_backward(dz, e, u, activation, "numba"),
                    blocks.gated_backward(dz_c, e_c, u_c, activation, "numba"), strict=True):
        assert a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
    for w, b in zip(wide, before, strict=True):
        np.testing.assert_array_equal(w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_of_very_negative_inputs_is_zero_without_an_overflow_warning(backend, dtype):
    """exp(−e) overflows to inf for e ≪ 0 (e < −89 in float32), which makes σ = 0 and silu
    and its derivative exactly (−)0: an intended overflow, not one to warn a user about."""
    e = np.array([[-1e4, -200.0, -90.0, 0.0, 90.0]], dtype)
    u, dz = np.ones_like(e), np.ones_like(e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = blocks.gated_product(e, u, "silu", backend)
        de, du = blocks.gated_backward(dz, e, u, "silu", backend)
    overflows = -e > np.log(np.finfo(dtype).max)  # e = −1e4 in both, −200 and −90 in float32
    assert overflows.sum() == (3 if dtype == np.float32 else 1)
    np.testing.assert_array_equal(z[overflows], 0.0)
    np.testing.assert_array_equal(de[overflows], 0.0)
    np.testing.assert_allclose(du, z, rtol=1e-6, atol=0)  # du = act(e) with dz = u = 1
    assert z[0, 3] == 0.0 and z[0, 4] == dtype(90.0)


def test_the_gated_kernels_check_shapes():
    from minilora.ops import lora_numba

    e = np.ones((3, 4))
    with pytest.raises(ValueError, match="every array must be"):
        lora_numba.gated_forward(e, np.ones((3, 5)), 0)
    with pytest.raises(ValueError, match="every array must be"):
        lora_numba.gated_backward(np.ones((2, 4)), e, e, 1)
    with pytest.raises(ValueError, match="every array must be"):
        lora_numba.gated_forward(np.ones(4), np.ones(4), 0)
    with pytest.raises(TypeError, match="one dtype"):
        lora_numba.gated_forward(e, e.astype(np.float32), 0)
    with pytest.raises(TypeError, match="one dtype"):
        lora_numba.gated_backward(e.astype(int), e.astype(int), e.astype(int), 0)


@given(seed=st.integers(0, 2**32 - 1), N=st.integers(0, 9), H=st.integers(0, 6),
       block=st.integers(1, 13), strided=st.booleans(),
       activation=st.sampled_from(blocks.ACTIVATIONS),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_the_gated_passes_give_the_same_bits_a_block_of_rows_at_a_time(
        seed, N, H, block, strided, activation, dtype):
    """The gated passes run ``GATED_BLOCK`` elements of rows at a time (strided inputs copied a
    block at a time): any block size gives the one-block pass's bits."""
    from minilora.ops import lora_numba

    rng = np.random.default_rng(seed)
    wide = [rng.standard_normal((N, H + 2)).astype(dtype) * 4 for _ in range(3)]
    e, u, dz = (w[:, :H] if strided else np.ascontiguousarray(w[:, :H]) for w in wide)
    kind = blocks.ACTIVATIONS.index(activation)
    whole = (lora_numba.gated_forward(e, u, kind), *lora_numba.gated_backward(dz, e, u, kind))
    saved = lora_numba.GATED_BLOCK
    lora_numba.GATED_BLOCK = block
    try:
        blocked = (lora_numba.gated_forward(e, u, kind),
                   *lora_numba.gated_backward(dz, e, u, kind))
    finally:
        lora_numba.GATED_BLOCK = saved
    for a, b in zip(blocked, whole, strict=True):
        np.testing.assert_array_equal(a, b)


@given(seed=st.integers(0, 2**32 - 1), block=st.sampled_from(["qkv", "mlp", "multi"]),
       backend=st.sampled_from(BACKENDS), lead=st.sampled_from([(3,), (2, 2), (1, 1, 2)]),
       d_in=st.integers(1, 5), d_out=st.integers(1, 5), activation=st.sampled_from(
           blocks.ACTIVATIONS), dropout=st.booleans(), bias=st.booleans())
def test_every_block_gradient_matches_finite_differences(seed, block, backend, lead, d_in, d_out,
                                                         activation, dropout, bias):
    """Drawn shapes and options: every gradient of every block (dx, each dA, dB, dW) against
    central differences, on both backends."""
    rng = np.random.default_rng(seed)
    if block == "multi":
        x, W, A, B, index, kw = multi_problem(rng, lead=lead, d_in=d_in, d_out=d_out,
                                              dropout=dropout, bias=bias)
        forward, backward, inputs = _flat_multi(x, W, A, B, index, kw, backend)
    else:
        if block == "qkv":
            x, W, A, B, kw = qkv_problem(rng, lead=lead, d_in=d_in, bias=bias, dropout=dropout)
        else:
            x, W, A, B, kw = mlp_problem(rng, lead=lead, d_in=d_in, d_out=d_out, dropout=dropout,
                                         bias=bias)
            kw["activation"] = activation
        forward_op, backward_op = ((blocks.lora_qkv_forward, blocks.lora_qkv_backward)
                                   if block == "qkv" else
                                   (blocks.lora_mlp_forward, blocks.lora_mlp_backward))
        P = len(W)

        def forward(x, **p):
            out, cache = forward_op(x, [p[f"W{j}"] for j in range(P)],
                                    [p[f"A{j}"] for j in range(P)],
                                    [p[f"B{j}"] for j in range(P)], backend=backend, **kw)
            if isinstance(out, tuple):
                return np.concatenate(out, axis=-1), (cache, [y.shape[-1] for y in out])
            return out, (cache, None)

        def backward(dy, state):
            cache, sizes = state
            up = np.split(dy, np.cumsum(sizes)[:-1], axis=-1) if sizes else dy
            g = backward_op(up, cache, need_dW=True)
            return {"x": g.dx} | {f"{n}{j}": getattr(g, f"d{n}")[j] for j in range(P)
                                  for n in "WAB"}

        inputs = {"x": x} | _named(W, A, B)
    ml.gradcheck(forward, backward, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["qkv", "mlp", "multi"])
def test_scaling_arrays_give_the_list_forms_bits(name, backend):
    """Issue 20: a 1-D array of P (or K) reals is taken as the list is, a 0-d array as one
    value, with the same bits; any other array is a TypeError naming scaling."""
    rng = np.random.default_rng(11)
    problem = PROBLEMS[name](rng)
    values = [0.5, -1.5, 3.0]
    forms = {"list": (values, [np.array(values), np.array(values, np.float32).astype(float),
                               np.array(values)[::-1][::-1]]),
             "one": (2.5, [np.array(2.5), np.float64(2.5), np.array(2.5, np.float32)]),
             "ints": ([1, 2, 3], [np.array([1, 2, 3]), np.array([1, 2, 3], np.int8)])}
    for reference, arrays in forms.values():
        ys0, g0 = _block_run(name, problem, reference, backend)
        for form in arrays:
            ys1, g1 = _block_run(name, problem, form, backend)
            for a, b in zip(ys0 + (g0.dx, *g0.dA, *g0.dB), ys1 + (g1.dx, *g1.dA, *g1.dB),
                            strict=True):
                assert np.array_equal(a, b), (form, a, b)
    ys2, _ = _block_run(name, problem, [0.5, -1.5, 3.5], backend)
    assert not np.array_equal(ys0[0], ys2[0]) or not np.array_equal(ys0[-1], ys2[-1])
    for bad, error, text in [(np.ones((3, 1)), TypeError, "shape"),
                             (np.array([True, False, True]), TypeError, "dtype"),
                             (np.array([1 + 1j, 1, 1]), TypeError, "dtype"),
                             (np.array([1.0, 2.0]), ValueError, "scaling"),
                             (np.array([1.0, np.nan, 2.0]), ValueError, "finite")]:
        with pytest.raises(error, match=text):
            _block_run(name, problem, bad, backend)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_multi_backends_are_two_routes_that_agree(dtype, monkeypatch):
    """Issue 21: backend "numpy" runs each adapter's tokens through a reference LoRA layer
    (lora_numpy, K forward and K backward calls), backend "numba" the fused route (one frozen
    product over every token, none of lora_numpy's calls). They agree to tight tolerance, and a
    bug planted in the reference shows in its results alone."""
    from minilora.ops import lora_numpy

    rng = np.random.default_rng(21)
    d, K = 64, 3
    index = np.concatenate([np.zeros(300, int), np.tile([1, -1], 150), np.full(8, 2)])  # a run,
    # scattered tokens, a short run
    N = index.size
    x = rng.standard_normal((N, d)).astype(dtype)
    W = (rng.standard_normal((d, d)) / 8).astype(dtype)
    A = [rng.standard_normal((r, d)).astype(dtype) / 8 for r in (4, 2, 3)]
    B = [rng.standard_normal((d, r)).astype(dtype) for r in (4, 2, 3)]
    dy = rng.standard_normal((N, d)).astype(dtype)
    mask = dropout_mask(rng, x.shape).astype(dtype)
    calls = []
    true_forward, true_backward = lora_numpy.forward, lora_numpy.backward

    def spy(*args, **kw):
        calls.append("forward")
        return true_forward(*args, **kw)

    monkeypatch.setattr(lora_numpy, "forward", spy)

    def run(backend, **kw):
        calls.clear()
        y, cache = blocks.multi_lora_forward(x, W, A, B, index, scaling=[0.5, 2.0, -1.0],
                                             backend=backend, **kw)
        assert [c.backend for c in cache.caches] == [backend] * K
        assert calls == (["forward"] * K if backend == "numpy" else [])
        return (y, *blocks.multi_lora_backward(dy, cache, need_dW=True)[:4])

    tol = 2e-5 if dtype == np.float32 else 1e-12

    def agree(a, b):
        for u, v in zip(a, b, strict=True):
            for p, q in zip(u if isinstance(u, list) else [u], v if isinstance(v, list) else [v],
                            strict=True):
                np.testing.assert_allclose(q, p, rtol=tol, atol=tol * np.max(np.abs(p)))

    for kw in ({}, {"dropout_mask": mask}):
        reference, fast = run("numpy", **kw), run("numba", **kw)
        agree(reference, fast)

    def planted(*args, **kw):  # dA one part in 10⁴ off
        dx, dA, dB, dW, dbias = true_backward(*args, **kw)
        return dx, dA * (1 + 1e-4), dB, dW, dbias

    monkeypatch.setattr(lora_numpy, "backward", planted)
    agree(fast, run("numba", dropout_mask=mask))
    with pytest.raises(AssertionError):
        agree(fast, run("numpy", dropout_mask=mask))


@given(seed=st.integers(0, 2**32 - 1), N=st.integers(0, 200), H=st.integers(0, 12),
       activation=st.sampled_from(blocks.ACTIVATIONS),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_the_gated_kernels_repeat_their_bits_and_match_the_reference(seed, N, H, activation,
                                                                    dtype):
    """The gated kernels (single-threaded: ``minilora.ops._jit`` says why): the same bits on every
    call, and the NumPy reference's values."""
    rng = np.random.default_rng(seed)
    e, u, dz = (rng.standard_normal((N, H)).astype(dtype) * 4 for _ in range(3))
    tol = 1e-5 if dtype == np.float32 else 1e-13
    runs = [(blocks.gated_product(e, u, activation, "numba"),
             *blocks.gated_backward(dz, e, u, activation, "numba")) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert np.array_equal(a, b, equal_nan=True)
    reference = (blocks.gated_product(e, u, activation),
                 *blocks.gated_backward(dz, e, u, activation))
    for a, b in zip(runs[0], reference, strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("name", ["qkv", "mlp"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_merge_weights_small_next_to_their_activations(name, dtype, monkeypatch):
    """Issue 20: a block whose largest weight is at most an eighth of its activations merges
    every projection's weight in each pass (numba backend), even where the layer's own size
    rule would keep the blocked route, and keeps no merged weight between the passes. It
    matches the reference, repeats its bits, and with dropout takes the blocked route."""
    from minilora.ops import lora_numba

    rng = np.random.default_rng(20)
    N, d, hidden = 400, 128, 160
    problem = (qkv_problem(rng, lead=(N,), d_in=d, outs=(d, d, 96), ranks=(4, 2, 4),
                           dropout=False) if name == "qkv" else
               mlp_problem(rng, lead=(N,), d_in=d, hidden=hidden, d_out=d, ranks=(4, 2, 4),
                           dropout=False))
    *arrays, kw = _in_dtype(problem, dtype)
    arrays[2] = [(a / np.sqrt(a.shape[1])).astype(dtype) for a in arrays[2]]  # e, u of order 1
    weights = arrays[1]
    for w in weights:  # each layer alone: large and blocked
        assert not lora_numba._is_small(N, w.shape[1], w.shape[0])
    assert not any(lora_numba._merges(N, w.shape[1], w.shape[0], None) for w in weights)
    formed = []
    true_bordered = lora_numba._bordered_weight

    def count(*args):
        formed.append(1)
        return true_bordered(*args)

    monkeypatch.setattr(lora_numba, "_bordered_weight", count)
    forward, backward = BLOCK_OPS[name]
    dys = None

    def run(backend, **extra):
        nonlocal dys
        y, cache = forward(*arrays, backend=backend, **{**kw, **extra})
        ys = y if isinstance(y, tuple) else (y,)
        caches = cache.caches if name == "qkv" else (*cache.gate_up.caches, cache.down)
        if dys is None:
            dys = tuple(rng.standard_normal(v.shape).astype(dtype) for v in ys)
        g = backward(dys if name == "qkv" else dys[0], cache)
        return ys + (g.dx,) + g.dA + g.dB, caches

    reference, _ = run("numpy")
    formed.clear()
    fast, caches = run("numba")
    assert all(c.merge_weight and c.kept is not None for c in caches)
    assert len(formed) == len(weights)  # each weight formed once, kept for the backward
    again, _ = run("numba")
    tol = 1e-4 if dtype == np.float32 else 1e-11
    for a, b, c in zip(reference, fast, again, strict=True):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol * np.max(np.abs(a)))
        assert np.array_equal(b, c)
    formed.clear()
    shapes = [(N, d)] * 3 if name == "qkv" else [(N, d), (N, d), (N, hidden)]
    run("numba", dropout_mask=[dropout_mask(rng, s).astype(dtype) for s in shapes])
    assert not formed  # dropout: no merged weight exists
