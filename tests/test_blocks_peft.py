"""Fused blocks against PEFT in float64: a LLaMA-style MLP, attention projections and PEFT's
mixed-batch forward (``adapter_names=``). Skipped without torch + peft (CI installs them)."""

import numpy as np
import pytest
from _helpers import BACKENDS, torch_step

from minilora.ops import blocks

# -- PEFT parity --------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class _MLP(torch.nn.Module):
    """LLaMA's MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, d, hidden, act):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, hidden, bias=False)
        self.up_proj = torch.nn.Linear(d, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, d, bias=False)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class _Attention(torch.nn.Module):
    """An attention block's projections (the part a QKV kernel computes)."""

    def __init__(self, d, d_kv):
        super().__init__()
        self.q_proj = torch.nn.Linear(d, d, bias=True)
        self.k_proj = torch.nn.Linear(d, d_kv, bias=False)
        self.v_proj = torch.nn.Linear(d, d_kv, bias=True)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def _peft(module, names, r=4, alpha=6, seed=0):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=names, lora_dropout=0.0,
                             init_lora_weights=False)
    model = peft.get_peft_model(module.double(), config)
    layers = [model.base_model.model.get_submodule(n) for n in names]
    return model, layers


def _peft_step(module, names, x_shape, seed, **config):
    """PEFT's adapters on ``module``'s ``names``, their weights as five tuples (W, A, B, bias,
    scaling, one entry per layer), a drawn x and PEFT's step on it (xt, yt, dy)."""
    model, layers = _peft(module, names, **config)
    weights = tuple(zip(*map(_weights, layers), strict=True))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    return layers, weights, x, torch_step(model, x, rng)


def _assert_matches(y, grads, yt, xt, layers):
    """Our output (the projections' concatenated), dx and every adapter's dA, dB are PEFT's."""
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.dx, xt.grad.numpy(), rtol=1e-11, atol=1e-11)
    for j, layer in enumerate(layers):
        for mine, theirs in ((grads.dA[j], layer.lora_A), (grads.dB[j], layer.lora_B)):
            np.testing.assert_allclose(mine, theirs["default"].weight.grad.numpy(),
                                       rtol=1e-11, atol=1e-11)


def _weights(layer, name="default"):
    t = lambda p: p.detach().numpy().copy()  # noqa: E731
    bias = layer.base_layer.bias
    return (t(layer.base_layer.weight), t(layer.lora_A[name].weight),
            t(layer.lora_B[name].weight), None if bias is None else t(bias),
            layer.scaling[name])


@pytest.mark.parametrize("activation,act", [("silu", torch.nn.SiLU()),
                                            ("gelu", torch.nn.GELU()),
                                            ("gelu_tanh", torch.nn.GELU(approximate="tanh"))])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_matches_peft(activation, act, backend):
    layers, (W, A, B, _, s), x, (xt, yt, dy) = _peft_step(
        _MLP(6, 10, act), ["gate_proj", "up_proj", "down_proj"], (2, 5, 6), seed=8)
    y, cache = blocks.lora_mlp_forward(x, list(W), list(A), list(B), scaling=list(s),
                                       activation=activation, backend=backend)
    _assert_matches(y, blocks.lora_mlp_backward(dy, cache), yt, xt, layers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qkv_matches_peft(backend):
    layers, (W, A, B, bias, s), x, (xt, yt, dy) = _peft_step(
        _Attention(8, 4), ["q_proj", "k_proj", "v_proj"], (3, 4, 8), seed=9, r=3, alpha=5)
    ys, cache = blocks.lora_qkv_forward(x, list(W), list(A), list(B), scaling=list(s),
                                        bias=list(bias), backend=backend)
    sizes = [y.shape[-1] for y in ys]
    g = blocks.lora_qkv_backward(np.split(dy, np.cumsum(sizes)[:-1], axis=-1), cache)
    _assert_matches(np.concatenate(ys, -1), g, yt, xt, layers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_lora_matches_peft_mixed_batch(backend):
    """PEFT's adapter_names= gives each sample of the batch its own adapter ("__base__": none);
    multi_lora_forward's adapter_index per token generalizes it."""
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(7, 5, bias=True))
    base = base.double()
    names = ["alice", "bob", "carol"]
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["lin"], init_lora_weights=False)
    model = peft.get_peft_model(base, config, adapter_name="alice")
    model.add_adapter("bob", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"],
                                           init_lora_weights=False))
    model.add_adapter("carol", peft.LoraConfig(r=1, lora_alpha=3, use_rslora=True,
                                           target_modules=["lin"], init_lora_weights=False))
    model.double().eval()
    layer = model.base_model.model.lin
    W, bias = (p.detach().numpy() for p in (layer.base_layer.weight, layer.base_layer.bias))
    A = [layer.lora_A[n].weight.detach().numpy() for n in names]
    B = [layer.lora_B[n].weight.detach().numpy() for n in names]
    s = [layer.scaling[n] for n in names]
    rng = np.random.default_rng(10)
    per_sample = ["bob", "__base__", "alice", "carol", "bob", "alice"]
    x = rng.standard_normal((len(per_sample), 3, 7))
    with torch.no_grad():
        yt = model(torch.from_numpy(x), adapter_names=per_sample).numpy()
    index = np.array([names.index(n) if n in names else -1 for n in per_sample])
    index = np.repeat(index[:, None], 3, axis=1)  # one adapter per sample, for every token
    y, _ = blocks.multi_lora_forward(x, W, A, B, index, scaling=s, bias=bias, backend=backend)
    np.testing.assert_allclose(y, yt, rtol=1e-12, atol=1e-12)
