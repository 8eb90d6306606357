"""The Numba kernels against the NumPy reference they implement."""

import functools

import numpy as np
import pytest
from _helpers import dropout_mask, lora_arrays
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora.ops import lora_numba
from minilora.oracle.tolerance import UNIT_ROUNDOFF, lora_error_bounds
from minilora.testing import assert_matches_reference, dora_cases, lora_cases


def _run(case, backend, x=None, W=None):
    x = case.x if x is None else x
    W = case.W if W is None else W
    y, cache = ml.lora_forward(x, W, case.A, case.B, backend=backend, **case.kwargs())
    g = ml.lora_backward(case.dy, cache, need_dW=True, need_dbias=case.bias is not None)
    return {"y": y, **{k: v for k, v in g._asdict().items() if v is not None}}


def _assert_close_to_reference(case, got, ref):
    """Within twice the derived rounding bound of the arrays' dtype: both results are within the
    bound of the exact value, so they are within twice it of each other."""
    u = UNIT_ROUNDOFF[case.x.dtype]
    bounds = lora_error_bounds(case.x, case.W, case.A, case.B, dy=case.dy, u=u, **case.kwargs())
    for name, value in got.items():
        assert value.dtype == case.x.dtype and value.shape == ref[name].shape, name
        err = np.abs(value.astype(np.float64) - ref[name])
        assert np.all(err <= 2 * bounds[name]), (name, float(np.max(err - 2 * bounds[name])))


@pytest.fixture(params=["fused", "blocked", "merged"])
def route(request, monkeypatch):
    """Run a test through each route of the numba backend: the fused small-layer kernels, the
    blocked BLAS route (3-row blocks, so that drawn batches span several blocks and a partial
    last one) and the merged-weight route (taken without dropout only)."""
    monkeypatch.setattr(lora_numba, "SMALL_WORK", 1 << 62 if request.param == "fused" else -1)
    monkeypatch.setattr(lora_numba, "ROW_BLOCK", 3)
    merge = request.param == "merged"
    monkeypatch.setattr(lora_numba, "_merges", lambda N, d_in, d_out, mask: merge and mask is None)
    return request.param


# The route fixture only sets module constants, which stay valid across Hypothesis's examples.
same_route = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@same_route
@given(case=lora_cases(max_dim=20))
def test_kernels_match_the_reference(route, case):
    _assert_close_to_reference(case, _run(case, "numba"), _run(case, "numpy"))


@same_route
@given(case=lora_cases(max_dim=20), order=st.sampled_from(["F", "strided"]))
def test_non_contiguous_and_fortran_inputs(route, case, order):
    if order == "F":
        x, W = np.asfortranarray(case.x), np.asfortranarray(case.W)
    else:  # every other column of a wider array
        wide = np.repeat(case.x, 2, axis=-1)
        x = wide[..., ::2]
        W = np.repeat(case.W, 2, axis=1)[:, ::2]
    _assert_close_to_reference(case, _run(case, "numba", x=x, W=W), _run(case, "numpy"))


@same_route
@given(case=dora_cases(dtypes=(np.float64,), max_dim=12), need_dW=st.booleans())
def test_dora_through_each_route_matches_the_reference(route, case, need_dW):
    """DoRA's LoRA part through each route: on the merged one its backward scales the kept
    weight's rows by c instead of dy (unless dW is asked for, which needs c ⊙ dy itself)."""
    y, cache = ml.dora_forward(case.x, case.W, case.A, case.B, case.m, backend="numba",
                               detach_norm=case.detach_norm, **case.kwargs())
    grads = ml.dora_backward(case.dy, cache, need_dW=need_dW, need_dbias=case.bias is not None)
    outputs = {"y": y, **{k: v for k, v in grads._asdict().items() if v is not None}}
    assert_matches_reference(outputs, case, dtype="fp64")


def test_large_batch_takes_the_blocked_and_merged_routes_and_matches():
    """Default settings, shapes big enough for the BLAS routes and several row blocks: merged
    without dropout (the weight is small next to the activations), blocked with it."""
    rng = np.random.default_rng(3)
    N, d_in, d_out, r = 1500, 96, 80, 6
    assert N * d_in * d_out > lora_numba.SMALL_WORK and N > 2 * lora_numba.ROW_BLOCK
    assert lora_numba._merges(N, d_in, d_out, None)
    for mask in (None, dropout_mask(rng, (N, d_in), p=0.2)):
        case = _Case(rng, N, d_in, d_out, r, mask)
        _assert_close_to_reference(case, _run(case, "numba"), _run(case, "numpy"))
        first, second = _run(case, "numba"), _run(case, "numba")
        for k in first:
            np.testing.assert_array_equal(first[k], second[k])


def test_merged_route_keeps_its_weight_for_the_backward_and_not_y():
    """The merged route's backward takes the forward's bordered weight back (the same bits as
    forming it again), and the cache's h is its own array: dropping y frees y's buffer."""
    rng = np.random.default_rng(4)
    N, d_in, d_out, r = 1500, 96, 80, 6
    case = _Case(rng, N, d_in, d_out, r, None)
    y, cache = ml.lora_forward(case.x, case.W, case.A, case.B, backend="numba", **case.kwargs())
    assert cache.kept is not None and cache.kept.shape == (d_out + r, d_in + r)
    assert cache.h.base is None and not np.shares_memory(cache.h, y)
    kept = ml.lora_backward(case.dy, cache, need_dbias=True)
    again = ml.lora_backward(case.dy, cache._replace(kept=None), need_dbias=True)
    for a, b in zip(kept, again, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"cache\.kept"):
        ml.lora_backward(case.dy, cache._replace(kept=cache.kept[:-1]))


def test_merge_weight_merges_within_each_pass_and_keeps_nothing():
    """lora_forward's merge_weight: a large layer the size rule sends to the blocked route
    merges its weight instead, keeps it for the backward pass and matches the reference
    (with it or formed again); the numpy backend and dropout ignore it; a cache whose flag is not a
    bool is refused."""
    rng = np.random.default_rng(5)
    N, d_in, d_out, r = 400, 128, 96, 4
    assert not lora_numba._is_small(N, d_in, d_out) and not lora_numba._merges(N, d_in, d_out,
                                                                                None)
    assert lora_numba._route(N, d_in, d_out, None, merge_weight=True) == "merged"
    case = _Case(rng, N, d_in, d_out, r, None)
    y, cache = ml.lora_forward(case.x, case.W, case.A, case.B, backend="numba",
                               merge_weight=True, **case.kwargs())
    assert cache.merge_weight and cache.kept is not None
    merged = {"y": y, **ml.lora_backward(case.dy, cache, need_dbias=True)._asdict()}
    del merged["dW"]
    _assert_close_to_reference(case, merged, _run(case, "numpy"))
    again = ml.lora_backward(case.dy, cache._replace(kept=None), need_dbias=True)._asdict()
    for key in ("dx", "dA", "dB", "dbias"):  # K formed again: the same bits
        np.testing.assert_array_equal(again[key], merged[key])
    blocked = _run(case, "numba")
    assert any(not np.array_equal(merged[k], blocked[k]) for k in merged)  # another route
    _, ref_cache = ml.lora_forward(case.x, case.W, case.A, case.B, backend="numpy",
                                   merge_weight=True, **case.kwargs())
    assert not ref_cache.merge_weight
    with pytest.raises(ValueError, match="modified"):
        ml.lora_backward(case.dy, cache._replace(merge_weight=1))
    masked = _Case(rng, N, d_in, d_out, r, dropout_mask(rng, (N, d_in), p=0.2))
    _, cache = ml.lora_forward(masked.x, masked.W, masked.A, masked.B, backend="numba",
                               merge_weight=True, **masked.kwargs())
    assert lora_numba._route(N, d_in, d_out, cache.mask, merge_weight=True) == "blocked"


class _Case:
    def __init__(self, rng, N, d_in, d_out, r, mask):
        self.x, self.W, self.A, self.B = lora_arrays(rng, N, d_in, d_out, r).values()
        self.dy = rng.standard_normal((N, d_out))
        self.bias = rng.standard_normal(d_out)
        self.mask = mask

    def kwargs(self):
        return dict(scaling=0.75, bias=self.bias, dropout_mask=self.mask, fan_in_fan_out=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_products_match_numpy(dtype):
    """The three building blocks, on odd sizes that exercise the 4-way unroll's remainder."""
    rng = np.random.default_rng(4)
    tol = dict(rtol=0, atol=1e-5 if dtype == np.float32 else 1e-13)  # entries are O(1)..O(10)
    M = rng.standard_normal((7, 13)).astype(dtype)
    u, c = rng.standard_normal(13).astype(dtype), rng.standard_normal(7).astype(dtype)
    out = np.ones(7, dtype)
    lora_numba._matvec_acc(u, M, out)
    np.testing.assert_allclose(out, 1 + M @ u, **tol)
    out = np.ones(13, dtype)
    lora_numba._vecmat_acc(c, M, out)
    np.testing.assert_allclose(out, 1 + c @ M, **tol)
    out = np.ones((7, 13), dtype)
    lora_numba._outer_acc(c, u, out)
    np.testing.assert_allclose(out, 1 + np.outer(c, u), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_refuses_shapes_it_would_index_out_of_bounds(dtype):
    """Bounds checks are off in the kernels, so each checks the shapes it indexes on entry."""
    z = functools.partial(np.zeros, dtype=dtype)
    M = z((7, 13))
    bad_calls = [
        (lora_numba._matvec_acc, (z(12), M, z(7))), (lora_numba._matvec_acc, (z(13), M, z(6))),
        (lora_numba._vecmat_acc, (z(6), M, z(13))), (lora_numba._vecmat_acc, (z(7), M, z(14))),
        (lora_numba._outer_acc, (z(6), z(13), M)), (lora_numba._outer_acc, (z(7), z(12), M)),
    ]
    x, A, B, y, h = z((5, 4)), z((2, 4)), z((3, 2)), z((5, 3)), z((5, 2))
    s = dtype(1.0)
    for wrong in ({"x": z((5, 5))}, {"B": z((3, 3))}, {"y": z((6, 3))}, {"y": z((5, 2))},
                  {"bias": z(2)}, {"mask": z((4, 4))}):
        args = dict(x=x, A=A, B=B, s=s, bias=None, mask=None, y=y) | wrong
        bad_calls.append((lora_numba._forward_small, tuple(args.values())))
    for wrong in ({"dy": z((5, 4))}, {"h": z((4, 2))}, {"h": z((5, 1))}, {"dx": z((4, 4))},
                  {"dx": z((5, 3))}, {"mask": z((5, 3))}, {"A": z((2, 3))}):
        args = dict(dy=y, x=x, A=A, B=B, h=h, s=s, mask=None, dx=z((5, 4))) | wrong
        bad_calls.append((lora_numba._backward_small, tuple(args.values())))
    for kernel, args in bad_calls:
        with pytest.raises(ValueError, match=kernel.__name__):
            kernel(*args)


def test_kernels_run_as_plain_python_with_jit_disabled():
    """NUMBA_DISABLE_JIT=1 (documented for stepping through a kernel) gives the same results."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np, minilora as ml; rng = np.random.default_rng(0); "
            "x, W, A, B = (rng.standard_normal(s) for s in ((3, 5), (4, 5), (2, 5), (4, 2))); "
            "mask = (rng.random((3, 5)) > 0.3) / 0.7; out = []\n"
            "for be in ('numpy', 'numba'):\n"
            "    y, c = ml.lora_forward(x, W, A, B, scaling=0.5, dropout_mask=mask, backend=be)\n"
            "    g = ml.lora_backward(np.ones((3, 4)), c); out.append((y, g.dx, g.dA, g.dB))\n"
            "print(max(float(np.abs(a - b).max()) for a, b in zip(*out)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "NUMBA_DISABLE_JIT": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1e-12
