"""minilora.models: transformer language models built from minilora's LoRA layers and blocks.

A LLaMA-family decoder (LLaMA, Qwen2, Mistral) whose every op is a forward/backward pair with
the gradient derived by hand (docs/math.md): token embedding, RMSNorm, rotary position
embedding, causal grouped-query attention, the gated MLP, the causal language-model loss.
"""

from minilora.models.config import ModelConfig, read_config
from minilora.models.llama import LlamaModel
from minilora.models.pretrained import from_pretrained
from minilora.models.weights import WeightsError, load_weights

__all__ = ["LlamaModel", "ModelConfig", "WeightsError", "from_pretrained", "load_weights",
           "read_config"]
