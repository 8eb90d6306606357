"""PEFT adapter folders: our own round trip always; PEFT's from_pretrained and save_pretrained
when torch and peft are installed."""

import numpy as np
import pytest

import minilora as ml


def _layers(use_dora=False, use_rslora=False):
    rng = np.random.default_rng(0)
    layers = {}
    for name, (d_in, d_out, r) in {"q": (8, 6, 2), "v": (8, 6, 4), "inner.0": (6, 4, 2)}.items():
        layer = ml.LoRALinear(d_in, d_out, r=r, alpha=2 * r + 1, use_dora=use_dora,
                              use_rslora=use_rslora, dtype=np.float32, seed=1)
        layer.B[:] = rng.standard_normal(layer.B.shape)
        if use_dora:
            layer.m *= 1.5
        layers[name] = layer
    return layers


@pytest.mark.parametrize("use_dora", [False, True])
def test_own_round_trip_keeps_everything(tmp_path, use_dora):
    layers = _layers(use_dora=use_dora, use_rslora=True)
    ml.peft.save_adapter(tmp_path, layers)
    loaded = ml.peft.load_adapter(tmp_path)
    assert set(loaded) == set(layers)
    for name, layer in layers.items():
        a = loaded[name]
        np.testing.assert_array_equal(a.A, layer.A)
        np.testing.assert_array_equal(a.B, layer.B)
        assert a.scaling == layer.scaling and a.use_dora == use_dora
        if use_dora:
            np.testing.assert_array_equal(a.m, layer.m)


def test_bad_folders_raise_adapter_error(tmp_path):
    with pytest.raises(ml.peft.AdapterError, match="cannot read"):
        ml.peft.load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ml.peft.AdapterError, match="not LORA"):
        ml.peft.load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    from minilora import safetensors

    safetensors.save(tmp_path / "adapter_model.safetensors",
                     {"base_model.model.q.lora_A.weight": np.zeros((2, 4), np.float32)})
    with pytest.raises(ml.peft.AdapterError, match="lacks lora_A or lora_B"):
        ml.peft.load_adapter(tmp_path)


class _Model:
    """A torch model with the three target modules of ``_layers``."""

    @staticmethod
    def make():
        import torch

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
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    layers = _layers(use_dora=use_dora, use_rslora=True)
    ml.peft.save_adapter(tmp_path, layers)
    model = peft.PeftModel.from_pretrained(_Model.make(), str(tmp_path))
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
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q", "v", "inner.0"],
                             use_dora=use_dora, use_rslora=True, init_lora_weights="gaussian",
                             rank_pattern={"v": 4}, alpha_pattern={"v": 3})
    model = peft.get_peft_model(_Model.make(), config)
    model.save_pretrained(str(tmp_path))
    adapters = ml.peft.load_adapter(tmp_path)
    for name in ("q", "v", "inner.0"):
        module = model.base_model.model.get_submodule(name)
        a = adapters[name]
        np.testing.assert_array_equal(a.A, module.lora_A["default"].weight.detach().numpy())
        assert a.scaling == pytest.approx(module.scaling["default"], rel=1e-12)
        assert a.r == (4 if name == "v" else 2)
        if use_dora:
            np.testing.assert_array_equal(
                a.m, module.lora_magnitude_vector["default"].weight.detach().numpy())
