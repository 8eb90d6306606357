"""``from_pretrained``: a transformers model folder as a minilora model."""

import numpy as np

from minilora.models.config import read_config
from minilora.models.weights import load_weights


def from_pretrained(folder, *, dtype=np.float32, backend=None):
    """The LLaMA-family model in ``folder`` (``config.json`` + ``model.safetensors`` or a sharded
    index), its weights converted to ``dtype`` (float32, or float64 for checks) and frozen.

    Every check of the config and of the weights is done before the model is built
    (``read_config``, ``load_weights``): a folder it cannot represent exactly is a ValueError
    naming the file and the key or tensor.
    """
    config = read_config(folder)
    weights = load_weights(folder, config, dtype=dtype)
    from minilora.models.llama import LlamaModel  # the decoder, built only from checked input

    return LlamaModel(config, weights, backend=backend)
