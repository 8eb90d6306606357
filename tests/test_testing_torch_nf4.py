"""minilora.testing.torch on QLoRA cases: a kernel that dequantizes bitsandbytes' 4-bit weight
inside itself (unsloth's pattern) asks for it through ``W_4bit`` and is judged as it runs."""

import sys

import numpy as np
import pytest
from hypothesis import given

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")
bnb = pytest.importorskip("bitsandbytes")

import minilora as ml  # noqa: E402
from minilora.oracle import OracleInputError, nf4  # noqa: E402
from minilora.oracle.precision import precision  # noqa: E402
from minilora.testing.strategies import nf4_cases  # noqa: E402
from minilora.testing.torch import assert_torch_matches, params4bit, torch_outputs  # noqa: E402


def qlora_case(dtype, seed=0, **options):
    args = dict(d_in=128, d_out=48, r=8, batch=4, seq=4, dtype=dtype, seed=seed, base="nf4",
                double_quant=True) | options
    return ml.oracle.make_case(**args)


def dequantize(W_4bit, *, blocksize=None, offset=True, absmax_dtype=torch.float32):
    """The 4-bit weight dequantized from its quant_state's fields, as a fused kernel reads them
    (unsloth's fast_dequantize: absmax, state2's absmax, code and blocksize, offset, dtype):
    W = c[q]·a in float32, then the state's dtype. ``blocksize``, ``offset=False`` and
    ``absmax_dtype`` plant the bugs of a kernel that assumes another blocksize, forgets the
    nested absmax's mean, or holds the absmax in a 16-bit type."""
    qs = W_4bit.quant_state
    a = qs.absmax
    if qs.nested:
        s2 = qs.state2
        a2 = s2.absmax.repeat_interleave(s2.blocksize)[:a.numel()]  # (n_blocks,)
        a = s2.code[a.long()] * a2 + (qs.offset if offset else 0)  # (n_blocks,) float32
    a = a.to(absmax_dtype).float()  # (n_blocks,)
    packed = W_4bit.data.reshape(-1)  # (n/2,) uint8
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()  # (n,)
    n = qs.shape.numel()
    scale = a.repeat_interleave(blocksize or qs.blocksize)[:n]  # (n,)
    return (qs.code[idx[:n]] * scale).reshape(qs.shape).to(qs.dtype)  # (d_out, d_in)


class DequantizingLoRA(torch.autograd.Function):
    """A fused QLoRA LoRA in unsloth's manner: the base weight stays 4-bit and is dequantized
    in the forward and again in the backward, never saved. ``dequant`` and ``dequant_bwd`` are
    the two dequantizations (bitsandbytes', or a hand-written one)."""

    @staticmethod
    def forward(ctx, x, W_4bit, A, B, s, dequant, dequant_bwd):
        ctx.save_for_backward(x, A, B)
        ctx.W_4bit, ctx.s, ctx.dequant_bwd = W_4bit, s, dequant_bwd
        W = dequant(W_4bit)  # (d_out, d_in)
        return x @ W.T + s * (x @ A.T) @ B.T  # (..., d_out)

    @staticmethod
    def backward(ctx, dy):
        x, A, B = ctx.saved_tensors
        s = ctx.s
        W = ctx.dequant_bwd(ctx.W_4bit)  # (d_out, d_in)
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (N, d_in), (N, d_out)
        g = dy2 @ B  # (N, r)
        dx = (dy2 @ W + s * g @ A).reshape(x.shape)  # (..., d_in)
        dA = s * g.T @ x2  # (r, d_in)
        dB = s * dy2.T @ (x2 @ A.T)  # (d_out, r)
        return dx, None, dA, dB, None, None, None


def bnb_dequantize(W_4bit):
    return F.dequantize_4bit(W_4bit, W_4bit.quant_state)


def unsloth_style(dequant=bnb_dequantize, dequant_bwd=None):
    def fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None, W_4bit=None):
        assert isinstance(W_4bit, bnb.nn.Params4bit)
        return DequantizingLoRA.apply(x, W_4bit, A, B, scaling, dequant,
                                      dequant_bwd or dequant)

    return fn


def failed_outputs(error):
    return [line.split()[0] for line in str(error.value).splitlines() if "FAIL:" in line]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "tf32", "fp32"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_params4bit_dequantizes_to_the_cases_w(dtype, blocksize, double_quant):
    case = qlora_case(dtype, blocksize=blocksize, double_quant=double_quant)
    P = params4bit(case, dtype)
    assert isinstance(P, bnb.nn.Params4bit) and P.dtype == torch.uint8
    assert P.shape == ((case.base.size + 1) // 2, 1) and not P.requires_grad
    assert (P.blocksize, P.compress_statistics, P.quant_type) == (blocksize, double_quant,
                                                                  "nf4")
    want = nf4.honest_weight(case.base, "fp32" if dtype == "tf32" else dtype)  # (d_out, d_in)
    for dequant in (bnb_dequantize, dequantize):
        out = dequant(P)
        assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype,
                                                                                torch.float32)
        assert np.array_equal(out.double().numpy(), want)


def test_params4bit_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="fp64"):
        params4bit(qlora_case("fp32"), "fp64")
    with pytest.raises(ValueError, match="whose base is None"):
        params4bit(ml.oracle.make_case(d_in=8, d_out=4, r=2), "fp32")
    with pytest.raises(ValueError, match="NF4Weight"):
        params4bit(np.zeros((4, 8), np.float32), "fp32")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dequant", [bnb_dequantize, dequantize], ids=["bnb", "by-hand"])
def test_a_kernel_dequantizing_inside_passes(dtype, double_quant, dequant):
    for seed in range(2):
        case = qlora_case(dtype, seed, double_quant=double_quant)
        report = assert_torch_matches(unsloth_style(dequant), case)
        assert {t.name for t in report.tensors} == {"y", "dx", "dA", "dB"}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_dora_and_bias_on_an_nf4_base_pass(dtype):
    """A plain autograd QLoRA DoRA with bias and dropout that dequantizes W_4bit itself."""

    def fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None, W_4bit=None):
        W = bnb_dequantize(W_4bit)  # (d_out, d_in), the positional W is not used
        x_d = x * dropout_mask
        n = torch.linalg.norm(W + scaling * B @ A, dim=1).detach()  # (d_out,)
        c = m / n
        return x @ W.T + (c - 1) * (x_d @ W.T) + c * (scaling * (x_d @ A.T) @ B.T) + bias

    case = qlora_case(dtype, dora=True, bias=True, dropout=0.1)
    report = assert_torch_matches(fn, case)
    assert {t.name for t in report.tensors} == {"y", "dx", "dA", "dB", "dm"}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_wrong_blocksize_in_the_forward_fails_in_y(dtype):
    """The forward dequantizes with twice the blocksize (a kernel hard-coding 128 for a
    64-block weight); the backward is right, so only y is wrong."""
    fn = unsloth_style(lambda P: dequantize(P, blocksize=2 * P.quant_state.blocksize),
                       dequantize)
    with pytest.raises(AssertionError, match="FAILED") as e:
        assert_torch_matches(fn, qlora_case(dtype))
    assert failed_outputs(e) == ["y"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_forgotten_absmax_offset_in_the_backward_fails_in_dx(dtype):
    """The backward decodes the double-quantized absmax without adding back their mean μ."""
    fn = unsloth_style(dequantize, lambda P: dequantize(P, offset=False))
    with pytest.raises(AssertionError, match="FAILED") as e:
        assert_torch_matches(fn, qlora_case(dtype))
    assert failed_outputs(e) == ["dx"]


def test_absmax_held_in_bf16_fails_at_fp32_in_y_and_dx():
    """A kernel that loads the absmax as bf16 scales W by up to 2⁻⁹ off: at fp32 that shows in
    y and dx (at bf16 it is the size of bf16's own rounding of W, docs/oracle.md)."""
    fn = unsloth_style(lambda P: dequantize(P, absmax_dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="FAILED") as e:
        assert_torch_matches(fn, qlora_case("fp32"))
    assert failed_outputs(e) == ["y", "dx"]


def test_w_is_handed_over_as_kernels_hold_it_and_w_4bit_only_when_asked():
    seen = {}

    def plain(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None, **rest):
        seen["W"], seen["rest"] = W, rest
        return x @ W.T + scaling * (x @ A.T) @ B.T

    case = qlora_case("fp16", seed=1)  # 4 entries where p(W) ≠ p(fl32(W)): a double rounding
    assert np.sum(precision("fp16").round(case.tensors["W"])
                  != nf4.honest_weight(case.base, "fp16")) == 4
    assert_torch_matches(plain, case)
    assert seen["rest"] == {}  # **kwargs does not opt in: only a parameter named W_4bit does
    assert seen["W"].dtype == torch.float16  # and it holds fl32(c[q]·a) rounded, as kernels do
    assert np.array_equal(seen["W"].double().numpy(), nf4.honest_weight(case.base, "fp16"))

    def asks(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None, W_4bit=None):
        seen["W_4bit"] = W_4bit
        return x @ W.T + scaling * (x @ A.T) @ B.T

    torch_outputs(asks, ml.oracle.make_case(d_in=16, d_out=8, r=2, dtype="bf16"))
    assert seen["W_4bit"] is None  # a float base


def test_rows_bitsandbytes_dequantizes_wrongly_here_are_refused():
    """bitsandbytes 0.50.2's CPU kernel gets a (48, 48) weight in blocks of 64 wrong (its
    vectorized path, taken for rows of a multiple of 16 values, indexes absmax per row); the
    harness checks bitsandbytes' dequantization before handing W_4bit over and refuses. Rows
    of 40 values in blocks of 32 take its scalar path, which is right, and are accepted."""
    case = qlora_case("fp32", d_in=48, d_out=48)
    q = case.base
    P = params4bit(q, "fp32")
    wrong = not np.array_equal(bnb_dequantize(P).double().numpy(), nf4.honest_weight(q, "fp32"))
    if not wrong:
        pytest.skip("this bitsandbytes build dequantizes rows of 48 in blocks of 64 correctly")
    with pytest.raises(OracleInputError, match="d_in a multiple of 64"):
        torch_outputs(unsloth_style(), case)
    assert_torch_matches(unsloth_style(), qlora_case("fp32", d_in=40, blocksize=32))


def test_what_cannot_be_given_as_w_4bit_is_refused(tmp_path, monkeypatch):
    fn = unsloth_style()
    with pytest.raises(OracleInputError, match="fp64"):
        torch_outputs(fn, qlora_case("fp64"))
    with pytest.raises(OracleInputError, match="Conv1D"):
        torch_outputs(fn, qlora_case("fp32", fan_in_fan_out=True))
    with pytest.raises(OracleInputError, match="need_dW"):
        torch_outputs(fn, qlora_case("fp32"), need_dW=True)
    ml.oracle.save_case(tmp_path / "c.npz", qlora_case("fp32"))
    with pytest.raises(OracleInputError, match="read back from a file"):
        torch_outputs(fn, ml.oracle.load_case(tmp_path / "c.npz"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(OracleInputError, match="pip install bitsandbytes"):
        torch_outputs(fn, qlora_case("fp32"))


def qlora_autograd(detach_norm=True):
    """A correct QLoRA LoRA and DoRA in plain torch autograd, W dequantized from W_4bit."""

    def fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None, W_4bit=None):
        W = bnb_dequantize(W_4bit)  # (d_out, d_in) in the dtype
        x_d = x if dropout_mask is None else x * dropout_mask
        lora = scaling * ((x_d @ A.T) @ B.T)  # (..., d_out)
        if m is None:
            y = x @ W.T + lora
        else:
            n = torch.linalg.norm(W + scaling * B @ A, dim=1)  # (d_out,)
            c = m / (n.detach() if detach_norm else n)
            y = x @ W.T + (c - 1) * (x_d @ W.T) + c * lora
        return y if bias is None else y + bias

    return fn


@given(case=nf4_cases(dtypes=("bf16", "fp16", "fp32"), fan_in_fan_out=False))
def test_drawn_nf4_cases_an_honest_dequantizing_kernel_passes_or_is_refused(case):
    """On every drawn QLoRA case an honest kernel computing from W_4bit passes, unless the
    harness refuses W_4bit because bitsandbytes here dequantizes it wrongly (then that is
    true: its dequantization differs from the case's W)."""
    fn = qlora_autograd(case.detach_norm)
    try:
        outputs = torch_outputs(fn, case)
    except OracleInputError as e:
        assert "does not give this case's W" in str(e)
        P = params4bit(case, case.input_precision)
        got = bnb_dequantize(P).double().numpy()
        want = nf4.honest_weight(case.base, case.input_precision)
        assert got.shape != want.shape or not np.array_equal(got, want)
        return
    report = ml.oracle.compare(case, outputs)
    assert report.passed, str(report)
