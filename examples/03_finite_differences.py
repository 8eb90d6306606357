"""Chapter 3: finite differences, the judge of every hand-derived gradient.

The central difference (f(p+h) − f(p−h)) / 2h has error O(h²) plus rounding of order ε/h; the
complex step Im f(p + ih)/h has no subtraction, hence no cancellation, so h can be 1e-30.
"""

import numpy as np

import minilora as ml

rng = np.random.default_rng(0)
x, W = rng.standard_normal((4, 6)), rng.standard_normal((5, 6))
A, B = rng.standard_normal((3, 6)), rng.standard_normal((5, 3))
dy = rng.standard_normal((4, 5))  # the loss is L = Σ dy ⊙ y: its gradient is the backward of dy


def loss(A):
    """L(A) = Σ dy ⊙ y, through the public forward; the NumPy reference also takes complex A."""
    y, _ = ml.lora_forward(x, W, A, B, scaling=0.5, backend="numpy")
    return np.sum(dy * y)


_, cache = ml.lora_forward(x, W, A, B, scaling=0.5)
dA = ml.lora_backward(dy, cache).dA
print("one entry of dA by central differences, as the step h shrinks:")
for h in (1e-1, 1e-3, 1e-5, 1e-7, 1e-9, 1e-11):
    E = np.zeros_like(A)
    E[1, 2] = h
    numerical = (loss(A + E) - loss(A - E)) / (2 * h)
    print(f"  h = {h:.0e}: relative error {abs(numerical - dA[1, 2]) / abs(dA[1, 2]):.1e}")
E = np.zeros_like(A, dtype=complex)
E[1, 2] = 1e-30j
complex_step = np.imag(loss(A + E)) / 1e-30
rel = abs(complex_step - dA[1, 2]) / abs(dA[1, 2])
print(f"the complex step with h = 1e-30: relative error {rel:.1e}")
assert rel < 1e-14


def forward(x, W, A, B):
    return ml.lora_forward(x, W, A, B, scaling=0.5)


def backward(dy, cache):
    return ml.lora_backward(dy, cache, need_dW=True)


report = ml.gradcheck(forward, backward, dict(x=x, W=W, A=A, B=B))
print(f"minilora.ops.gradcheck, full Jacobians: worst relative error {report.worst_rel_err:.1e}")
assert report.passed


def wrong_backward(dy, cache):  # a classic slip: forgetting the scaling in dA
    grads = backward(dy, cache)
    return grads._replace(dA=grads.dA / 0.5)


report = ml.gradcheck(forward, wrong_backward, dict(x=x, W=W, A=A, B=B), raise_on_failure=False)
(bad,) = [c for c in report.inputs if not c.passed]
print("a backward that forgets s in dA is caught:", bad.describe())
assert bad.name == "A"
