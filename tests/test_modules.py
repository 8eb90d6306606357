"""The toolkit's layers: every backward against finite differences, and the protocol."""

import numpy as np
import pytest

import minilora as ml
from minilora.toolkit import modules
from minilora.toolkit.modules import GELU, Linear, ReLU, Sequential


def test_linear_pair_gradients():
    rng = np.random.default_rng(0)
    inputs = dict(x=rng.standard_normal((5, 4)), W=rng.standard_normal((3, 4)),
                  b=rng.standard_normal(3))

    def backward(dy, cache):
        dx, dW, db = modules.linear_backward(dy, cache)
        return {"x": dx, "W": dW, "b": db}

    ml.gradcheck(modules.linear_forward, backward, inputs)


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_activation_gradients(name):
    fwd, bwd = getattr(modules, f"{name}_forward"), getattr(modules, f"{name}_backward")
    x = np.random.default_rng(1).standard_normal((6, 5))
    x[np.abs(x) < 0.05] = 0.5  # keep ReLU's kink away from the finite-difference steps
    ml.gradcheck(fwd, lambda dy, cache: {"x": bwd(dy, cache)}, {"x": x})


def test_gelu_is_the_tanh_approximation():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(modules.gelu_forward(x)[0], expected, rtol=1e-15)


def _model(dtype=np.float64):
    rng = np.random.default_rng(2)
    lora = ml.LoRALinear(6, 5, r=2, alpha=4, dtype=dtype, seed=0)
    lora.B[:] = rng.standard_normal(lora.B.shape)
    return Sequential(Linear(4, 6, dtype=dtype, seed=1), GELU(), lora, ReLU(),
                      Linear(5, 3, trainable=False, dtype=dtype, seed=3))


def test_sequential_backward_through_lora_matches_finite_differences():
    """Every trainable array of a Linear -> GELU -> LoRALinear -> ReLU -> frozen Linear stack."""
    model = _model()
    x = np.random.default_rng(4).standard_normal((7, 4))
    params = model.parameters()
    assert set(params) == {"0.W", "0.b", "2.A", "2.B"}

    def forward(x, **values):
        for k, v in values.items():
            params[k][...] = v
        return model(x), (x, values)

    def backward(dy, cache):  # layers use their cache once, so each backward re-runs forward
        x, values = cache
        forward(x, **values)
        model.zero_grad()
        dx = model.backward(dy)
        return {"x": dx, **{k: g.copy() for k, g in model.grads.items()}}

    ml.gradcheck(forward, backward, {"x": x, **{k: v.copy() for k, v in params.items()}})


def test_counts_and_summary():
    model = _model()
    trainable, frozen = model.num_parameters()
    assert trainable == 4 * 6 + 6 + 2 * 6 + 5 * 2
    assert frozen == 5 * 6 + 5 + 3 * 5 + 3
    assert modules.summary(model).startswith(f"trainable params: {trainable:,} || all params:")


def test_frozen_linear_passes_gradient_but_keeps_none():
    layer = Linear(3, 2, trainable=False, seed=0)
    layer(np.ones((1, 3), np.float32))
    dy = np.array([[1.0, -2.0]], np.float32)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, dy @ layer.W, rtol=1e-6)  # dx = dy W
    assert layer.grads == {} and layer.parameters() == {}


def test_backward_before_forward_is_an_error():
    for m in (Linear(2, 2), ReLU(), GELU()):
        with pytest.raises(RuntimeError, match="forward"):
            m.backward(np.ones((1, 2), np.float32))


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    from minilora.toolkit.checkpoint import load_trainable, save_peft, save_trainable

    model = _model(np.float32)
    save_trainable(tmp_path / "a.npz", model)
    before = {k: v.copy() for k, v in model.parameters().items()}
    for v in model.parameters().values():
        v += 1
    load_trainable(tmp_path / "a.npz", model)
    for k, v in model.parameters().items():
        np.testing.assert_array_equal(v, before[k])
    other = Sequential(Linear(4, 6, seed=0))
    with pytest.raises(ValueError, match="missing"):
        load_trainable(tmp_path / "a.npz", other)
    save_peft(tmp_path / "peft", model)
    adapters = ml.peft.load_adapter(tmp_path / "peft")
    assert set(adapters) == {"2"}  # the one LoRA layer, by its index in the model
    lora = model.modules[2]
    np.testing.assert_array_equal(adapters["2"].A, lora.A)
    np.testing.assert_array_equal(adapters["2"].B, lora.B)
    assert adapters["2"].scaling == lora.scaling
