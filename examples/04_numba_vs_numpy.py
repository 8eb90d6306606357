"""Chapter 4: the Numba backend against the NumPy reference.

Both compute the same equations; they may differ only by rounding, and
minilora.oracle.tolerance says by how much at most: γ_K·mag, K the reduction length, mag the
reference on absolute values.
"""

import time

import numpy as np

import minilora as ml
from minilora.oracle.tolerance import UNIT_ROUNDOFF, lora_error_bounds


def step(x, W, A, B, mask, dy, backend):
    y, cache = ml.lora_forward(x, W, A, B, scaling=2.0, dropout_mask=mask, backend=backend)
    return y, ml.lora_backward(dy, cache)


rng = np.random.default_rng(0)
for N, d_in, d_out, r in [(10, 128, 64, 4), (2048, 512, 512, 16)]:
    x = rng.standard_normal((N, d_in)).astype(np.float32)
    W = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    A = (rng.standard_normal((r, d_in)) / np.sqrt(d_in)).astype(np.float32)
    B = rng.standard_normal((d_out, r)).astype(np.float32)
    dy = rng.standard_normal((N, d_out)).astype(np.float32)
    mask = ((rng.random((N, d_in)) > 0.1) / 0.9).astype(np.float32)
    out, seconds = {}, {}
    for backend in ("numpy", "numba"):
        step(x, W, A, B, mask, dy, backend)  # compile / warm up
        t0 = time.perf_counter()
        reps = 200 if N < 100 else 5
        for _ in range(reps):
            y, grads = step(x, W, A, B, mask, dy, backend)
        seconds[backend] = (time.perf_counter() - t0) / reps
        out[backend] = {"y": y, "dx": grads.dx, "dA": grads.dA, "dB": grads.dB}
    bounds = lora_error_bounds(x, W, A, B, scaling=2.0, dy=dy, dropout_mask=mask,
                               u=UNIT_ROUNDOFF[np.dtype(np.float32)])
    print(f"N={N}, {d_in}->{d_out}, r={r}, float32, with dropout:")
    for name in out["numpy"]:
        diff = np.abs(out["numba"][name].astype(np.float64) - out["numpy"][name])
        used = np.max(diff / (2 * bounds[name] + 1e-300))
        print(f"  {name:>2}: max |numba − numpy| = {diff.max():.2e}, "
              f"{100 * used:.1f}% of twice the derived bound")
        assert used <= 1
    print(f"  one forward + backward: numpy {1e3 * seconds['numpy']:.3f} ms, "
          f"numba {1e3 * seconds['numba']:.3f} ms (one run on a shared machine: see "
          f"`minilora bench` for ratios)")
