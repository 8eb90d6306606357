"""Optimizers: one step against the update equations written out by hand; LoRA+; clipping."""

import numpy as np
import pytest

from minilora.toolkit.modules import Linear
from minilora.toolkit.optim import SGD, AdamW, clip_grad_norm


def _layer():
    layer = Linear(2, 2, dtype=np.float64, seed=0)
    layer.grads["W"][:] = [[0.5, -1.0], [2.0, 0.0]]
    layer.grads["b"][:] = [1.0, -1.0]
    return layer


def test_sgd_with_momentum_and_weight_decay():
    layer = _layer()
    W0 = layer.W.copy()
    opt = SGD(layer, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.step()
    v1 = layer.grads["W"] + 0.01 * W0
    np.testing.assert_allclose(layer.W, W0 - 0.1 * v1, rtol=1e-15)
    W1 = layer.W.copy()
    opt.step()
    v2 = 0.9 * v1 + layer.grads["W"] + 0.01 * W1
    np.testing.assert_allclose(layer.W, W1 - 0.1 * v2, rtol=1e-15)


def test_adamw_first_step_is_lr_times_sign_plus_decay():
    layer = _layer()
    W0 = layer.W.copy()
    AdamW(layer, lr=0.01, eps=1e-12, weight_decay=0.1).step()
    g = layer.grads["W"]
    # t = 1: m̂ = g, v̂ = g², so the step is lr·(g/|g| + λ·W) (0 where g = 0).
    np.testing.assert_allclose(layer.W, W0 - 0.01 * (np.sign(g) + 0.1 * W0), rtol=1e-9)


def test_lora_plus_scales_only_B():
    opt = AdamW(_layer(), lr=1e-3, lora_plus_ratio=16)
    assert opt.lr_for("3.B") == pytest.approx(16e-3)
    assert opt.lr_for("3.A") == pytest.approx(1e-3) and opt.lr_for("W") == pytest.approx(1e-3)


def test_lora_plus_step_moves_B_ratio_times_as_far_as_A():
    """The first Adam step is lr·sign(g) (m̂ = g, v̂ = g²): B's is 16 times A's."""
    from minilora.toolkit.layer import LoRALinear
    from minilora.toolkit.modules import Sequential

    model = Sequential(LoRALinear(3, 2, r=2, seed=0, dtype=np.float64))
    layer = model.modules[0]
    layer.grads["A"][...] = 1.0
    layer.grads["B"][...] = -1.0
    A0, B0 = layer.A.copy(), layer.B.copy()
    AdamW(model, lr=1e-3, eps=1e-12, weight_decay=0.0, lora_plus_ratio=16).step()
    np.testing.assert_allclose(layer.A - A0, -1e-3, rtol=1e-9)
    np.testing.assert_allclose(layer.B - B0, 16e-3, rtol=1e-9)


def test_clip_grad_norm():
    layer = _layer()
    total = clip_grad_norm(layer, 1.0)
    assert total == pytest.approx(np.sqrt(0.25 + 1 + 4 + 1 + 1))
    after = np.sqrt(sum(np.sum(g**2) for g in layer.grads.values()))
    assert after == pytest.approx(1.0)
    np.testing.assert_allclose(layer.grads["W"], np.array([[0.5, -1.0], [2.0, 0.0]]) / total,
                               rtol=1e-15)  # every gradient scaled by the same 1/total
    clipped = {k: g.copy() for k, g in layer.grads.items()}
    assert clip_grad_norm(layer, 10.0) == pytest.approx(1.0)  # under the limit: unchanged
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, clipped[k])
