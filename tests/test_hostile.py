"""The core under hostile use: caches changed between the passes, ndarray subclasses, arrays
changed in place, NaN and infinity in every input on every route. Nothing may crash the process,
pass silently, or differ between the backends. (Hostile files: tests/test_hostile_files.py.)"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _helpers import BACKENDS, dropout_mask, functional_grads, lora_arrays
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora.ops import lora_numba

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")


def _problem(N=6, d_in=5, d_out=4, r=2, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    arrays = lora_arrays(rng, N, d_in, d_out, r, dtype)
    return arrays | dict(m=rng.uniform(0.5, 2, d_out).astype(dtype),
                         dy=rng.standard_normal((N, d_out)).astype(dtype))


# -- memory safety: a cache that no longer matches must never reach a kernel ---------------------

def test_reshaping_or_subclassing_between_the_passes_never_corrupts_the_process():
    """The two reported crashes, 300 times each in a fresh process (a corrupted heap shows as a
    signal or an abort, which the exit code catches): (a) x.shape set in place between forward
    and backward, on every route of the numba backend; (b) dy as np.matrix to dora_backward."""
    code = textwrap.dedent("""
        import numpy as np, minilora as ml
        from minilora.ops import lora_numba
        rng = np.random.default_rng(0)
        outcomes = set()
        for i in range(300):
            N, d_in, d_out = (16, 256, 8) if i % 3 else (600, 16, 16)
            lora_numba.SMALL_WORK = [1 << 18, 0, 0][i % 3]
            x = rng.standard_normal((N, d_in)).astype(np.float32)
            W = rng.standard_normal((d_out, d_in)).astype(np.float32)
            A = rng.standard_normal((4, d_in)).astype(np.float32)
            B = rng.standard_normal((d_out, 4)).astype(np.float32)
            dy = rng.standard_normal((N, d_out)).astype(np.float32)
            ref = ml.lora_backward(dy, ml.lora_forward(x, W, A, B, scaling=0.5)[1])
            y, cache = ml.lora_forward(x, W, A, B, scaling=0.5, backend="numba")
            x.shape = (d_in, N)            # the caller's object changes shape, not the cache's
            g = ml.lora_backward(dy, cache)
            assert np.array_equal(g.dx, ref.dx) and np.array_equal(g.dA, ref.dA)
            x.shape = (N, d_in)
            m = np.linalg.norm(W, axis=1)
            y, cache = ml.dora_forward(x, W, A, B, m, scaling=0.5, backend="numba")
            try:
                ml.dora_backward(np.asmatrix(dy), cache)
            except TypeError as e:
                outcomes.add(str(e).split(",")[0])
        print(sorted(outcomes))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "numpy.matrix" in result.stdout


def _tampered_caches(op):
    """(description, cache) pairs: the forward's cache changed in every way a caller could."""
    p = _problem()
    if op == "lora":
        _, cache = ml.lora_forward(p["x"], p["W"], p["A"], p["B"], scaling=0.5, backend="numba")
    else:
        _, cache = ml.dora_forward(p["x"], p["W"], p["A"], p["B"], p["m"], scaling=0.5,
                                   detach_norm=False, backend="numba")
    out = []
    x_view = cache.x.view()
    x_view.shape = (cache.x.shape[1], cache.x.shape[0])
    out.append(("x transposed in place", cache._replace(x=x_view)))
    for field in ("x", "W", "A", "B"):
        a = getattr(cache, field)
        out.append((f"{field} one row short", cache._replace(**{field: a[:-1]})))
        out.append((f"{field} one column short", cache._replace(**{field: a[:, :-1]})))
        out.append((f"{field} as float32", cache._replace(**{field: a.astype(np.float32)})))
        out.append((f"{field} as a matrix", cache._replace(**{field: np.asmatrix(a)})))
        out.append((f"{field} as a list", cache._replace(**{field: a.tolist()})))
    out.append(("mask of the wrong shape", cache._replace(mask=np.ones((2, 2)))))
    out.append(("x_shape lies", cache._replace(x_shape=(7, 5))))
    out.append(("x_shape not a tuple", cache._replace(x_shape=[6, 5])))
    out.append(("fan_in_fan_out flipped", cache._replace(fan_in_fan_out=True)))
    out.append(("unknown backend", cache._replace(backend="cuda")))
    out.append(("scaling not a float", cache._replace(scaling="0.5")))
    if op == "lora":
        out.append(("h one row short", cache._replace(h=cache.h[:-1])))
        out.append(("h as float32", cache._replace(h=cache.h.astype(np.float32))))
    else:
        for field in ("u", "h", "c", "inv_n", "WA", "AA", "x_d"):
            a = getattr(cache.saved, field)
            out.append((f"saved.{field} one row short",
                        cache._replace(saved=cache.saved._replace(**{field: a[:-1]}))))
        out.append(("saved as a dict", cache._replace(saved=cache.saved._asdict())))
        out.append(("WA dropped with the full gradient",
                    cache._replace(saved=cache.saved._replace(WA=None))))
    out.append(("a tuple instead of the cache", tuple(cache)))
    return out


@pytest.mark.parametrize("op", ["lora", "dora"])
def test_a_tampered_cache_is_refused_before_any_kernel_runs(op, monkeypatch):
    """Refused by the public entry's check: no backend's backward (whose kernels would raise a
    ValueError of their own, or index out of bounds) is reached."""
    from minilora.ops import dora, lora_numpy

    reached = []
    for module in (lora_numba, lora_numpy, dora):
        def spy(*args, _real=module.backward, _name=module.__name__, **kw):
            reached.append(_name)
            return _real(*args, **kw)
        monkeypatch.setattr(module, "backward", spy)
    backward = ml.lora_backward if op == "lora" else ml.dora_backward
    dy = _problem()["dy"]
    for description, cache in _tampered_caches(op):
        with pytest.raises((TypeError, ValueError), match="cache"):  # the entry's message
            backward(dy, cache, need_dW=True)
            pytest.fail(f"accepted a cache with {description}")
        assert reached == [], f"a cache with {description} reached {reached}"
    p = _problem()
    _, cache = (ml.lora_forward(p["x"], p["W"], p["A"], p["B"], scaling=0.5) if op == "lora"
                else ml.dora_forward(p["x"], p["W"], p["A"], p["B"], p["m"], scaling=0.5))
    backward(dy, cache)  # the spies see an untampered cache through
    assert reached


# -- ndarray subclasses ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["x", "W", "A", "B", "m", "bias", "dropout_mask", "dy"])
@pytest.mark.parametrize("wrap", [np.asmatrix, np.ma.masked_array, "subclass"])
def test_ndarray_subclasses_are_refused_with_a_type_error(backend, name, wrap):
    """np.matrix makes * a matrix product, a masked array's mask is ignored by @: both gave
    wrong answers. Every array input refuses them, naming itself."""
    class Tagged(np.ndarray):
        pass

    p = _problem()
    p["bias"] = np.zeros(4)
    p["dropout_mask"] = np.ones((6, 5))
    p[name] = p[name].view(Tagged) if wrap == "subclass" else wrap(p[name])
    args = {k: p[k] for k in ("bias", "dropout_mask")}
    with pytest.raises(TypeError, match=name):
        _, cache = ml.dora_forward(p["x"], p["W"], p["A"], p["B"], p["m"], scaling=0.5,
                                   backend=backend, **args)
        ml.dora_backward(p["dy"], cache)
    if name != "m":
        with pytest.raises(TypeError, match=name):
            _, cache = ml.lora_forward(p["x"], p["W"], p["A"], p["B"], scaling=0.5,
                                       backend=backend, **args)
            ml.lora_backward(p["dy"], cache)


def test_a_memmap_is_an_ndarray(tmp_path):
    p = _problem()
    x = np.memmap(tmp_path / "x.bin", dtype=p["x"].dtype, mode="w+", shape=p["x"].shape)
    x[...] = p["x"]
    y, _ = ml.lora_forward(x, p["W"], p["A"], p["B"], scaling=0.5)
    assert type(y) is np.ndarray
    assert np.array_equal(y, ml.lora_forward(p["x"], p["W"], p["A"], p["B"], scaling=0.5)[0])


# -- arrays changed in place between the passes ----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["lora", "dora"])
@pytest.mark.parametrize("name", ["x", "W", "A", "B", "dropout_mask"])
def test_check_unchanged_detects_every_array_the_backward_reads(backend, op, name):
    p = _problem()
    p["dropout_mask"] = np.full((6, 5), 2.0)
    kw = dict(scaling=0.5, dropout_mask=p["dropout_mask"], backend=backend, check_unchanged=True)
    if op == "lora":
        _, cache = ml.lora_forward(p["x"], p["W"], p["A"], p["B"], **kw)
    else:
        _, cache = ml.dora_forward(p["x"], p["W"], p["A"], p["B"], p["m"], **kw)
    backward = ml.lora_backward if op == "lora" else ml.dora_backward
    p[name][0, 0] *= 1 + 2**-40  # one entry, by a few ulps
    with pytest.raises(RuntimeError, match=f"{name if name != 'dropout_mask' else 'mask'} "
                                           "changed in place"):
        backward(p["dy"], cache)
    p[name][0, 0] /= 1 + 2**-40
    p[name].flat[0] = np.nextafter(p[name].flat[0], np.inf)
    p[name].flat[0] = np.nextafter(p[name].flat[0], -np.inf)  # restored bit for bit
    got = backward(p["dy"], cache)
    if op == "lora":  # the same bits as a pass that nothing touched
        fresh = backward(p["dy"], ml.lora_forward(p["x"], p["W"], p["A"], p["B"], **kw)[1])
    else:
        fresh = backward(p["dy"], ml.dora_forward(p["x"], p["W"], p["A"], p["B"], p["m"],
                                                  **kw)[1])
    for a, b in zip(got, fresh, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("change", ["layer.B *= 2", "layer.A[0, 0] += 1", "layer.W[1] = 0",
                                    "x[0] = 0"])
def test_the_layer_detects_arrays_changed_between_forward_and_backward(use_dora, change):
    layer = ml.LoRALinear(5, 4, r=2, alpha=4, use_dora=use_dora, dtype=np.float64, seed=0)
    layer.B[...] = 1.0
    x = np.random.default_rng(0).standard_normal((3, 5))
    y = layer(x)
    exec(change, {"layer": layer, "x": x})
    with pytest.raises(RuntimeError, match="changed in place"):
        layer.backward(np.ones_like(y))


def test_the_layer_check_can_be_turned_off():
    """Unchecked, the backward reads the arrays as they are when it runs: here B + 1 (the
    cached h = x Aᵀ does not depend on B), so the gradients of a fresh pass with that B."""
    x, dy = np.ones((3, 5)), np.random.default_rng(1).standard_normal((3, 4))
    layer = ml.LoRALinear(5, 4, r=2, dtype=np.float64, seed=0, check_unchanged=False)
    layer(x)
    layer.B += 1
    dx = layer.backward(dy)
    g = functional_grads(layer, x, dy)
    np.testing.assert_allclose(dx, g.dx, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(layer.grads["A"], g.dA, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(layer.grads["B"], g.dB, rtol=1e-13, atol=1e-13)


# -- NaN and infinity: the reference's IEEE propagation on every route -----------------------------

ROUTES = {  # name: (SMALL_WORK, N, d_in, d_out), chosen so that the route is the named one
    "small": (1 << 18, 6, 5, 4),
    "merged": (0, 64, 4, 4),
    "blocked": (0, 3, 8, 8),
}


def _outputs(op, p, backend, mask):
    kw = dict(scaling=p["s"], bias=p["bias"], dropout_mask=mask, backend=backend)
    if op == "lora":
        y, cache = ml.lora_forward(p["x"], p["W"], p["A"], p["B"], **kw)
        g = ml.lora_backward(p["dy"], cache, need_dW=True, need_dbias=True)
    else:
        y, cache = ml.dora_forward(p["x"], p["W"], p["A"], p["B"], p["m"], **kw)
        g = ml.dora_backward(p["dy"], cache, need_dW=True, need_dbias=True)
    return {"y": y, **{k: v for k, v in g._asdict().items() if v is not None}}


@given(route=st.sampled_from(sorted(ROUTES)), op=st.sampled_from(["lora", "dora"]),
       name=st.sampled_from(["x", "W", "A", "B", "bias", "mask", "dy", "m", "s"]),
       value=st.sampled_from([np.nan, np.inf, -np.inf]), B_zero=st.booleans(),
       with_mask=st.booleans(), seed=st.integers(0, 2**16))
def test_nan_and_inf_propagate_as_in_the_reference_on_every_route(
        route, op, name, value, B_zero, with_mask, seed):
    """Both backends put NaN, +inf and −inf in the same places, whichever input holds one,
    including B = 0, where the merged route would otherwise turn NaN into inf."""
    small_work, N, d_in, d_out = ROUTES[route]
    p = _problem(N, d_in, d_out, 2, seed=seed)
    rng = np.random.default_rng(seed)
    p["bias"] = rng.standard_normal(d_out)
    p["s"] = 0.5
    if B_zero:
        p["B"][...] = 0
    mask = dropout_mask(rng, (N, d_in)) if with_mask or name == "mask" else None
    if name == "s":
        p["s"] = 0.0  # with a non-finite value elsewhere, 0·inf in the scaling
        p["x"][rng.integers(N), rng.integers(d_in)] = value
    elif name == "mask":
        mask[rng.integers(N), rng.integers(d_in)] = value
    elif name != "m" or op == "dora":
        p[name].flat[rng.integers(p[name].size)] = value
    saved = lora_numba.SMALL_WORK
    lora_numba.SMALL_WORK = small_work
    try:
        assert lora_numba._route(N, d_in, d_out, mask) in (route, "blocked")
        with np.errstate(all="ignore"):
            ref = _outputs(op, p, "numpy", mask)
            got = _outputs(op, p, "numba", mask)
    finally:
        lora_numba.SMALL_WORK = saved
    assert set(ref) == set(got)
    for k in ref:
        for pattern in (np.isnan, np.isposinf, np.isneginf):
            assert np.array_equal(pattern(ref[k]), pattern(got[k])), (k, pattern.__name__)
        finite = np.isfinite(ref[k])  # and the same values everywhere else
        scale = max(1.0, float(np.max(np.abs(ref[k][finite]), initial=0.0)))
        np.testing.assert_allclose(got[k][finite], ref[k][finite], rtol=1e-12,
                                   atol=1e-12 * scale, err_msg=k)
