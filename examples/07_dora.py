"""Chapter 7: DoRA, its gradients checked by complex steps, and its memory.

DoRA rescales each output row of W + s·B A to a learned magnitude m: y = c ⊙ (x Vᵀ) + bias with
V = W + s·B A and c = m/‖V_j‖ (docs/math.md §5). PEFT forms V to take its norms: a full copy of
W. minilora expands ‖W_j + s·B_j A‖² and needs only W Aᵀ (d_out × r).
"""

import tracemalloc

import numpy as np

import minilora as ml
from minilora.ops import dora

rng = np.random.default_rng(0)
N, d_in, d_out, r, s = 4, 6, 5, 2, 1.5
x, W = rng.standard_normal((N, d_in)), rng.standard_normal((d_out, d_in))
A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
m = np.linalg.norm(W + s * B @ A, axis=1) * rng.uniform(0.5, 2.0, d_out)



def make_pair(detach_norm):
    """DoRA through the public pair on the NumPy reference, which takes the complex inputs of
    complex steps. The detached gradient is the derivative of the forward whose norms are
    computed once, at the point, and held fixed."""
    frozen = dora.row_norms(W, A, B, s, False)[0] if detach_norm else None

    def forward(x, W, A, B, m):
        return ml.dora_forward(x, W, A, B, m, scaling=s, detach_norm=detach_norm, norms=frozen,
                               backend="numpy")

    def backward(dy, cache):
        return ml.dora_backward(dy, cache, need_dW=True)

    return forward, backward


for detach_norm in (True, False):
    forward, backward = make_pair(detach_norm)
    report = ml.gradcheck(forward, backward, dict(x=x, W=W, A=A, B=B, m=m), method="complex",
                          rtol=1e-12)
    print(f"detach_norm={detach_norm}: complex-step check of dx, dW, dA, dB, dm, worst "
          f"relative error {report.worst_rel_err:.1e}")
    assert report.passed

# Memory: the row norms with and without forming V = W + s·B A (d = 2048, float32).
d = 2048
W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
A = (rng.standard_normal((16, d)) / np.sqrt(d)).astype(np.float32)
B = (0.1 * rng.standard_normal((d, 16))).astype(np.float32)


def peak(fn):
    tracemalloc.start()
    fn()
    result = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result


naive = peak(lambda: np.linalg.norm(W + 2.0 * (B @ A), axis=1))
ours = peak(lambda: dora.row_norms(W, A, B, 2.0, False))
n_naive = np.linalg.norm(W.astype(np.float64) + 2.0 * (B.astype(np.float64) @ A), axis=1)
n_ours = dora.row_norms(W, A, B, 2.0, False)[0]
print(f"row norms of a {d}x{d} float32 W: naive peak {naive / W.nbytes:.2f}x the bytes of W, "
      f"minilora {ours / W.nbytes:.3f}x; max relative difference "
      f"{np.max(np.abs(n_ours - n_naive) / n_naive):.1e}")
assert ours < 0.1 * W.nbytes
