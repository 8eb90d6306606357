"""minilora: LoRA and DoRA layers in NumPy + Numba, every gradient derived by hand.

    import minilora as ml
    y, cache = ml.lora_forward(x, W, A, B, scaling=ml.lora_scaling(alpha=16, r=8))
    grads = ml.lora_backward(dy, cache)          # grads.dx, grads.dA, grads.dB
"""

from minilora import oracle, peft
from minilora.blocks import (
    lora_mlp_backward,
    lora_mlp_forward,
    lora_qkv_backward,
    lora_qkv_forward,
    multi_lora_backward,
    multi_lora_forward,
)
from minilora.functional import (
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
from minilora.gradcheck import GradcheckError, gradcheck
from minilora.layer import LoRALinear

__version__ = "0.1.0"

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
