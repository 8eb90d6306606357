"""Chapter 1: one LoRA layer, 128 -> 64 with rank 4, on a batch of 10.

Shapes, frozen against trainable parameters, a forward and backward pass, a finite-difference
check of every gradient, and why B starts at zero.
"""

import numpy as np

import minilora as ml

d_in, d_out, r, batch = 128, 64, 4, 10
layer = ml.LoRALinear(d_in, d_out, r=r, alpha=8, dtype=np.float64, seed=0)
x = np.random.default_rng(1).standard_normal((batch, d_in))

print("shapes: x", x.shape, " W", layer.W.shape, " A", layer.A.shape, " B", layer.B.shape)
trainable, frozen = layer.num_parameters()
print(f"trainable {trainable} (A and B) vs frozen {frozen} (W and bias): "
      f"{100 * trainable / (trainable + frozen):.1f}% of the layer trains")

# 1. B starts at zero, so the adapter is a no-op: the layer's first output is the base layer's.
y = layer(x)
base = x @ layer.W.T + layer.bias
print("fresh layer equals the base layer:", np.array_equal(y, base))
assert np.array_equal(y, base)

# The seed notebook drew B at random; then the "adapter" changes the model before any training.
noisy = ml.LoRALinear(d_in, d_out, r=r, alpha=8, dtype=np.float64, seed=0)
noisy.B[:] = np.random.default_rng(2).standard_normal(noisy.B.shape)
shift = np.abs(noisy(x) - base).max()
print(f"with a random B the output moves by up to {shift:.2f} before training: not a no-op")
assert shift > 0.1

# 2. Backward. With B = 0, dA = s·(dy B)ᵀ x = 0 exactly: only B moves on the first step.
dy = np.random.default_rng(3).standard_normal(y.shape)
dx = layer.backward(dy)
print("dx", dx.shape, " dA is exactly zero:", not layer.grads["A"].any(),
      f" |dB| = {np.linalg.norm(layer.grads['B']):.3f}")
assert not layer.grads["A"].any() and layer.grads["B"].any()

# 3. Finite differences, on the noisy layer so that every gradient is non-trivial.
def forward(x, W, A, B):
    return ml.lora_forward(x, W, A, B, scaling=noisy.scaling, bias=noisy.bias)


report = ml.gradcheck(forward, ml.lora_backward, dict(x=x, W=noisy.W, A=noisy.A, B=noisy.B),
                      wrt=["x", "A", "B"])
for check in report.inputs:
    print(f"gradcheck d{check.name}: {check.mode}, worst relative error {check.rel_err:.1e}")
print("every gradient matches finite differences:", report.passed)
