"""Chapter 2: the LoRA backward pass by hand, one line per equation, checked against minilora.

y = x Wᵀ + s·(x Aᵀ) Bᵀ. Given dy = ∂L/∂y, the chain rule gives (docs/math.md §2):
    g = dy B,  dB = s·dyᵀ h,  dA = s·gᵀ x,  dx = dy W + s·g A
"""

import numpy as np

import minilora as ml

rng = np.random.default_rng(0)
N, d_in, d_out, r, s = 3, 5, 4, 2, 0.5
x, W = rng.standard_normal((N, d_in)), rng.standard_normal((d_out, d_in))
A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
dy = rng.standard_normal((N, d_out))

h = x @ A.T  # (N, r)       the input projected down to rank r
y = x @ W.T + s * h @ B.T  # (N, d_out)
g = dy @ B  # (N, r)        the upstream gradient projected onto the rank-r space
dB = s * dy.T @ h  # (d_out, r)   y_nj has the term s·h_nk·B_jk
dA = s * g.T @ x  # (r, d_in)     h_nk = Σ_i x_ni A_ki, and ∂L/∂h = s·g
dx = dy @ W + s * g @ A  # (N, d_in)   x feeds the base path and the LoRA path
for name, value in [("h", h), ("y", y), ("g", g), ("dB", dB), ("dA", dA), ("dx", dx)]:
    print(f"{name:>2} {value.shape}")

y_ml, cache = ml.lora_forward(x, W, A, B, scaling=s)
grads = ml.lora_backward(dy, cache)
for name, mine, theirs in [("y", y, y_ml), ("dx", dx, grads.dx), ("dA", dA, grads.dA),
                           ("dB", dB, grads.dB)]:
    err = np.max(np.abs(mine - theirs))
    print(f"by hand vs minilora, {name}: max difference {err:.1e}")
    assert err < 1e-12

# The same gradient one entry at a time, as the index form reads: ∂L/∂A_ki = s Σ_n g_nk x_ni.
k, i = 1, 3
entry = s * sum(g[n, k] * x[n, i] for n in range(N))
print(f"dA[{k},{i}] from the index form: {entry:.6f}, from the matrix form: {dA[k, i]:.6f}")
assert abs(entry - dA[k, i]) < 1e-12
