"""Saving and loading a model's trainable arrays (the adapters), as .npz or a PEFT folder.

    save_trainable("adapters.npz", model)       # every array in model.parameters(), by name
    load_trainable("adapters.npz", model)       # copies them back in place, checking names/shapes
    save_peft("out/", model)                    # the LoRALinear layers as a PEFT adapter folder
"""

import io

import numpy as np

from minilora.formats import npz
from minilora.formats._io import write_atomic
from minilora.formats.peft import save_adapter
from minilora.toolkit.layer import LoRALinear


def save_trainable(path, model):
    """Write ``model.parameters()`` to an .npz file, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **model.parameters())
    write_atomic(path, buffer.getvalue())


def load_trainable(path, model):
    """Copy the arrays of an .npz file into ``model.parameters()`` in place.

    Every name must exist in the model with the same shape and dtype, every trainable array of
    the model must be in the file, and every value must be finite: anything else raises
    ValueError (``minilora.formats.npz.NpzError`` for an unreadable file) before anything is
    changed.
    """
    params = model.parameters()

    def check(declared):
        if set(declared) != set(params):
            missing = sorted(set(params) - set(declared))
            extra = sorted(set(declared) - set(params))
            raise ValueError(f"{path}: the file's arrays do not match the model's trainable "
                             f"ones (missing {missing}, unexpected {extra})")
        for name, (shape, dtype) in declared.items():
            if tuple(shape) != params[name].shape or dtype != params[name].dtype:
                raise ValueError(f"{path}: {name} is {dtype}{tuple(shape)}, the model's is "
                                 f"{params[name].dtype}{params[name].shape}")

    saved = npz.load(path, check=check)
    for name, value in saved.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{path}: {name} holds NaN or infinity")
    for name, value in saved.items():
        params[name][...] = value


def lora_layers(model, prefix=""):
    """``{name: LoRALinear}`` for every LoRA layer in a model (Sequential names are indices)."""
    if isinstance(model, LoRALinear):
        return {prefix.rstrip(".") or "layer": model}
    found = {}
    for i, m in enumerate(getattr(model, "modules", [])):
        found.update(lora_layers(m, f"{prefix}{i}."))
    return found


def save_peft(path, model):
    """Write the model's LoRA layers as a PEFT adapter folder (see ``minilora.formats.peft``)."""
    save_adapter(path, lora_layers(model))
