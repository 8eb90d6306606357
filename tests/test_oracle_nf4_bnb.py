"""minilora.oracle.nf4 against bitsandbytes itself (CPU), bit for bit where its definition is
deterministic: the tables, the 4-bit codes and absmax, and every dequantization from a
bitsandbytes state. Two places are not bit for bit and are checked as what they are: the
double-quantization offset (torch's float32 mean, whose summation order is not numpy's: within
2 ulp) and a few of the 8-bit absmax indices (bitsandbytes' compiled CPU kernel picks the other
neighbour in about 0.2% of entries, always an adjacent index)."""

import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

import numpy as np  # noqa: E402
from bitsandbytes.backends.default import ops as default_ops  # noqa: E402

from minilora.oracle import nf4  # noqa: E402

SHAPES = [(64, 64), (16, 128), (33, 7), (5,), (3, 1, 129), (300, 64), (1, 1)]


def bnb_quantize(W, blocksize, double_quant):
    return F.quantize_4bit(torch.from_numpy(W), blocksize=blocksize,
                           compress_statistics=double_quant, quant_type="nf4")


def from_bnb(packed, state):
    """bitsandbytes' quantized weight as an NF4Weight."""
    nested = state.nested
    return nf4.NF4Weight(
        packed.numpy().reshape(-1).copy(), state.absmax.numpy().copy(), tuple(state.shape),
        state.blocksize,
        state.state2.absmax.numpy().copy() if nested else None,
        np.float32(state.offset.item()) if nested else None)


def bnb_dequantize_by_definition(packed, state, dtype):
    """bitsandbytes' reference dequantization (its default backend, uncompiled)."""
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = default_ops._dequantize_4bit_compute.__wrapped__
    return compute(packed.reshape(-1), absmax.float(), F.get_4bit_type("nf4", device="cpu"),
                   state.blocksize, state.shape, dtype)


def draw(shape, seed, zero_block=False):
    W = (np.random.default_rng(seed).standard_normal(shape) * (seed + 1) / 3).astype(np.float32)
    if zero_block:
        W.reshape(-1)[:64] = 0
    return W


def test_tables_are_bitsandbytes():
    assert np.array_equal(F.get_4bit_type("nf4", device="cpu").numpy(), nf4.NF4_CODE)
    assert np.array_equal(F.create_dynamic_map().numpy(), nf4.dynamic_map())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_quantize_is_bitsandbytes_bit_for_bit(shape, blocksize):
    for seed, zero in ((0, False), (1, True)):
        W = draw(shape, seed, zero)
        packed, state = bnb_quantize(W, blocksize, False)
        q = nf4.quantize_nf4(W, blocksize)
        assert np.array_equal(packed.numpy().reshape(-1), q.codes)
        assert state.absmax.dtype == torch.float32
        assert np.array_equal(state.absmax.numpy(), q.absmax)


def test_quantize_float16_and_bfloat16_inputs():
    W = draw((8, 96), 2)
    for tdt in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(W).to(tdt)
        packed, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4")
        q = nf4.quantize_nf4(t.float().numpy(), 64)  # bf16 values are float32 values
        assert np.array_equal(packed.numpy().reshape(-1), q.codes)
        assert np.array_equal(state.absmax.numpy(), q.absmax)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_is_bitsandbytes_bit_for_bit(shape, double_quant):
    W = draw(shape, 3, zero_block=True)
    packed, state = bnb_quantize(W, 64, double_quant)
    q = from_bnb(packed, state)
    exact = nf4.dequantize_nf4(q)  # float64
    assert np.array_equal(nf4.dequantize_absmax(q),
                          (F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
                          .numpy() if double_quant else state.absmax.numpy())
    ref32 = bnb_dequantize_by_definition(packed, state, torch.float32).numpy()
    assert np.array_equal(exact.astype(np.float32), ref32)
    for dtype, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ref = bnb_dequantize_by_definition(packed, state, tdt).float().numpy()
        assert np.array_equal(nf4.honest_weight(q, dtype).astype(np.float32), ref)
    if len(shape) > 1 and shape[-1] % 64 == 0:  # where its CPU kernel is right (see below)
        for dtype, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            out = F.dequantize_4bit(packed, state, quant_type="nf4")
            out = out if tdt == torch.float32 else F.dequantize_4bit(
                packed, _with_dtype(state, tdt), quant_type="nf4")
            assert np.array_equal(out.float().numpy(), nf4.honest_weight(q, dtype)
                                  .astype(np.float32))


def _with_dtype(state, dtype):
    s = F.QuantState(absmax=state.absmax, shape=state.shape, code=state.code,
                     blocksize=state.blocksize, quant_type="nf4", dtype=dtype,
                     offset=state.offset, state2=state.state2)
    return s


def test_double_quantization_agrees_with_bitsandbytes():
    agree = total = 0
    for seed, shape in enumerate([(300, 64), (1000, 130), (33, 7), (64, 4096)]):
        W = draw(shape, seed)
        packed, state = bnb_quantize(W, 64, True)
        q = nf4.quantize_nf4(W, 64, double_quant=True)
        assert np.array_equal(packed.numpy().reshape(-1), q.codes)
        assert abs(state.offset.item() - float(q.offset)) <= 2 * np.spacing(q.offset)
        assert np.allclose(state.state2.absmax.numpy(), q.absmax_absmax, rtol=1e-6, atol=1e-6)
        # the 8-bit indices of a_b − μ, given bitsandbytes' own μ
        absmax = F.quantize_4bit(torch.from_numpy(W), blocksize=64, quant_type="nf4")[1].absmax
        p, a2 = nf4.quantize_blockwise(absmax.numpy() - np.float32(state.offset.item()), 256)
        bnb_p = state.absmax.numpy()
        assert np.array_equal(a2, state.state2.absmax.numpy())
        assert np.max(np.abs(p.astype(int) - bnb_p.astype(int))) <= 1
        agree += int(np.sum(p == bnb_p))
        total += p.size
    assert agree / total >= 0.99, (agree, total)
