"""The training toolkit around the ops: layers with their gradients, losses, optimisers, the
PEFT init schemes and checkpoints.

    layer        LoRALinear (LoRA and DoRA, merging for inference)
    modules      Linear, ReLU, GELU, Sequential for small networks
    losses       softmax cross-entropy, mean squared error
    optim        SGD, AdamW (with LoRA+'s rate for B), gradient clipping
    init         PEFT's init schemes: default, gaussian, pissa, olora
    checkpoint   a model's trainable arrays to and from .npz or a PEFT folder
"""
