"""minilora.testing.jax: a JAX implementation judged in-process, as its author would."""

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import minilora as ml  # noqa: E402
from minilora.oracle import OracleInputError  # noqa: E402
from minilora.testing._harness import lora_fn  # noqa: E402
from minilora.testing.jax import assert_jax_matches, jax_outputs  # noqa: E402


def jnp_lora(detach_norm=True):
    """A correct LoRA (and DoRA, PEFT's formulation) in jax.numpy."""
    return lora_fn(lambda V: jnp.linalg.norm(V, axis=1), jax.lax.stop_gradient, detach_norm)


def planted_lora(bug):
    """A jax.custom_vjp LoRA with a hand-written backward carrying one bug: "dA halved" or
    "dB missing s" (the scaling left out of dB)."""

    @jax.custom_vjp
    def lora(x, W, A, B, mask, s):
        return x @ W.T + s * ((x * mask) @ A.T) @ B.T

    def forward(x, W, A, B, mask, s):
        return lora(x, W, A, B, mask, s), (x, W, A, B, mask, s)

    def backward(saved, dy):
        x, W, A, B, mask, s = saved
        x_d = x * mask  # (N, d_in)
        h, g = x_d @ A.T, dy @ B  # (N, r), (N, r)
        dx = dy @ W + s * (g @ A) * mask  # (N, d_in)
        dA = s * g.T @ x_d * (0.5 if bug == "dA halved" else 1.0)  # (r, d_in)
        dB = (1.0 if bug == "dB missing s" else s) * dy.T @ h  # (d_out, r)
        return dx, jnp.zeros_like(W), dA, dB, jnp.zeros_like(mask), jnp.zeros_like(s)

    lora.defvjp(forward, backward)

    def fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None):
        mask = jnp.ones_like(x) if dropout_mask is None else dropout_mask
        return lora(x, W, A, B, mask, jnp.asarray(scaling, x.dtype))

    return fn


OPTIONS = [dict(), dict(bias=True, dropout=0.2, seq=3), dict(fan_in_fan_out=True, rslora=True),
           dict(dora=True, bias=True), dict(dora=True, detach_norm=False, dropout=0.1)]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp64"])
@pytest.mark.parametrize("options", OPTIONS)
def test_an_honest_jnp_lora_and_dora_pass_at_every_precision(dtype, options):
    case = ml.oracle.make_case(d_in=24, d_out=16, r=4, batch=3, dtype=dtype, seed=0, **options)
    report = assert_jax_matches(jnp_lora(case.detach_norm), case, need_dW=True, need_dbias=True)
    names = {t.name for t in report.tensors}
    assert {"y", "dx", "dA", "dB", "dW"} <= names and report.not_judged == []
    assert ("dm" in names) == case.dora and ("dbias" in names) == ("bias" in case.tensors)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp64"])
def test_an_nf4_base_is_handed_over_as_kernels_hold_it(dtype):
    """A QLoRA case: fn gets W as fl32(c[q]·a) in the dtype (as the torch harness hands it),
    and an honest jnp LoRA on it passes; with W 5% off, y fails."""
    case = ml.oracle.make_case(d_in=128, d_out=16, r=4, batch=3, dtype=dtype, seed=1,
                               base="nf4")
    seen = {}

    def fn(x, W, A, B, **kw):
        seen["W"] = np.asarray(W, np.float64)
        return jnp_lora()(x, W, A, B, **kw)

    assert_jax_matches(fn, case)
    held = case.tensors["W"]  # (d_out, d_in) float64, the exact dequantization
    if dtype != "fp64":  # fl32, then the dtype
        want = {"fp32": np.float32, "fp16": np.float16, "bf16": jnp.bfloat16}[dtype]
        held = np.asarray(jnp.asarray(held.astype(np.float32), want), np.float64)
    np.testing.assert_array_equal(seen["W"], held)
    report = ml.oracle.compare(case, {**jax_outputs(lambda x, W, A, B, **kw: jnp_lora()(
        x, W * 1.05, A, B, **kw), case)}, dtype=dtype)
    assert not report.passed and "y" in {t.name for t in report.tensors if not t.passed}


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp64"])
@pytest.mark.parametrize(("bug", "output"), [("dA halved", "dA"), ("dB missing s", "dB")])
def test_a_custom_vjp_with_a_planted_backward_bug_fails_in_that_output(dtype, bug, output):
    case = ml.oracle.make_case(d_in=24, d_out=16, r=4, batch=6, dropout=0.3, dtype=dtype, seed=1)
    with pytest.raises(AssertionError, match="FAILED") as e:
        assert_jax_matches(planted_lora(bug), case)
    failed = [line.split()[0] for line in str(e.value).splitlines() if "FAIL:" in line]
    assert failed == [output]
    assert_jax_matches(planted_lora(None), case)  # the same Function without the bug passes


def test_outputs_are_float64_in_the_cases_layout_and_match_the_reference():
    case = ml.oracle.make_case(d_in=6, d_out=5, r=2, fan_in_fan_out=True, dropout=0.2, seed=1,
                               dtype="fp64")
    out = jax_outputs(jnp_lora(), case, "fp64", need_dW=True)
    assert out["dW"].shape == case.tensors["W"].shape == (6, 5)
    assert all(v.dtype == np.float64 for v in out.values())
    ref = ml.oracle.reference(case)
    for name in ("y", "dx", "dA", "dB", "dW"):
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-12, atol=1e-12)


def test_fp64_does_not_leak_x64_into_the_callers_state():
    before = jax.config.jax_enable_x64
    case = ml.oracle.make_case(d_in=6, d_out=5, r=2, seed=1, dtype="fp64")
    seen = []

    def records(x, W, A, B, **kw):
        seen.append(x.dtype)
        return jnp_lora()(x, W, A, B, **kw)

    jax_outputs(records, case, "fp64")
    assert seen == [jnp.float64] and jax.config.jax_enable_x64 == before


def test_a_wrong_output_shape_is_unusable_input():
    case = ml.oracle.make_case(d_in=6, d_out=5, r=2, seed=1)
    with pytest.raises(OracleInputError, match="fn returned"):
        jax_outputs(lambda x, W, A, B, **kw: (x @ W.T)[:, :2], case)


def _projection(x, W, A, B, s, mask):
    x_d = x if mask is None else x * mask
    return x @ W.T + s * (x_d @ A.T) @ B.T


def jnp_qkv(x, W, A, B, *, scaling, bias=None, dropout_mask=None):
    mask = dropout_mask or [None] * len(W)
    return tuple(_projection(x, W[j], A[j], B[j], scaling[j], mask[j]) for j in range(len(W)))


def jnp_mlp(x, W, A, B, *, scaling, bias=None, dropout_mask=None, activation="silu",
            cut_gate=False):
    mask = dropout_mask or [None] * 3
    act = {"silu": jax.nn.silu, "gelu": lambda e: jax.nn.gelu(e, approximate=False),
           "gelu_tanh": lambda e: jax.nn.gelu(e, approximate=True)}[activation]
    e = _projection(x, W[0], A[0], B[0], scaling[0], mask[0])
    if cut_gate:  # a fused kernel that forgot the gate's gradient
        e = jax.lax.stop_gradient(e)
    u = _projection(x, W[1], A[1], B[1], scaling[1], mask[1])
    return _projection(act(e) * u, W[2], A[2], B[2], scaling[2], mask[2])


def jnp_multi(x, W, A, B, index, *, scaling, bias=None, dropout_mask=None):
    x_d = x if dropout_mask is None else x * dropout_mask
    y = x @ W.T
    for k in range(len(A)):
        y = y + (index == k)[..., None] * (scaling[k] * (x_d @ A[k].T) @ B[k].T)
    return y


def test_jax_blocks_pass_and_a_cut_gradient_fails():
    opts = dict(d_in=24, d_out=16, r=4, batch=2, seq=5, dropout=0.1, dtype="bf16")
    assert_jax_matches(jnp_qkv, ml.oracle.make_case(block="qkv", **opts), need_dW=True)
    for activation in ("gelu", "silu"):
        mlp = ml.oracle.make_case(block="mlp", activation=activation, **opts)
        assert_jax_matches(jnp_mlp, mlp, need_dW=True)
    assert_jax_matches(jnp_multi, ml.oracle.make_case(block="multi", fan_in_fan_out=True,
                                                      **opts), need_dW=True)
    with pytest.raises(AssertionError, match="FAIL"):
        assert_jax_matches(lambda *a, **k: jnp_mlp(*a, **k, cut_gate=True), mlp)


def test_importing_minilora_testing_does_not_import_jax():
    code = "import sys, minilora.testing; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
