"""Setup that several test files share: the backends, LoRA problems drawn from a generator,
dropout masks, safetensors files built by hand, PEFT-style adapter layers, and the marker for
tests that need a package of the parity extra.

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
    from minilora import safetensors

    path.write_bytes(data)
    with pytest.raises(safetensors.SafetensorsError, match=pattern) as e:
        safetensors.load(path)
    assert str(path) in str(e.value)
