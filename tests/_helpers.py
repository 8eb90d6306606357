"""Setup and checks that several test files share: the backends, the marker for tests that need
a package of the parity extra, LoRA arrays drawn from a generator, dropout masks, safetensors
files built by hand and their refusal, PEFT-style adapter layers and their comparison, a
layer's functional gradients, and one torch forward-backward step.

Test files import it as ``from _helpers import ...`` (pytest puts tests/ on sys.path)."""

import importlib.util

import numpy as np
import pytest

import minilora as ml

BACKENDS = ["numpy", "numba"]


def requires(*packages):
    """Skip unless every package is importable: a package of the parity extra, which the light
    install lacks and CI installs (so there a skip fails the run). A package that is installed
    but fails to import fails the test instead of skipping it."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (parity extra)")


def lora_arrays(rng, N, d_in, d_out, r, dtype=np.float64):
    """x (N, d_in), W (d_out, d_in), A (r, d_in), B (d_out, r), standard normal, drawn from
    ``rng`` in that order (callers draw their extras after, so their streams stay as they were)."""
    return dict(x=rng.standard_normal((N, d_in)).astype(dtype),
                W=rng.standard_normal((d_out, d_in)).astype(dtype),
                A=rng.standard_normal((r, d_in)).astype(dtype),
                B=rng.standard_normal((d_out, r)).astype(dtype))


def dropout_mask(rng, shape, p=0.3):
    """An inverted-dropout mask: 0 with probability p, else 1/(1 − p)."""
    return (rng.random(shape) >= p) / (1 - p)


def safetensors_file(header, body=b""):
    """The bytes of a safetensors file: the header's length (u64, little-endian), the header
    (JSON bytes as given, so malformed ones can be written), the data section."""
    return len(header).to_bytes(8, "little") + header + body


def peft_layers(use_dora=False, use_rslora=False):
    """Three float32 LoRALinear layers named as PEFT names modules ("q", "v", "inner.0"), with
    different ranks and alphas and a non-zero B (and m scaled, for DoRA)."""
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


def assert_safetensors_refused(path, data, pattern):
    """Write ``data`` to ``path``: minilora's reader refuses it with a SafetensorsError that
    matches ``pattern`` and names the file."""
    from minilora.formats import safetensors

    path.write_bytes(data)
    with pytest.raises(safetensors.SafetensorsError, match=pattern) as e:
        safetensors.load(path)
    assert str(path) in str(e.value)


def functional_grads(layer, x, dy):
    """The functional pair's gradients (dx, dA, dB, ...) on a LoRA layer's arrays as they are
    now, without dropout: what ``layer.backward`` must agree with."""
    _, cache = ml.lora_forward(x, layer.W, layer.A, layer.B, scaling=layer.scaling,
                               bias=layer.bias, fan_in_fan_out=layer.fan_in_fan_out)
    return ml.lora_backward(dy, cache)


def assert_adapters_equal(got, expected):
    """Two ``{name: Adapter}`` (or LoRALinear) dicts hold the same adapters: A, B and m bit for
    bit with their dtypes, and the same alpha, options and scaling."""
    assert set(got) == set(expected)
    for name, e in expected.items():
        e = e if isinstance(e, ml.peft.Adapter) else ml.peft.Adapter.from_layer(e)
        g = got[name]
        for field in ("A", "B", "m"):
            a, b = getattr(g, field), getattr(e, field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape, (name, field)
                np.testing.assert_array_equal(a, b, err_msg=f"{name}.{field}")
        assert (g.alpha, g.use_rslora, g.use_dora, g.fan_in_fan_out, g.scaling) == \
            (float(e.alpha), e.use_rslora, e.use_dora, e.fan_in_fan_out, e.scaling), name


def torch_step(model, x, rng):
    """A torch model's forward and backward on x with an upstream gradient drawn from ``rng``:
    (xt, yt, dy), with xt.grad and the parameters' .grad filled. (torch is imported here, so
    the light install can import this module.)"""
    import torch

    xt = torch.from_numpy(x).requires_grad_(True)
    yt = model(xt)
    dy = rng.standard_normal(yt.shape)
    yt.backward(torch.from_numpy(dy))
    return xt, yt, dy
