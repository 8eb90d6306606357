"""Optimizers and gradient clipping over a module's ``parameters()`` and ``grads``.

Both optimizers update the module's arrays in place, by name, and keep their state by name.
"""

import numpy as np


def clip_grad_norm(module, max_norm):
    """Scale every gradient by min(1, max_norm/‖g‖), ‖g‖ the norm of all gradients together.

    Returns ‖g‖ before clipping.
    """
    grads = module.grads.values()
    total = float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)))
    if total > max_norm > 0:
        for g in module.grads.values():
            g *= max_norm / total
    return total


class SGD:
    """v ← μ·v + g + λ·p;  p ← p − lr·v  (heavy-ball momentum μ, L2 weight decay λ)."""

    def __init__(self, module, lr, momentum=0.9, weight_decay=0.0):
        self.module, self.lr, self.momentum, self.weight_decay = module, lr, momentum, weight_decay
        self.velocity = {k: np.zeros_like(p) for k, p in module.parameters().items()}

    def step(self):
        grads = self.module.grads
        for name, p in self.module.parameters().items():
            v = self.velocity[name]
            v *= self.momentum
            v += grads[name] + self.weight_decay * p
            p -= self.lr * v


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019):

        m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  m̂ = m/(1−β₁ᵗ),  v̂ = v/(1−β₂ᵗ)
        p ← p − lr·(m̂/(√v̂ + ε) + λ·p)

    ``lora_plus_ratio``: LoRA+ (Hayou et al., 2024) trains each LoRA B matrix (parameters named
    ``B`` or ``<prefix>.B``) with the learning rate lr·ratio; they recommend a ratio near 16.
    """

    def __init__(self, module, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 lora_plus_ratio=1.0):
        self.module, self.lr, self.betas, self.eps = module, lr, betas, eps
        self.weight_decay, self.lora_plus_ratio = weight_decay, lora_plus_ratio
        params = module.parameters()
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.t = 0

    def lr_for(self, name):
        return self.lr * (self.lora_plus_ratio if name.split(".")[-1] == "B" else 1.0)

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        grads = self.module.grads
        for name, p in self.module.parameters().items():
            g, m, v = grads[name], self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            m_hat = m / (1 - b1**self.t)
            v_hat = v / (1 - b2**self.t)
            lr = self.lr_for(name)
            p -= lr * (m_hat / (np.sqrt(v_hat) + self.eps) + self.weight_decay * p)
