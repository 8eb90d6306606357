"""Chapter 6: merging an adapter for inference.

Without dropout, x Wᵀ + s·(x Aᵀ) Bᵀ = x (W + s·B A)ᵀ: after training, one matrix does the work
of three. merged_weight() returns W + s·B A (DoRA: scaled rows) as a new array.
"""

import time

import numpy as np

import minilora as ml


def best_of(fn, reps=20):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


rng = np.random.default_rng(0)
for use_dora in (False, True):
    layer = ml.LoRALinear(1024, 1024, r=16, alpha=32, use_dora=use_dora, seed=0).eval()
    layer.B[:] = 0.01 * rng.standard_normal(layer.B.shape)  # as after some training
    if use_dora:
        layer.m *= 1.1
    merged = layer.merged_weight()
    x = rng.standard_normal((256, 1024)).astype(np.float32)
    y_adapter = layer(x)
    y_merged = x @ merged.T + layer.bias
    diff = np.max(np.abs(y_adapter - y_merged)) / np.max(np.abs(y_adapter))
    kind = "DoRA" if use_dora else "LoRA"
    print(f"{kind}: merged and unmerged outputs agree to {diff:.1e} (relative, float32)")
    assert diff < 1e-5
    unmerged = best_of(lambda layer=layer, x=x: layer(x))
    fused = best_of(lambda x=x, merged=merged, bias=layer.bias: x @ merged.T + bias)
    print(f"{kind}: one forward, unmerged {1e3 * unmerged:.2f} ms, merged {1e3 * fused:.2f} ms "
          f"({unmerged / fused:.2f}x; timings on a shared machine, best of 20)")
