"""minilora.testing.torch: a PyTorch implementation judged in-process, as its author would."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import minilora as ml  # noqa: E402
from minilora.oracle import OracleInputError  # noqa: E402
from minilora.testing._harness import lora_fn  # noqa: E402
from minilora.testing.torch import assert_torch_matches, torch_outputs  # noqa: E402


def autograd_lora(detach_norm=True):
    """A correct LoRA (and DoRA, PEFT's formulation) in plain torch autograd."""
    return lora_fn(lambda V: torch.linalg.norm(V, dim=1), torch.Tensor.detach, detach_norm)


class IndicatorMaskLoRA(torch.autograd.Function):
    """A hand-written backward with a real bug seen in the wild: dx applies the dropout mask as
    an indicator (mask > 0) instead of its value 1/(1 − p)."""

    @staticmethod
    def forward(ctx, x, W, A, B, mask, scaling):
        ctx.save_for_backward(x, W, A, B, mask)
        ctx.scaling = scaling
        return x @ W.T + scaling * ((x * mask) @ A.T) @ B.T

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, mask = ctx.saved_tensors
        s = ctx.scaling
        h, g = (x * mask) @ A.T, dy @ B
        dx = dy @ W + s * (g @ A) * (mask > 0)  # BUG: should be * mask
        return dx, None, s * g.T @ (x * mask), s * dy.T @ h, None, None


def indicator_mask_lora(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None):
    return IndicatorMaskLoRA.apply(x, W, A, B, dropout_mask, scaling)


OPTIONS = [dict(), dict(bias=True, dropout=0.2, seq=3), dict(fan_in_fan_out=True, rslora=True),
           dict(dora=True, bias=True), dict(dora=True, detach_norm=False, dropout=0.1)]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp64"])
@pytest.mark.parametrize("options", OPTIONS)
def test_an_honest_autograd_implementation_passes_at_every_precision(dtype, options):
    for seed in range(2):
        case = ml.oracle.make_case(d_in=24, d_out=16, r=4, batch=3, dtype=dtype, seed=seed,
                                   **options)
        fn = autograd_lora(detach_norm=case.detach_norm)
        report = assert_torch_matches(fn, case, need_dW=True, need_dbias=True)
        names = {t.name for t in report.tensors}
        assert {"y", "dx", "dA", "dB", "dW"} <= names and report.not_judged == []
        assert ("dm" in names) == case.dora and ("dbias" in names) == ("bias" in case.tensors)


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_the_indicator_mask_bug_is_caught_in_dx(dtype):
    case = ml.oracle.make_case(d_in=24, d_out=16, r=4, batch=6, dropout=0.5, dtype=dtype, seed=0)
    with pytest.raises(AssertionError, match="FAILED") as e:
        assert_torch_matches(indicator_mask_lora, case)
    failed = [line.split()[0] for line in str(e.value).splitlines() if "FAIL:" in line]
    assert failed == ["dx"]


def test_outputs_are_float64_in_the_cases_layout():
    case = ml.oracle.make_case(d_in=6, d_out=5, r=2, fan_in_fan_out=True, seed=1)
    out = torch_outputs(autograd_lora(), case, "fp32", need_dW=True)
    assert out["dW"].shape == case.tensors["W"].shape == (6, 5)
    assert all(v.dtype == np.float64 for v in out.values())
    ref = ml.oracle.reference(case)
    np.testing.assert_allclose(out["dW"], ref["dW"], rtol=1e-5, atol=1e-5)


def test_a_wrong_output_shape_is_unusable_input():
    case = ml.oracle.make_case(d_in=6, d_out=5, r=2, seed=1)
    with pytest.raises(OracleInputError, match="fn returned"):
        torch_outputs(lambda x, W, A, B, **kw: (x @ W.T)[:, :2], case)


def test_an_unused_input_gets_a_zero_gradient_and_fails():
    case = ml.oracle.make_case(d_in=6, d_out=5, r=2, seed=1)

    def forgets_lora(x, W, A, B, *, scaling, **kw):
        return x @ W.T + 0 * A.sum()  # B never used: dB comes back as zeros

    with pytest.raises(AssertionError, match="dB"):
        assert_torch_matches(forgets_lora, case)


# -- blocks ---------------------------------------------------------------------------------------

def _projection(x, W, A, B, s, bias, mask):
    x_d = x if mask is None else x * mask
    y = x @ W.T + s * (x_d @ A.T) @ B.T
    return y if bias is None else y + bias


def autograd_qkv(x, W, A, B, *, scaling, bias=None, dropout_mask=None):
    bias = bias or [None] * len(W)
    mask = dropout_mask or [None] * len(W)
    return tuple(_projection(x, W[j], A[j], B[j], scaling[j], bias[j], mask[j])
                 for j in range(len(W)))


def autograd_mlp(x, W, A, B, *, scaling, bias=None, dropout_mask=None, activation="silu",
                 wrong_backward=False):
    bias = bias or [None] * 3
    mask = dropout_mask or [None] * 3
    act = {"silu": torch.nn.functional.silu,
           "gelu": torch.nn.functional.gelu,
           "gelu_tanh": lambda e: torch.nn.functional.gelu(e, approximate="tanh")}[activation]
    e = _projection(x, W[0], A[0], B[0], scaling[0], bias[0], mask[0])
    u = _projection(x, W[1], A[1], B[1], scaling[1], bias[1], mask[1])
    if wrong_backward:  # gate's gradient cut: a fused kernel that forgot de
        e = e.detach()
    return _projection(act(e) * u, W[2], A[2], B[2], scaling[2], bias[2], mask[2])


def autograd_multi(x, W, A, B, index, *, scaling, bias=None, dropout_mask=None,
                   off_by_one=False):
    x_d = x if dropout_mask is None else x * dropout_mask
    y = x @ W.T
    if bias is not None:
        y = y + bias
    K = len(A)
    for k in range(K):
        rows = (index == ((k + 1) % K if off_by_one else k)).unsqueeze(-1)
        y = y + rows * (scaling[k] * (x_d @ A[k].T) @ B[k].T)
    return y


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp64"])
def test_torch_blocks_pass_and_their_bugs_fail(dtype):
    opts = dict(d_in=24, d_out=16, r=4, batch=2, seq=6, bias=True, dropout=0.1, dtype=dtype)
    qkv = ml.oracle.make_case(block="qkv", **opts)
    assert_torch_matches(autograd_qkv, qkv, need_dW=True, need_dbias=True)
    for activation in ("silu", "gelu", "gelu_tanh"):
        mlp = ml.oracle.make_case(block="mlp", activation=activation, **opts)
        assert_torch_matches(autograd_mlp, mlp, need_dW=True)
    multi = ml.oracle.make_case(block="multi", fan_in_fan_out=True, **opts)
    assert_torch_matches(autograd_multi, multi, need_dW=True, need_dbias=True)
    with pytest.raises(AssertionError, match="FAIL"):
        assert_torch_matches(lambda *a, **k: autograd_mlp(*a, **k, wrong_backward=True), mlp)
    with pytest.raises(AssertionError, match="FAIL"):
        assert_torch_matches(lambda *a, **k: autograd_multi(*a, **k, off_by_one=True), multi)
    with pytest.raises(OracleInputError, match="fn returned"):
        torch_outputs(lambda *a, **k: autograd_qkv(*a, **k)[:2], qkv)


# -- devices --------------------------------------------------------------------------------------

def test_device_cpu_builds_the_tensors_there_and_returns_float64():
    case = ml.oracle.make_case(d_in=12, d_out=8, r=2, dropout=0.2, bias=True, seed=2)
    seen = []

    def records_device(x, W, A, B, **kw):
        seen.append({t.device.type for t in (x, W, A, B, kw["bias"], kw["dropout_mask"])})
        return autograd_lora()(x, W, A, B, **kw)

    for device in ("cpu", torch.device("cpu")):
        report = assert_torch_matches(records_device, case, "fp32", device=device)
        assert report.passed
    assert seen == [{"cpu"}, {"cpu"}]
    out = torch_outputs(records_device, case, "bf16", device="cpu")
    assert all(v.dtype == np.float64 and isinstance(v, np.ndarray) for v in out.values())


def test_meta_and_an_absent_device_are_refused_clearly():
    case = ml.oracle.make_case(d_in=6, d_out=5, r=2, seed=1)
    with pytest.raises(ValueError, match="'meta' holds no values"):
        torch_outputs(autograd_lora(), case, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            assert_torch_matches(autograd_lora(), case, device="cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        torch_outputs(autograd_lora(), case, device="no-such-device")


def test_a_module_fn_defaults_to_its_parameters_device():
    class Lora(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, x, W, A, B, **kw):
            return autograd_lora()(x, W, A, B, **kw)

    case = ml.oracle.make_case(d_in=6, d_out=5, r=2, seed=1)
    with pytest.raises(ValueError, match="meta"):  # the module's device was taken
        torch_outputs(Lora(), case)
    with pytest.raises(ValueError, match="meta"):
        torch_outputs(Lora().forward, case)
    assert torch_outputs(Lora(), case, device="cpu")["y"].shape == (4, 5)
