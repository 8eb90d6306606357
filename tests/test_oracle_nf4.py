"""minilora.oracle.nf4: bitsandbytes' NF4 in NumPy (without bitsandbytes: its parity is
tests/test_oracle_nf4_bnb.py) and the NF4 case family."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import oracle
from minilora.oracle import nf4
from minilora.oracle.cases import emulate, make_case
from minilora.oracle.precision import precision

C = nf4.NF4_CODE.astype(np.float64)


def weights(max_n=300):
    """(shape, float32 weight, blocksize): sizes that do and do not divide into blocks."""
    return st.tuples(st.lists(st.integers(1, 40), min_size=1, max_size=3).filter(
        lambda s: np.prod(s) <= max_n), st.integers(0, 2**32 - 1),
        st.sampled_from((32, 64, 128)), st.floats(1e-3, 1e3))


def draw(shape, seed, scale):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# -- the code book and the dynamic map ------------------------------------------------------

def test_code_book_is_bitsandbytes_nf4_table():
    assert nf4.NF4_CODE.dtype == np.float32 and nf4.NF4_CODE.shape == (16,)
    assert np.all(np.diff(C) > 0)  # sorted: index order is value order
    assert (C[0], C[7], C[15]) == (-1.0, 0.0, 1.0)
    assert np.sum(C < 0) == 7 and np.sum(C > 0) == 8  # asymmetric: an exact 0 and ±1
    assert C[8] == np.float32(0.07958029955625534) and C[1] == np.float32(-0.6961928009986877)


def test_dynamic_map_properties():
    d = nf4.dynamic_map()
    assert d.dtype == np.float32 and d.shape == (256,)
    assert np.all(np.diff(d.astype(np.float64)) > 0)
    assert d[-1] == 1.0 and 0.0 in d and -1.0 < d[0] < -0.99
    pos, neg = d[(d > 0) & (d < 1)], d[d < 0]
    assert pos.size == neg.size == 127 and np.array_equal(np.sort(-neg), pos)  # signed
    assert np.isclose(d[d > 0].min(), 1e-6 * 0.55, rtol=1e-6)  # smallest level: 10⁻⁶·mean


# -- quantize and dequantize ----------------------------------------------------------------

@given(weights())
def test_round_trip_is_idempotent_and_nearest(args):
    shape, seed, blocksize, scale = args
    W = draw(shape, seed, scale)
    q = nf4.quantize_nf4(W, blocksize)
    Wq = nf4.dequantize_nf4(q)
    assert Wq.dtype == np.float64 and Wq.shape == W.shape
    again = nf4.quantize_nf4(Wq.astype(np.float32), blocksize)  # a dequantized W re-quantizes
    assert np.array_equal(again.codes, q.codes) and np.array_equal(again.absmax, q.absmax)
    a = np.repeat(q.absmax.astype(np.float64), blocksize)[:W.size]  # (n,)
    s = W.reshape(-1) / a  # (n,) the scaled values
    dist = np.abs(s[:, None] - C[None, :])  # (n, 16)
    chosen = dist[np.arange(W.size), nf4.unpack_codes(q)]
    assert np.all(chosen <= dist.min(axis=1) + 1e-6)  # the nearest code (float32 ties aside)
    assert np.all(np.abs(Wq.reshape(-1) - W.reshape(-1)) <= a * 0.5 * np.max(np.diff(C)) + 1e-30)


def test_dequantization_is_code_times_absmax_exactly():
    W = draw((5, 64), 1, 3.0)
    q = nf4.quantize_nf4(W, 64)
    Wq = nf4.dequantize_nf4(q)
    idx = nf4.unpack_codes(q).reshape(5, 64)
    assert np.array_equal(Wq, C[idx] * q.absmax.astype(np.float64)[:, None])
    assert not np.array_equal(Wq, Wq.astype(np.float32).astype(np.float64))  # beyond float32


def test_packing_order_high_nibble_first():
    q = nf4.quantize_nf4(np.array([1.0, -1.0, 0.0, 1.0], np.float32), 32)
    assert list(q.codes) == [0xF0, 0x7F]  # codes 15, 0 | 7, 15
    odd = nf4.quantize_nf4(np.array([-1.0, 1.0, -1.0], np.float32), 32)
    assert list(odd.codes) == [0x0F, 0x07]  # the pad is code 7 (the value 0) in the low nibble
    assert np.array_equal(nf4.dequantize_nf4(odd), [-1.0, 1.0, -1.0])


def test_ties_take_the_lower_code():
    mid = (nf4.NF4_CODE[7] + nf4.NF4_CODE[8]) / np.float32(2)  # a float32 midpoint
    top = (nf4.NF4_CODE[14] + nf4.NF4_CODE[15]) / np.float32(2)
    above = np.nextafter(mid, np.float32(1))
    q = nf4.quantize_nf4(np.array([1.0, mid, top, above], np.float32), 32)
    assert list(nf4.unpack_codes(q)) == [15, 7, 14, 8]


def test_blocks_and_the_shorter_last_block():
    W = np.zeros((3, 30), np.float32)  # 90 values: blocks of 64 and 26
    W[0, 0], W[2, 29] = -4.0, 0.5
    q = nf4.quantize_nf4(W, 64)
    assert q.n_blocks == 2 and np.array_equal(q.absmax, np.array([4.0, 0.5], np.float32))
    assert q.codes.shape == (45,) and nf4.dequantize_nf4(q)[2, 29] == 0.5
    zero = nf4.quantize_nf4(np.zeros(70, np.float32), 64)  # absmax 0 and a clamped tail
    assert np.array_equal(nf4.dequantize_nf4(zero), np.zeros(70))
    assert zero.absmax[0] == 0 and zero.absmax[1] == np.float32(1e-38)
    empty = nf4.quantize_nf4(np.zeros((0, 4), np.float32), 64)
    assert nf4.dequantize_nf4(empty).shape == (0, 4)


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
def test_every_blocksize_and_float16_input(blocksize):
    W = draw((3, 1000), blocksize, 0.1).astype(np.float16)
    q = nf4.quantize_nf4(W, blocksize)
    assert q.n_blocks == -(-3000 // blocksize) and q.blocksize == blocksize
    err = np.abs(nf4.dequantize_nf4(q) - W.astype(np.float64))
    assert np.max(err) <= 0.17 * np.max(np.abs(W)) and np.max(err) > 0


def test_input_is_not_modified_and_outputs_do_not_alias():
    W = draw((4, 64), 2, 1.0)
    keep = W.copy()
    q = nf4.quantize_nf4(W, 64, double_quant=True)
    assert np.array_equal(W, keep)
    a = nf4.dequantize_absmax(nf4.quantize_nf4(W, 64))
    a[...] = 0
    assert np.all(nf4.quantize_nf4(W, 64).absmax > 0) and np.all(nf4.dequantize_absmax(q) > 0)


# -- double quantization --------------------------------------------------------------------

def test_double_quantization_structure_and_exact_dequantization():
    W = draw((300, 64), 3, 2.0)  # 300 blocks: absmax blocks of 256 and 44
    single = nf4.quantize_nf4(W, 64)
    q = nf4.quantize_nf4(W, 64, double_quant=True)
    assert q.double_quant and q.absmax_dtype == np.uint8 and q.absmax.shape == (300,)
    assert q.absmax_absmax.dtype == np.float32 and q.absmax_absmax.shape == (2,)
    assert isinstance(q.offset, np.float32)
    assert np.isclose(q.offset, single.absmax.astype(np.float64).mean(), rtol=1e-6)
    assert np.array_equal(q.codes, single.codes)  # the 4-bit codes use the exact absmax
    d = nf4.dynamic_map()
    a2 = np.repeat(q.absmax_absmax, 256)[:300]
    a = ((d[q.absmax] * a2).astype(np.float32) + q.offset).astype(np.float32)  # float32 steps
    assert np.array_equal(nf4.dequantize_absmax(q), a)
    assert np.max(np.abs(a - single.absmax) / single.absmax) < 0.02  # 8 bits around the mean
    Wq = nf4.dequantize_nf4(q)
    idx = nf4.unpack_codes(q).reshape(300, 64)
    assert np.array_equal(Wq, C[idx] * a.astype(np.float64)[:, None])


def test_blockwise_8bit_picks_the_nearest_map_entry():
    x = np.random.default_rng(4).uniform(-1, 1, 1000).astype(np.float32)
    p, a2 = nf4.quantize_blockwise(x, 256)
    d = nf4.dynamic_map().astype(np.float64)
    search = np.concatenate([[-1.0], d[1:]])  # bitsandbytes' CPU kernel searches with d_0 = −1
    v = x / np.repeat(a2, 256)[:1000].astype(np.float64)
    dist = np.abs(v[:, None] - search[None, :])
    assert np.all(dist[np.arange(1000), p] <= dist.min(axis=1) + 1e-7)
    assert np.array_equal(p[np.argsort(v)], np.sort(p))  # monotone in x / a2
    p0, a20 = nf4.quantize_blockwise(np.zeros(3, np.float32), 256)  # a2 = 0: the index of 0
    assert a20[0] == 0 and np.all(d[p0] == 0)


# -- hostile input --------------------------------------------------------------------------

@pytest.mark.parametrize("W, match", [
    (np.arange(8), "float16, float32 or float64"),
    (np.ones(8, np.complex64), "float16, float32 or float64"),
    ([1.0, 2.0], "numpy array"),
    (np.array([1.0, np.nan], np.float32), "NaN or infinite"),
    (np.array([1.0, np.inf], np.float32), "NaN or infinite"),
    (np.array([0.1, 0.2]), "float32 cannot hold"),
])
def test_bad_weights_are_refused(W, match):
    with pytest.raises(ValueError, match=match):
        nf4.quantize_nf4(W)


@pytest.mark.parametrize("blocksize", [0, 63, 8192, "64", 64.0])
def test_bad_blocksizes_are_refused(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4.quantize_nf4(np.ones(8, np.float32), blocksize)


@pytest.mark.parametrize("a, blocksize, match", [
    (np.ones(4), 256, "1-D float32"), (np.ones((2, 2), np.float32), 256, "1-D float32"),
    (np.array([np.nan], np.float32), 256, "NaN"), (np.ones(4, np.float32), 0, "positive int"),
    (np.ones(4, np.float32), True, "positive int")])
def test_bad_blockwise_inputs_are_refused(a, blocksize, match):
    with pytest.raises(ValueError, match=match):
        nf4.quantize_blockwise(a, blocksize)


def test_inconsistent_nf4_weights_are_refused():
    q = nf4.quantize_nf4(draw((4, 32), 5, 1.0), 64)
    dq = nf4.quantize_nf4(draw((4, 32), 5, 1.0), 64, double_quant=True)
    bad = [
        (dict(codes=q.codes.astype(np.int16)), "codes must be uint8"),
        (dict(codes=(q.codes.astype(np.int64) + 16)), "codes must be uint8"),  # out of range
        (dict(codes=q.codes[:-1]), r"codes must have shape \(64,\)"),
        (dict(absmax=q.absmax.astype(np.float64)), "absmax must be float32"),
        (dict(absmax=-q.absmax), "finite and non-negative"),
        (dict(absmax=np.array([np.inf, 1.0], np.float32)), "finite and non-negative"),
        (dict(shape=[4, 32]), "tuple of non-negative ints"),
        (dict(shape=(4, -32)), "tuple of non-negative ints"),
        (dict(shape=(4, 33)), "codes must have shape"),
        (dict(blocksize=48), "blocksize must be one of"),
        (dict(absmax_absmax=np.ones(1, np.float32)), "without an offset"),
        (dict(absmax=dq.absmax), "absmax must be float32"),  # uint8 absmax without its state
    ]
    fields = dict(codes=q.codes, absmax=q.absmax, shape=q.shape, blocksize=64)
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            nf4.NF4Weight(**{**fields, **change})
    nested = dict(codes=dq.codes, absmax=dq.absmax, shape=dq.shape, blocksize=64,
                  absmax_absmax=dq.absmax_absmax, offset=dq.offset)
    for change, match in [(dict(offset=1.5), "offset must be a finite numpy.float32"),
                          (dict(offset=np.float32(np.nan)), "offset must be a finite"),
                          (dict(absmax_absmax=dq.absmax_absmax[:0]), "absmax_absmax must "
                           "have shape"),
                          (dict(absmax=dq.absmax.astype(np.float32)), "must be uint8")]:
        with pytest.raises(ValueError, match=match):
            nf4.NF4Weight(**{**nested, **change})


# -- the case family ------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [dict(), dict(dora=True, bias=True), dict(fan_in_fan_out=True),
                                  dict(lora_only=True), dict(dropout=0.1, seq=3)])
def test_nf4_case_holds_the_exact_dequantization(opts):
    args = dict(d_in=48, d_out=40, r=8, batch=6, dtype="bf16", seed=3, **opts)
    plain = make_case(**args)
    c = nf4.make_nf4_case(blocksize=64, double_quant=True, **args)
    W = c.case.tensors["W"]
    assert W.dtype == np.float64 and W.shape == plain.tensors["W"].shape
    assert np.array_equal(W, nf4.dequantize_nf4(c.weight)) and c.weight.shape == W.shape
    assert c.case.layer["base"] == "nf4" and c.case.layer["double_quant"] is True
    for k, v in plain.tensors.items():
        if k != "W":
            assert np.array_equal(c.case.tensors[k], v), k
    if opts.get("lora_only"):
        assert not np.any(W)
    else:
        assert 0 < np.max(np.abs(W - plain.tensors["W"])) < 0.2 * np.max(np.abs(W))


def test_nf4_case_refuses_blocks():
    with pytest.raises(ValueError, match="takes no block"):
        nf4.make_nf4_case(d_in=8, d_out=8, r=2, block="qkv")


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp64"])
def test_honest_weight_is_the_kernels_float32_product_rounded(dtype):
    c = nf4.make_nf4_case(d_in=64, d_out=16, r=4, dtype=dtype, seed=1)
    Wp = nf4.honest_weight(c.weight, dtype)
    prec = precision(dtype)
    W = c.case.tensors["W"]
    if dtype == "fp64":
        assert np.array_equal(Wp, W)
    else:
        assert np.array_equal(prec.round(Wp).astype(np.float64), Wp)  # representable in p
        assert np.array_equal(Wp, prec.round(W.astype(np.float32)).astype(np.float64))
        assert np.all(np.abs(Wp - W) <= 2 * prec.u * np.abs(W))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_honest_nf4_kernel_passes_and_a_planted_error_fails(dtype):
    c = nf4.make_nf4_case(d_in=64, d_out=32, r=8, batch=4, seq=4, dtype=dtype, seed=2,
                          dora=dtype == "fp32", double_quant=True)
    judge = oracle.Judge(c.case, dtype)  # reference on the exact W
    honest = emulate(nf4.honest_case(c, dtype), dtype)  # a kernel holding W in p
    assert judge.compare(honest).passed
    wrong = dict(honest, dx=honest["dx"] * 1.05)
    assert not judge.compare(wrong).passed
    code_book_off = nf4.honest_case(c, dtype)  # a kernel whose table is off by 1e-2 relative
    code_book_off.tensors["W"] = code_book_off.tensors["W"] * 1.01
    assert not judge.compare(emulate(code_book_off, dtype)).passed


def test_nf4_case_reference_gradients_match_finite_differences():
    from minilora.ops.functional import lora_backward, lora_forward
    from minilora.ops.gradcheck import gradcheck

    c = nf4.make_nf4_case(d_in=64, d_out=12, r=3, batch=5, dtype="fp32", seed=4,
                          double_quant=True, bias=True)
    t = {k: v.astype(np.float64) for k, v in c.case.tensors.items()}
    s = c.case.scaling

    def forward(x, W, A, B, bias):
        return lora_forward(x, W, A, B, scaling=s, bias=bias)

    def backward(dy, cache):
        return lora_backward(dy, cache, need_dx=True, need_dW=True, need_dbias=True)

    report = gradcheck(forward, backward, {k: t[k] for k in ("x", "W", "A", "B", "bias")})
    assert report.passed
    ref = oracle.reference(c.case)  # the oracle's reference is these gradients at the exact W
    y, cache = forward(t["x"], t["W"], t["A"], t["B"], t["bias"])
    grads = backward(t["dy"], cache)
    for name, value in (("y", y), ("dx", grads.dx), ("dA", grads.dA), ("dB", grads.dB),
                        ("dW", grads.dW)):
        assert np.allclose(ref[name], value, rtol=1e-12, atol=1e-12 * np.max(np.abs(value)))


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_nf4_case_file_round_trip_keeps_w_exact(tmp_path, ext):
    c = nf4.make_nf4_case(d_in=64, d_out=16, r=4, dtype="bf16", seed=0, double_quant=True)
    oracle.save_case(tmp_path / f"case.{ext}", c.case)
    loaded = oracle.load_case(tmp_path / f"case.{ext}")
    assert loaded.tensors["W"].dtype == np.float64
    assert np.array_equal(loaded.tensors["W"], c.case.tensors["W"])
    assert loaded.layer["base"] == "nf4" and loaded.layer["double_quant"] is True
    for dtype in ("bf16", "fp16", "fp32", "fp64"):  # the honest W without the codes
        assert np.array_equal(nf4.honest_case(loaded, dtype).tensors["W"],
                              nf4.honest_weight(c.weight, dtype))


def test_make_case_base_nf4_keeps_codes_and_scales():
    c = oracle.make_case(d_in=64, d_out=32, r=4, dtype="bf16", base="nf4", double_quant=True,
                         blocksize=32, seed=3)
    assert isinstance(c.base, nf4.NF4Weight) and c.base.double_quant and c.base.blocksize == 32
    assert np.array_equal(c.tensors["W"], nf4.dequantize_nf4(c.base))
    assert c.layer["base"] == "nf4"
    same = nf4.make_nf4_case(d_in=64, d_out=32, r=4, dtype="bf16", double_quant=True,
                             blocksize=32, seed=3)
    assert np.array_equal(c.tensors["W"], same.case.tensors["W"])
    with pytest.raises(ValueError, match="base must be None or 'nf4'"):
        oracle.make_case(d_in=8, d_out=8, r=2, base="int8")


def test_judge_models_an_nf4_base_as_kernels_hold_it():
    """The baseline starts from the dequantized W rounded to the precision (honest_case): a
    kernel doing exactly that uses little of its limits."""
    c = oracle.make_case(d_in=128, d_out=64, r=8, batch=4, seq=8, dtype="bf16", base="nf4",
                         seed=4)
    report = oracle.compare(c, emulate(nf4.honest_case(c, "bf16"), "bf16"), dtype="bf16")
    assert report.passed


def test_cli_case_base_nf4(tmp_path):
    from minilora.tools.cli import main

    path = tmp_path / "c.npz"
    assert main(["oracle", "case", "--d-in", "64", "--d-out", "32", "--r", "4", "--base", "nf4",
                 "--double-quant", "--dtype", "bf16", "--seed", "5", "-o", str(path)]) == 0
    case = oracle.load_case(path)
    assert case.layer["base"] == "nf4" and case.layer["double_quant"] is True
    expected = oracle.make_case(d_in=64, d_out=32, r=4, base="nf4", double_quant=True,
                                dtype="bf16", seed=5)
    assert np.array_equal(case.tensors["W"], expected.tensors["W"])
