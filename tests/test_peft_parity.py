"""Parity with PEFT: its LoRA layer (and torch autograd) in float64, and the adapter folders
that each side writes read by the other. Skipped without torch + peft (CI installs them)."""

import numpy as np
import pytest
from _helpers import BACKENDS, dropout_mask, peft_layers, torch_step

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
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_peft_forward_and_gradients(use_dora, fan_in_fan_out, dropout, rslora, backend):
    d_in, d_out, r = 9, 6, 3
    model, layer = _peft_layer(d_in, d_out, r, use_dora=use_dora, fan_in_fan_out=fan_in_fan_out,
                               rslora=rslora, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, d_in))
    mask = dropout_mask(rng, x.shape) if dropout else None
    layer.lora_dropout["default"] = FixedMask(mask) if dropout else torch.nn.Identity()
    xt, y_t, dy = torch_step(model, x, rng)

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
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_dora_gradient_matches_torch_autograd(dropout, backend):
    """detach_norm=False against autograd through an independent torch transcription of the
    API formula y = x Wᵀ + bias + (c − 1)⊙(x_d Wᵀ) + c⊙s·(x_d Aᵀ)Bᵀ, c = m/‖W + sBA‖."""
    rng = np.random.default_rng(3)
    N, d_in, d_out, r, s = 5, 8, 6, 3, 0.7
    arrays = dict(x=rng.standard_normal((N, d_in)), W=rng.standard_normal((d_out, d_in)),
                  A=rng.standard_normal((r, d_in)), B=rng.standard_normal((d_out, r)),
                  m=rng.random(d_out) + 0.5, bias=rng.standard_normal(d_out))
    mask = dropout_mask(rng, (N, d_in)) if dropout else np.ones((N, d_in))
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


def _three_targets():
    """A torch model with the three target modules of ``peft_layers``."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 6)
            self.v = torch.nn.Linear(8, 6)
            self.inner = torch.nn.Sequential(torch.nn.Linear(6, 4))

        def forward(self, x):
            return self.inner(self.q(x) + self.v(x))

    torch.manual_seed(0)
    return M()


@pytest.mark.parametrize("use_dora", [False, True])
def test_what_minilora_writes_peft_loads(tmp_path, use_dora):
    layers = peft_layers(use_dora=use_dora, use_rslora=True)
    ml.peft.save_adapter(tmp_path, layers)
    model = peft.PeftModel.from_pretrained(_three_targets(), str(tmp_path))
    for name, layer in layers.items():
        module = model.base_model.model.get_submodule(name)
        np.testing.assert_array_equal(module.lora_A["default"].weight.detach().numpy(), layer.A)
        np.testing.assert_array_equal(module.lora_B["default"].weight.detach().numpy(), layer.B)
        assert module.scaling["default"] == pytest.approx(layer.scaling, rel=1e-12)
        if use_dora:
            m = module.lora_magnitude_vector["default"].weight.detach().numpy()
            np.testing.assert_array_equal(m, layer.m)
        x = np.random.default_rng(1).standard_normal((3, layer.in_features)).astype(np.float32)
        W = module.base_layer.weight.detach().numpy()
        b = module.base_layer.bias.detach().numpy()
        with torch.no_grad():
            y_peft = module(torch.from_numpy(x)).numpy()
        kw = dict(scaling=layer.scaling, bias=b)
        y = ml.dora_forward(x, W, layer.A, layer.B, layer.m, **kw)[0] if use_dora else \
            ml.lora_forward(x, W, layer.A, layer.B, **kw)[0]
        np.testing.assert_allclose(y, y_peft, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_what_peft_writes_minilora_loads(tmp_path, use_dora):
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q", "v", "inner.0"],
                             use_dora=use_dora, use_rslora=True, init_lora_weights="gaussian",
                             rank_pattern={"v": 4}, alpha_pattern={"v": 3})
    model = peft.get_peft_model(_three_targets(), config)
    with torch.no_grad():  # PEFT's gaussian init leaves B = 0, which would hide B's transposition
        for name in ("q", "v", "inner.0"):
            model.base_model.model.get_submodule(name).lora_B["default"].weight.normal_()
    model.save_pretrained(str(tmp_path))
    adapters = ml.peft.load_adapter(tmp_path)
    assert set(adapters) == {"q", "v", "inner.0"}
    for name in ("q", "v", "inner.0"):
        module = model.base_model.model.get_submodule(name)
        a = adapters[name]
        np.testing.assert_array_equal(a.A, module.lora_A["default"].weight.detach().numpy())
        np.testing.assert_array_equal(a.B, module.lora_B["default"].weight.detach().numpy())
        assert a.scaling == pytest.approx(module.scaling["default"], rel=1e-12)
        assert (a.r, a.alpha) == ((4, 3.0) if name == "v" else (2, 5.0))
        if use_dora:
            np.testing.assert_array_equal(
                a.m, module.lora_magnitude_vector["default"].weight.detach().numpy())
