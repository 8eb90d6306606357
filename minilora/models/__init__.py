"""minilora.models: transformer language models built from minilora's LoRA layers and blocks.

A LLaMA-family decoder (LLaMA, Qwen2, Mistral) whose every op is a forward/backward pair with
the gradient derived by hand (docs/math.md): token embedding, RMSNorm, rotary position
embedding, causal grouped-query attention, the gated MLP, the causal language-model loss.
"""
