"""Parity with PEFT's LoRA layer (and torch autograd) in float64. Skipped without torch + peft."""

import numpy as np
import pytest

import minilora as ml

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class FixedMask(torch.nn.Module):
    """Stands in for PEFT's nn.Dropout so that both sides see the same mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = torch.from_numpy(mask)

    def forward(self, x):
        return x * self.mask


def _wrapped(base):
    """A model whose one submodule, "lin", is ``base``: what PEFT's target_modules can name."""

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = base

        def forward(self, x):
            return self.lin(x)

    return Wrapper()


def _peft_layer(d_in, d_out, r, *, use_dora, fan_in_fan_out, rslora, seed):
    """PEFT's LoRA layer on a base layer with a bias (Conv1D always has one)."""
    torch.manual_seed(seed)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(d_out, d_in)  # weight (d_in, d_out)
    else:
        base = torch.nn.Linear(d_in, d_out, bias=True)

    config = peft.LoraConfig(r=r, lora_alpha=5, target_modules=["lin"], use_dora=use_dora,
                             lora_dropout=0.1, fan_in_fan_out=fan_in_fan_out, use_rslora=rslora,
                             init_lora_weights=False)
    model = peft.get_peft_model(_wrapped(base).double(), config).double()
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    return model, layer


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_matches_peft_forward_and_gradients(use_dora, fan_in_fan_out, dropout, rslora, backend):
    d_in, d_out, r = 9, 6, 3
    model, layer = _peft_layer(d_in, d_out, r, use_dora=use_dora, fan_in_fan_out=fan_in_fan_out,
                               rslora=rslora, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, d_in))
    mask = ((rng.random(x.shape) > 0.3) / 0.7) if dropout else None
    if dropout:
        layer.lora_dropout["default"] = FixedMask(mask)
    else:
        layer.lora_dropout["default"] = torch.nn.Identity()
    xt = torch.from_numpy(x).requires_grad_(True)
    y_t = model(xt)
    dy = rng.standard_normal(y_t.shape)
    y_t.backward(torch.from_numpy(dy))

    def t(p):
        return p.detach().numpy()

    A, B = t(layer.lora_A["default"].weight), t(layer.lora_B["default"].weight)
    W, bias = t(layer.base_layer.weight), t(layer.base_layer.bias)
    assert layer.scaling["default"] == ml.lora_scaling(5, r, use_rslora=rslora)
    kw = dict(scaling=layer.scaling["default"], bias=bias, dropout_mask=mask,
              fan_in_fan_out=fan_in_fan_out, backend=backend)
    if use_dora:
        m = t(layer.lora_magnitude_vector["default"].weight)
        y, cache = ml.dora_forward(x, W, A, B, m, **kw)
        grads = ml.dora_backward(dy, cache)
        np.testing.assert_allclose(grads.dm, layer.lora_magnitude_vector["default"].weight.grad,
                                   rtol=1e-12, atol=1e-12)
    else:
        y, cache = ml.lora_forward(x, W, A, B, **kw)
        grads = ml.lora_backward(dy, cache)
    np.testing.assert_allclose(y, t(y_t), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.dx, t(xt.grad), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.dA, layer.lora_A["default"].weight.grad, rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(grads.dB, layer.lora_B["default"].weight.grad, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_full_dora_gradient_matches_torch_autograd(dropout, backend):
    """detach_norm=False against autograd through an independent torch transcription of the
    API formula y = x Wᵀ + bias + (c − 1)⊙(x_d Wᵀ) + c⊙s·(x_d Aᵀ)Bᵀ, c = m/‖W + sBA‖."""
    rng = np.random.default_rng(3)
    N, d_in, d_out, r, s = 5, 8, 6, 3, 0.7
    arrays = dict(x=rng.standard_normal((N, d_in)), W=rng.standard_normal((d_out, d_in)),
                  A=rng.standard_normal((r, d_in)), B=rng.standard_normal((d_out, r)),
                  m=rng.random(d_out) + 0.5, bias=rng.standard_normal(d_out))
    mask = ((rng.random((N, d_in)) > 0.3) / 0.7) if dropout else np.ones((N, d_in))
    tt = {k: torch.from_numpy(v).requires_grad_(True) for k, v in arrays.items()}
    x_d = tt["x"] * torch.from_numpy(mask)
    n = torch.linalg.norm(tt["W"] + s * tt["B"] @ tt["A"], dim=1)
    c = tt["m"] / n
    y_t = (tt["x"] @ tt["W"].T + tt["bias"] + (c - 1) * (x_d @ tt["W"].T)
           + c * s * ((x_d @ tt["A"].T) @ tt["B"].T))
    dy = rng.standard_normal(y_t.shape)
    y_t.backward(torch.from_numpy(dy))
    y, cache = ml.dora_forward(arrays["x"], arrays["W"], arrays["A"], arrays["B"], arrays["m"],
                               scaling=s, bias=arrays["bias"],
                               dropout_mask=mask if dropout else None, detach_norm=False,
                               backend=backend)
    grads = ml.dora_backward(dy, cache, need_dW=True, need_dbias=True)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-12, atol=1e-12)
    for name in ("x", "W", "A", "B", "m", "bias"):
        np.testing.assert_allclose(getattr(grads, "d" + name), tt[name].grad.numpy(),
                                   rtol=1e-11, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_schemes_match_peft(init):
    d_in, d_out, r = 12, 8, 3
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out)  # PEFT factorises in float32 only
    W0 = base.weight.detach().numpy().astype(np.float64)

    model = peft.get_peft_model(_wrapped(base), peft.LoraConfig(r=r, lora_alpha=6,
                                                                 target_modules=["lin"],
                                                                 init_lora_weights=init))
    layer = model.base_model.model.lin
    ours = ml.LoRALinear(d_in, d_out, r=r, alpha=6, init=init, weight=W0, dtype=np.float64)
    peft_BA = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy()
    # Factors are unique only up to signs of singular vectors / QR columns; B A is unique.
    np.testing.assert_allclose(ours.B @ ours.A, peft_BA, atol=1e-5)  # PEFT factorises in fp32
    np.testing.assert_allclose(ours.W, layer.base_layer.weight.detach().numpy(), atol=1e-5)
