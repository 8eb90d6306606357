"""minilora: LoRA and DoRA layers in NumPy + Numba, every gradient derived by hand.

    import minilora as ml
    y, cache = ml.lora_forward(x, W, A, B, scaling=ml.lora_scaling(alpha=16, r=8))
    grads = ml.lora_backward(dy, cache)          # grads.dx, grads.dA, grads.dB
"""

import importlib

from minilora import _moved
from minilora.ops.blocks import (
    lora_mlp_backward,
    lora_mlp_forward,
    lora_qkv_backward,
    lora_qkv_forward,
    multi_lora_backward,
    multi_lora_forward,
)
from minilora.ops.functional import (
    DoRACache,
    DoRAGrads,
    LoRACache,
    LoRAGrads,
    dora_backward,
    dora_forward,
    lora_backward,
    lora_forward,
    lora_scaling,
)
from minilora.ops.gradcheck import GradcheckError, gradcheck
from minilora.toolkit.layer import LoRALinear

__version__ = "0.1.0"

_moved.install()  # the module paths from before the packages (minilora.peft, ...) still import

# Imported on first use, not by ``import minilora``: the gradient oracle and the PEFT adapter
# files are tools around the core (which imports neither), the models a layer above it.
# ``ml.oracle`` and ``import minilora.oracle`` both work.
_LAZY = {"models": "minilora.models", "oracle": "minilora.oracle",
         "peft": "minilora.formats.peft"}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'minilora' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "DoRACache",
    "DoRAGrads",
    "GradcheckError",
    "LoRACache",
    "LoRAGrads",
    "LoRALinear",
    "__version__",
    "dora_backward",
    "dora_forward",
    "gradcheck",
    "lora_backward",
    "lora_forward",
    "lora_mlp_backward",
    "lora_mlp_forward",
    "lora_qkv_backward",
    "lora_qkv_forward",
    "lora_scaling",
    "multi_lora_backward",
    "multi_lora_forward",
    "oracle",
    "peft",
]
