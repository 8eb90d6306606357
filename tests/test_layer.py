"""LoRALinear: the layer over the functional pair."""

import numpy as np
import pytest
from _helpers import functional_grads

import minilora as ml
from minilora.toolkit.init import INIT_SCHEMES


def _base_output(layer_W, bias, x, fan_in_fan_out):
    y = x @ layer_W if fan_in_fan_out else x @ layer_W.T
    return y if bias is None else y + bias


@pytest.mark.parametrize("init", INIT_SCHEMES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fresh_layer_reproduces_the_base_layer(init, fan_in_fan_out, dtype):
    """For every init scheme the first output equals the pretrained layer's output."""
    rng = np.random.default_rng(0)
    d_in, d_out = 24, 16
    W0 = rng.standard_normal((d_in, d_out) if fan_in_fan_out else (d_out, d_in))
    b0 = rng.standard_normal(d_out)
    layer = ml.LoRALinear(d_in, d_out, r=4, alpha=8, init=init, weight=W0, bias_value=b0,
                          fan_in_fan_out=fan_in_fan_out, dtype=dtype, seed=1)
    x = rng.standard_normal((5, d_in)).astype(dtype)
    expected = _base_output(W0, b0, x.astype(np.float64), fan_in_fan_out)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer(x), expected, rtol=tol, atol=tol * np.abs(expected).max())
    W0_oi = (W0.T if fan_in_fan_out else W0)  # (d_out, d_in), as the math reads
    W_oi = (layer.W.T if fan_in_fan_out else layer.W).astype(np.float64)
    BA = layer.B.astype(np.float64) @ layer.A  # (d_out, d_in)
    np.testing.assert_allclose(W_oi + layer.scaling * BA, W0_oi, atol=tol * np.abs(W0).max())
    if init == "pissa":  # the adapter holds W's best rank-r part (Eckart–Young)
        U, S, Vt = np.linalg.svd(W0_oi)
        expected_part = (U[:, :4] * S[:4]) @ Vt[:4]
    elif init == "olora":  # the projection of W on the span of its first r columns
        C = W0_oi[:, :4]
        expected_part = C @ np.linalg.lstsq(C, W0_oi, rcond=None)[0] * layer.scaling
    else:
        expected_part = np.zeros_like(W0_oi)  # B = 0
        assert not layer.B.any()
    np.testing.assert_allclose(layer.scaling * BA, expected_part, atol=tol * np.abs(W0).max())


def test_pissa_holds_the_principal_components():
    rng = np.random.default_rng(1)
    W0 = rng.standard_normal((10, 12))
    layer = ml.LoRALinear(12, 10, r=3, alpha=6, init="pissa", weight=W0, dtype=np.float64, seed=0)
    U, S, Vt = np.linalg.svd(W0)
    np.testing.assert_allclose(layer.scaling * layer.B @ layer.A, (U[:, :3] * S[:3]) @ Vt[:3],
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(layer.W, compute_uv=False)[:7], S[3:], atol=1e-12)


def test_default_init_draws_A_kaiming_uniform_and_gaussian_std_one_over_r():
    layer = ml.LoRALinear(400, 10, r=50, init="default", seed=0)
    bound = 1 / np.sqrt(400)
    assert np.abs(layer.A).max() <= bound and np.abs(layer.A).max() > 0.95 * bound
    layer = ml.LoRALinear(400, 10, r=50, init="gaussian", seed=0, dtype=np.float64)
    assert abs(layer.A.std() - 1 / 50) < 0.001


def test_pissa_and_olora_refuse_a_rank_above_the_weight():
    with pytest.raises(ValueError, match="r must be at most min"):
        ml.LoRALinear(4, 3, r=5, init="olora")
    with pytest.raises(ValueError, match="init must be one of"):
        ml.LoRALinear(4, 3, r=2, init="kaiming")


def test_dropout_in_training_only_and_reproducible_from_the_seed():
    x = np.ones((64, 32), np.float32)
    layer = ml.LoRALinear(32, 8, r=4, dropout=0.5, init="gaussian", seed=3)
    layer.B[:] = 1.0
    train1 = layer(x)
    layer.eval()
    y_eval = layer(x)
    no_dropout = ml.LoRALinear(32, 8, r=4, dropout=0.0, init="gaussian", seed=3)
    no_dropout.B[:] = 1.0
    np.testing.assert_array_equal(y_eval, no_dropout(x))
    # the training forward is the functional pair with the layer's next mask from its seed:
    # inverted dropout, 0 or 1/(1 − p) = 2, about half of each
    again = ml.LoRALinear(32, 8, r=4, dropout=0.5, init="gaussian", seed=3)
    again.B[:] = 1.0
    mask = again.dropout_mask(x.shape)
    assert set(np.unique(mask)) == {0.0, 2.0} and abs(np.mean(mask == 0) - 0.5) < 0.05
    y_mask = ml.lora_forward(x, layer.W, layer.A, layer.B, scaling=layer.scaling,
                             bias=layer.bias, dropout_mask=mask.astype(x.dtype))[0]
    np.testing.assert_allclose(train1, y_mask, rtol=1e-6, atol=1e-6)
    again = ml.LoRALinear(32, 8, r=4, dropout=0.5, init="gaussian", seed=3)
    again.B[:] = 1.0
    np.testing.assert_array_equal(again(x), train1)


def test_backward_accumulates_and_matches_the_functional_pair():
    rng = np.random.default_rng(5)
    layer = ml.LoRALinear(6, 5, r=2, dtype=np.float64, seed=0)
    layer.B[:] = rng.standard_normal(layer.B.shape)
    x, dy = rng.standard_normal((3, 6)), rng.standard_normal((3, 5))
    layer(x)
    dx = layer.backward(dy)
    g = functional_grads(layer, x, dy)
    np.testing.assert_allclose(dx, g.dx, rtol=1e-13)
    np.testing.assert_allclose(layer.grads["A"], g.dA, rtol=1e-13)
    layer(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.grads["B"], 2 * g.dB, rtol=1e-13)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(dy)
    layer.zero_grad()
    assert not layer.grads["A"].any() and not layer.grads["B"].any()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_weight_is_new_and_gives_the_same_output(fan_in_fan_out):
    rng = np.random.default_rng(6)
    layer = ml.LoRALinear(7, 4, r=3, fan_in_fan_out=fan_in_fan_out, dtype=np.float64, seed=0)
    layer.B[:] = rng.standard_normal(layer.B.shape)
    W_before = layer.W.copy()
    merged = layer.merged_weight()
    assert merged.shape == layer.W.shape and not np.shares_memory(merged, layer.W)
    np.testing.assert_array_equal(layer.W, W_before)
    x = rng.standard_normal((5, 7))
    np.testing.assert_allclose(_base_output(merged, layer.bias, x, fan_in_fan_out), layer(x),
                               rtol=1e-12)


def test_parameters_counts_and_user_weight_is_copied():
    W0 = np.ones((3, 4))
    layer = ml.LoRALinear(4, 3, r=2, weight=W0, bias=False, seed=0)
    layer.W[0, 0] = 5.0
    assert W0[0, 0] == 1.0
    assert set(layer.parameters()) == {"A", "B"}
    assert layer.num_parameters() == (2 * 4 + 3 * 2, 12)
    assert layer.W.dtype == np.float32


@pytest.mark.parametrize(("kwargs", "error", "pattern"), [
    (dict(weight=np.ones((4, 3))), ValueError, r"weight must have shape \(3, 4\)"),
    (dict(dropout=1.5), ValueError, "dropout must be a probability"),
    (dict(dtype=np.int32), TypeError, "dtype must be float32 or float64"),
    (dict(r=0), ValueError, "r must be a positive integer"),
    (dict(bias=False, bias_value=np.ones(3)), ValueError, "bias_value was given but bias=False"),
])
def test_bad_layer_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ml.LoRALinear(4, 3, **kwargs)


@pytest.mark.parametrize("init", INIT_SCHEMES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dora_layer_starts_at_the_base_layer_and_merges(init, fan_in_fan_out):
    rng = np.random.default_rng(7)
    W0 = rng.standard_normal((9, 6) if fan_in_fan_out else (6, 9))
    layer = ml.LoRALinear(9, 6, r=3, alpha=4, use_dora=True, init=init, weight=W0,
                          fan_in_fan_out=fan_in_fan_out, dtype=np.float64, seed=0)
    x = rng.standard_normal((4, 9))
    np.testing.assert_allclose(layer(x), _base_output(W0, layer.bias, x, fan_in_fan_out),
                               rtol=1e-10, atol=1e-10)
    assert set(layer.parameters()) == {"A", "B", "m"}
    layer.B[:] = rng.standard_normal(layer.B.shape)
    layer.m *= 1.7
    layer.eval()
    merged = layer.merged_weight()
    np.testing.assert_allclose(_base_output(merged, layer.bias, x, fan_in_fan_out), layer(x),
                               rtol=1e-12, atol=1e-12)
    layer.train()
    dy = rng.standard_normal((4, 6))
    layer(x)
    layer.backward(dy)
    # n is detached (PEFT), so L = Σ dy ⊙ y is affine in m: a central difference is exact up to
    # rounding, one component of m at a time
    m0, h, fd = layer.m.copy(), 1e-3, np.empty(6)
    for j in range(6):
        losses = []
        for step in (h, -h):
            layer.m[:] = m0
            layer.m[j] += step
            losses.append(np.sum(dy * layer(x)))
        fd[j] = (losses[0] - losses[1]) / (2 * h)
    layer.m[:] = m0
    np.testing.assert_allclose(layer.grads["m"], fd, rtol=1e-7, atol=1e-9)
