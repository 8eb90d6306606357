"""Losses: gradients against finite differences, values against closed forms, stability,
validation."""

import numpy as np
import pytest

import minilora as ml
from minilora.toolkit import losses


def _check_gradient(loss, backward, value, *extra):
    """gradcheck of ``loss(value, *extra)`` (a float) through its backward, scaled by dL."""

    def forward(v):
        out, cache = loss(v, *extra)
        return np.array(out), cache

    ml.gradcheck(forward, lambda dl, cache: {"v": float(dl) * backward(cache)}, {"v": value})


def test_cross_entropy_gradient():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 6)
    _check_gradient(losses.softmax_cross_entropy, losses.softmax_cross_entropy_backward,
                    rng.standard_normal((6, 4)), labels)


def test_cross_entropy_value_and_stability():
    loss, _ = losses.softmax_cross_entropy(np.array([[0.0, 0.0]]), np.array([1]))
    assert loss == pytest.approx(np.log(2))
    # logits of 1000 overflow a naive exp; shifted by their max, p = (1, e⁻¹)/(1 + e⁻¹)
    z = np.array([[1000.0, 999.0], [0.0, -1000.0]])
    loss, cache = losses.softmax_cross_entropy(z, np.array([0, 1]))
    p = np.exp(-1.0) / (1 + np.exp(-1.0))  # the first row's p of the other class
    assert loss == pytest.approx((np.log1p(np.exp(-1.0)) + 1000.0) / 2, rel=1e-15)
    np.testing.assert_allclose(losses.softmax_cross_entropy_backward(cache),
                               np.array([[-p, p], [1.0, -1.0]]) / 2, rtol=1e-15, atol=1e-300)
    with pytest.raises(ValueError, match="labels must lie in"):
        losses.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))


def test_mse_gradient():
    rng = np.random.default_rng(1)
    target = rng.standard_normal((4, 3))
    _check_gradient(losses.mse, losses.mse_backward, rng.standard_normal((4, 3)), target)
