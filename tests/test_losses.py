"""Losses: gradients against finite differences, stability, validation."""

import numpy as np
import pytest

import minilora as ml
from minilora import losses


def test_cross_entropy_gradient():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 6)

    def forward(z):
        loss, cache = losses.softmax_cross_entropy(z, labels)
        return np.array(loss), cache

    ml.gradcheck(forward, lambda dl, c: {"z": float(dl) * losses.softmax_cross_entropy_backward(c)},
                 {"z": rng.standard_normal((6, 4))})


def test_cross_entropy_value_and_stability():
    loss, _ = losses.softmax_cross_entropy(np.array([[0.0, 0.0]]), np.array([1]))
    assert loss == pytest.approx(np.log(2))
    loss, cache = losses.softmax_cross_entropy(np.array([[1000.0, 0.0]]), np.array([0]))
    assert loss == pytest.approx(0.0) and np.all(np.isfinite(
        losses.softmax_cross_entropy_backward(cache)))
    with pytest.raises(ValueError, match="labels must lie in"):
        losses.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))


def test_mse_gradient():
    rng = np.random.default_rng(1)
    target = rng.standard_normal((4, 3))

    def forward(p):
        loss, cache = losses.mse(p, target)
        return np.array(loss), cache

    ml.gradcheck(forward, lambda dl, c: {"p": float(dl) * losses.mse_backward(c)},
                 {"p": rng.standard_normal((4, 3))})
