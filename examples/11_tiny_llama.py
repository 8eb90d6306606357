"""Chapter 11: LoRA on a language model, every gradient by hand.

A LLaMA-family decoder (``minilora.models``) is embedding, RMSNorm, rotary attention with
grouped-query heads, the gated MLP and the causal language-model loss, each a forward/backward
pair (docs/math.md §8). This chapter builds a tiny one, checks its LoRA gradients against
central differences, saves and reloads the adapter as a PEFT folder, trains it on a sentence
and lets it write it back with the KV cache. ``minilora demo --model`` is the long version:
pretraining on Python code, adapting to English prose by full fine-tuning and by LoRA.
"""

import tempfile

import numpy as np

from minilora.models import LlamaModel, ModelConfig, text
from minilora.models.weights import expected_shapes
from minilora.toolkit.optim import AdamW

config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=text.VOCAB_SIZE, hidden_size=32,
                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=64, tie_word_embeddings=True)
rng = np.random.default_rng(0)
weights = {name: (np.ones(shape) if name.endswith("norm.weight")  # float64: exact checks
                  else 0.3 * rng.standard_normal(shape))
           for name, shape in expected_shapes(config).items()}

# 1. LoRA on all seven projections; its gradients against central differences (float64).
model = LlamaModel(config, weights)
model.add_lora(r=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"))
for p in model.parameters().values():  # B starts at 0 (PEFT's init): move it so dA is not 0
    p += 0.1 * rng.standard_normal(p.shape)
ids = text.encode("LoRA adapts a frozen model.")[None, :]  # (1, T)
model.zero_grad()
model.train_step(ids, train=False)
worst = 0.0
for name, p in model.parameters().items():
    idx = tuple(rng.integers(0, n) for n in p.shape)
    old = p[idx]
    p[idx] = old + 1e-6
    up = model.loss(ids)[0]
    p[idx] = old - 1e-6
    down = model.loss(ids)[0]
    p[idx] = old
    worst = max(worst, abs(model.grads[name][idx] - (up - down) / 2e-6))
assert worst < 1e-7, worst
print(f"{len(model.parameters())} LoRA matrices: each one's gradient matches central "
      f"differences (worst absolute difference {worst:.1e})")

# 2. The adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors), reloaded.
with tempfile.TemporaryDirectory() as folder:
    model.save_adapter(folder)
    again = LlamaModel(config, weights)
    again.load_adapter(folder)
    assert np.array_equal(again.forward(ids)[0], model.forward(ids)[0])
print("saved as a PEFT adapter folder and loaded back: the same logits, bit for bit")

# 3. Train the adapters on the sentence, then let the model write it from its first byte.
opt = AdamW(model, lr=3e-2, weight_decay=0.0)
first = model.loss(ids)[0]
for _ in range(60):
    model.zero_grad()
    model.train_step(ids)
    opt.step()
last = model.loss(ids)[0]
assert last < first / 4, (first, last)
written = text.decode(model.generate(ids[:, :1], max_new_tokens=ids.shape[1] - 1)[0])
print(f"60 AdamW steps on the adapters alone: loss {first:.2f} -> {last:.3f}; greedy "
      f"generation (KV cache) from 'L' writes {written!r}")
assert all(not w.flags.writeable for w in model.weights.values())  # the base stayed frozen
