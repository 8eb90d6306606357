"""``minilora bench``: speed and memory as ratios measured in one process.

The machine this runs on may be shared and noisy, so an absolute time means little. Every
contender of a case runs in the same process, interleaved (floor, numba, numpy, torch, floor,
numba, ...), each timing being the median of a short inner loop, and each reported figure the
median over repeats of the ratio. The floor is the two large products every LoRA step needs:
``x @ W.T`` plus ``dy @ W`` in NumPy.
"""

import json
import subprocess
import sys
import time
import tracemalloc

import numpy as np

import minilora as ml
from minilora.formats._io import write_atomic
from minilora.ops import lora_numba

# (name, N, d_in, d_out, r, dtype, dropout, op)
CASES = [
    ("fp32 N=4096 1024->1024 r=16", 4096, 1024, 1024, 16, np.float32, False, "lora"),
    ("fp32 N=4096 1024->1024 r=16 dropout", 4096, 1024, 1024, 16, np.float32, True, "lora"),
    ("fp64 N=2048 1024->1024 r=16", 2048, 1024, 1024, 16, np.float64, False, "lora"),
    ("fp32 N=4096 1024->1024 r=64", 4096, 1024, 1024, 64, np.float32, False, "lora"),
    ("fp32 N=4096 1024->1024 r=256", 4096, 1024, 1024, 256, np.float32, False, "lora"),
    ("fp32 N=4096 4096->1024 r=16", 4096, 4096, 1024, 16, np.float32, False, "lora"),
    ("fp32 N=16384 512->512 r=16", 16384, 512, 512, 16, np.float32, False, "lora"),
    ("fp32 N=10 128->64 r=4", 10, 128, 64, 4, np.float32, False, "lora"),
    ("fp32 N=64 128->64 r=4", 64, 128, 64, 4, np.float32, False, "lora"),
    ("fp32 N=256 128->64 r=4", 256, 128, 64, 4, np.float32, False, "lora"),
    ("fp32 N=10 512->256 r=8", 10, 512, 256, 8, np.float32, False, "lora"),
    ("fp32 N=64 512->256 r=8", 64, 512, 256, 8, np.float32, False, "lora"),
    ("fp32 N=256 512->256 r=8", 256, 512, 256, 8, np.float32, False, "lora"),
    ("DoRA fp32 N=4096 1024->1024 r=16", 4096, 1024, 1024, 16, np.float32, False, "dora"),
]
QUICK = ["fp32 N=10 128->64 r=4", "fp32 N=256 512->256 r=8"]


def _problem(N, d_in, d_out, r, dtype, dropout, seed=0):
    rng = np.random.default_rng(seed)
    p = dict(x=rng.standard_normal((N, d_in), dtype=np.float64).astype(dtype),
             W=(rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(dtype),
             A=(rng.standard_normal((r, d_in)) / np.sqrt(d_in)).astype(dtype),
             B=(rng.standard_normal((d_out, r)) * 0.1).astype(dtype),
             dy=rng.standard_normal((N, d_out)).astype(dtype))
    p["m"] = np.linalg.norm(p["W"], axis=1).astype(dtype)
    p["mask"] = ((rng.random((N, d_in)) >= 0.1) / 0.9).astype(dtype) if dropout else None
    return p


def _contenders(p, op, with_torch):
    """name -> a zero-argument callable running one forward + backward (dx, dA, dB)."""
    x, W, A, B, dy, m, mask = (p[k] for k in ("x", "W", "A", "B", "dy", "m", "mask"))

    def floor():
        x @ W.T
        dy @ W

    def minilora_step(backend):
        if op == "dora":
            def step():
                _, cache = ml.dora_forward(x, W, A, B, m, scaling=2.0, dropout_mask=mask,
                                           backend=backend)
                ml.dora_backward(dy, cache)
        else:
            def step():
                _, cache = ml.lora_forward(x, W, A, B, scaling=2.0, dropout_mask=mask,
                                           backend=backend)
                ml.lora_backward(dy, cache)
        return step

    out = {"floor": floor, "numba": minilora_step("numba"), "numpy": minilora_step("numpy")}
    if with_torch:
        torch_step = _torch_peft_step(p, op)
        if torch_step is not None:
            out["torch+peft"] = torch_step
    return out


def _torch_peft_step(p, op):
    """PEFT's LoRA layer on a torch Linear; None when torch or peft is not installed."""
    try:
        import peft
        import torch
    except ImportError:
        return None
    dtype = torch.float32 if p["x"].dtype == np.float32 else torch.float64
    d_out, d_in = p["W"].shape
    base = torch.nn.Linear(d_in, d_out, bias=False, dtype=dtype)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = base

        def forward(self, x):
            return self.lin(x)

    config = peft.LoraConfig(r=p["A"].shape[0], lora_alpha=2 * p["A"].shape[0],
                             target_modules=["lin"], use_dora=op == "dora",
                             lora_dropout=0.1 if p["mask"] is not None else 0.0)
    model = peft.get_peft_model(Wrapper(), config).to(dtype)
    with torch.no_grad():
        layer = model.base_model.model.lin
        layer.base_layer.weight.copy_(torch.from_numpy(p["W"]))
        layer.lora_A["default"].weight.copy_(torch.from_numpy(p["A"]))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(p["B"]))
    x = torch.from_numpy(p["x"]).requires_grad_(True)
    dy = torch.from_numpy(p["dy"])

    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).backward(dy)

    return step


def _median_time(fn, inner):
    times = []
    for _ in range(inner):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_case(contenders, repeats, inner):
    """Median over ``repeats`` of each contender's time divided by the floor's, interleaved."""
    for fn in contenders.values():  # warm up: JIT, caches, thread pools
        fn()
    ratios = {name: [] for name in contenders if name != "floor"}
    floors = []
    for _ in range(repeats):
        t_floor = _median_time(contenders["floor"], inner)
        floors.append(t_floor)
        for name, fn in contenders.items():
            if name != "floor":
                ratios[name].append(_median_time(fn, inner) / t_floor)
    result = {f"{name}/floor": float(np.median(r)) for name, r in ratios.items()}
    per_rep = {name: np.asarray(r) for name, r in ratios.items()}
    for other in ("numpy", "torch+peft"):
        if other in per_rep:
            result[f"numba/{other}"] = float(np.median(per_rep["numba"] / per_rep[other]))
    result["floor_ms"] = float(np.median(floors) * 1e3)
    return result


def peak_extra_bytes(fn):
    """Peak bytes allocated (through NumPy, which reports to tracemalloc) while fn runs."""
    fn()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def memory_figures(backend="numba"):
    """LoRA: N=4096, 2048->2048, r=16 fp32 against the bytes of y, dx, dA, dB, as the peak
    resident set of a fresh process (``peak_rss_extra``) and as NumPy's peak allocation
    (tracemalloc). DoRA: d=4096, N=64, r=16 fp32 against the bytes of W (tracemalloc)."""
    p = _problem(4096, 2048, 2048, 16, np.float32, False)
    step = _contenders(p, "lora", False)[backend]
    outputs = 2 * p["dy"].nbytes + p["A"].nbytes + p["B"].nbytes
    lora = peak_extra_bytes(step) / outputs
    del p, step
    rss = {f"{who}_peak_rss_{mode}_over_outputs":
           peak_rss_extra(4096, 2048, 2048, 16, backend if who == "lora" else "floor",
                          warm=mode == "warm") / outputs
           for who, mode in (("lora", "warm"), ("lora", "cold"), ("floor", "cold"))}
    p = _problem(64, 4096, 4096, 16, np.float32, False)
    dora = peak_extra_bytes(_contenders(p, "dora", False)[backend]) / p["W"].nbytes
    return {"lora_peak_over_outputs": lora, **rss, "dora_peak_over_W": dora}


_RSS_PROBE = """
import sys, numpy as np, minilora as ml
N, d_in, d_out, r = (int(a) for a in sys.argv[1:5])
rng = np.random.default_rng(0)
def arr(*shape, scale):  # made in place: no temporary above the inputs' own bytes
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= scale
    return a
x, dy = arr(N, d_in, scale=1.0), arr(N, d_out, scale=1.0)
W, A = arr(d_out, d_in, scale=d_in ** -0.5), arr(r, d_in, scale=d_in ** -0.5)
B = arr(d_out, r, scale=0.1)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
if sys.argv[6] == "warm":  # BLAS's own buffers, touched by its first products, not counted
    x @ W.T, dy @ W
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # peak := now (Linux >= 4.0)
    f.write("5")
if sys.argv[5] == "floor":
    y, dx = x @ W.T, dy @ W
else:
    _, cache = ml.lora_forward(x, W, A, B, scaling=2.0, backend=sys.argv[5])
    ml.lora_backward(dy, cache)
print(status("VmHWM:") - before)
"""


def peak_rss_extra(N, d_in, d_out, r, backend="numba", warm=True):
    """Bytes the peak resident set (VmHWM) of a fresh process rises during one LoRA forward and
    backward (fp32) above its level just before (Linux: read from /proc/self/status).

    ``backend`` "floor" runs the floor's two products instead. With ``warm`` the process first
    runs the floor's products once (and frees them), so that OpenBLAS's packing buffers, which
    its first large product touches (about 0.13x the outputs' bytes here, floor included), are
    not counted as the step's."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(N), str(d_in), str(d_out),
                          str(r), backend, "warm" if warm else "cold"],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def startup_seconds(runs=3):
    """A fresh process: import minilora and run one small forward + backward (JIT cache warm)."""
    code = ("import numpy as np, minilora as ml; x = np.ones((10, 128), np.float32); "
            "W = np.ones((64, 128), np.float32); A = np.ones((4, 128), np.float32); "
            "B = np.ones((64, 4), np.float32); y, c = ml.lora_forward(x, W, A, B, scaling=1.0); "
            "ml.lora_backward(np.ones_like(y), c)")
    subprocess.run([sys.executable, "-c", code], check=True)  # warms the on-disk JIT cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(quick=False, with_torch=True, json_path=None, out=print):
    """Measure and print every figure; return them as a dict (also written to ``json_path``)."""
    repeats, inner = (3, 3) if quick else (7, 5)
    results = {"cases": {}, "blas": _blas_info()}
    header = f"{'case':<36} {'numba/floor':>11} {'numpy/floor':>11} {'numba/numpy':>11} " \
             f"{'torch/floor':>11} {'numba/torch':>11} {'floor ms':>9} {'route':>8}"
    out(header)
    for name, N, d_in, d_out, r, dtype, dropout, op in CASES:
        if quick and name not in QUICK:
            continue
        big = N * d_in * d_out > 1e9
        p = _problem(N, d_in, d_out, r, dtype, dropout)
        res = time_case(_contenders(p, op, with_torch), repeats,
                        inner if big else 20 * inner)
        res["route"] = lora_numba._route(N, d_in, d_out, p["mask"])  # the numba backend's
        results["cases"][name] = res

        cells = " ".join(f"{res[k]:>11.3f}" if k in res else f"{'-':>11}" for k in (
            "numba/floor", "numpy/floor", "numba/numpy", "torch+peft/floor", "numba/torch+peft"))
        out(f"{name:<36} {cells} {res['floor_ms']:>9.3f} {res['route']:>8}")
    if not quick:
        mem = results["memory"] = memory_figures()
        out(f"extra peak memory, LoRA fwd+bwd N=4096 2048->2048 r=16 fp32: "
            f"{mem['lora_peak_rss_warm_over_outputs']:.3f}x the bytes of y, dx, dA, dB "
            f"(peak resident set of a fresh process, BLAS warmed; cold "
            f"{mem['lora_peak_rss_cold_over_outputs']:.3f}x, the floor's products alone cold "
            f"{mem['floor_peak_rss_cold_over_outputs']:.3f}x; NumPy's allocations "
            f"{mem['lora_peak_over_outputs']:.3f}x)")
        out(f"extra peak memory, DoRA fwd+bwd d=4096 N=64 r=16 fp32: "
            f"{mem['dora_peak_over_W']:.3f}x the bytes of W")
        results["startup_s"] = startup_seconds()
        out(f"fresh process, import + first small fwd+bwd (JIT cache warm): "
            f"{results['startup_s']:.2f} s")
    if json_path:
        write_atomic(json_path, json.dumps(results, indent=2).encode())
    return results


# ``minilora bench --blocks``: the fused blocks against their floors and torch + PEFT.
BLOCK_CASES = {"mlp": dict(N=2048, d=1024, hidden=2816, r=16),
               "qkv": dict(N=2048, d=1024, r=16),
               "multi": dict(N=4096, d=1024, r=16, adapters=8)}  # issue 20's row
FLOOR_NOTES = {"multi": " (floor: one adapter)"}  # where the floor is not the block's products
QUICK_BLOCK_CASES = {"mlp": dict(N=64, d=64, hidden=176, r=4), "qkv": dict(N=64, d=64, r=4),
                     "multi": dict(N=64, d=64, r=4, adapters=8)}
# each fused block's projections (d_out, d_in); multi has one layer and K adapters instead
BLOCK_PROJECTIONS = {"mlp": lambda d, hidden: [(hidden, d), (hidden, d), (d, hidden)],
                     "qkv": lambda d, hidden: [(d, d), (d, d), (d, d)]}


def _block_contenders(block, N, d, r, hidden=None, adapters=8, with_torch=True, seed=0):
    """name -> a zero-argument forward + backward (dx, dA, dB) of a block, fp32; "floor" its
    large products alone (MLP: gate, up, down forward and their three dx products; QKV: the
    three projections and their dx products; multi: the single-adapter op on the same tokens,
    the baseline its target is stated against)."""
    from minilora.oracle.kinds import KINDS

    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    kind = KINDS[block]
    x = arr(N, d)
    if block not in BLOCK_PROJECTIONS:  # multi: K adapters on one layer
        return _multi_contenders(kind, rng, arr, x, N, d, r, adapters)
    shapes = BLOCK_PROJECTIONS[block](d, hidden)  # (d_out_j, d_in_j)
    W = [arr(*s, scale=s[1] ** -0.5) for s in shapes]
    A = [arr(r, s[1], scale=s[1] ** -0.5) for s in shapes]
    B = [arr(s[0], r, scale=0.1) for s in shapes]
    dy = arr(N, d)
    dys = [arr(N, s[0]) for s in shapes]  # (N, d_out_j): each projection's upstream
    inner = {"x": x, "z": arr(N, hidden) if "z" in kind.inputs else None}
    inputs = [inner[name] for name in kind.inputs]  # x, or the MLP's z = act(gate x) ⊙ up x
    cotangent = dys if kind.dy_each else dy  # what the block's backward takes

    def floor():
        for j in range(3):
            inputs[j] @ W[j].T  # (N, d_out_j)
            dys[j] @ W[j]  # (N, d_in_j)

    def step(backend):
        def run():
            _, cache = kind.forward(x, W, A, B, scaling=2.0, backend=backend)
            kind.backward(cotangent, cache)
        return run

    out = {"floor": floor, "numba": step("numba"), "numpy": step("numpy")}
    if with_torch:
        torch_step = _torch_peft_block_step(kind, x, W, A, B, cotangent)
        if torch_step is not None:
            out["torch+peft"] = torch_step
    return out


def _multi_contenders(kind, rng, arr, x, N, d, r, adapters):
    """Multi-LoRA's contenders: "floor" the single-adapter op on the same tokens."""
    W, dy = arr(d, d, scale=d**-0.5), arr(N, d)
    A = [arr(r, d, scale=d**-0.5) for _ in range(adapters)]
    B = [arr(d, r, scale=0.1) for _ in range(adapters)]
    index = rng.integers(0, adapters, N)

    def single():
        _, cache = ml.lora_forward(x, W, A[0], B[0], scaling=2.0)
        ml.lora_backward(dy, cache)

    def multi(backend):
        def step():
            _, cache = kind.forward(x, W, A, B, index, scaling=2.0, backend=backend)
            kind.backward(dy, cache)
        return step

    return {"floor": single, "numba": multi("numba"), "numpy": multi("numpy")}


def _torch_peft_block_step(kind, x, W, A, B, dy):
    """PEFT's LoRA on a LLaMA-style MLP or on three attention projections (None without
    torch and peft)."""
    try:
        import peft
        import torch
    except ImportError:
        return None
    names = kind.peft_modules

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, w in zip(names, W, strict=True):
                setattr(self, name, torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
            self.act = torch.nn.SiLU()

        def forward(self, x):
            return kind.compose([getattr(self, name) for name in names], x, self.act)

    config = peft.LoraConfig(r=A[0].shape[0], lora_alpha=2 * A[0].shape[0],
                             target_modules=list(names), lora_dropout=0.0)
    model = peft.get_peft_model(Block(), config)
    with torch.no_grad():
        for name, w, a, b in zip(names, W, A, B, strict=True):
            layer = model.base_model.model.get_submodule(name)
            layer.base_layer.weight.copy_(torch.from_numpy(w))
            layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = [torch.from_numpy(d) for d in (dy if isinstance(dy, list) else [dy])]

    def step():
        xt.grad = None
        model.zero_grad(set_to_none=True)
        out = model(xt)
        torch.autograd.backward(list(out) if isinstance(out, tuple) else [out], dyt)

    return step


def blocks_run(quick=False, with_torch=True, json_path=None, out=print):
    """The blocks' ratios (see ``_block_contenders``); returns them as a dict."""
    repeats, inner = (3, 3) if quick else (7, 3)
    results = {}
    out(f"{'block (fp32)':<44} {'numba/floor':>11} {'numpy/floor':>11} {'numba/numpy':>11} "
        f"{'torch/floor':>11} {'numba/torch':>11} {'floor ms':>9}")
    for block, kw in (QUICK_BLOCK_CASES if quick else BLOCK_CASES).items():
        res = time_case(_block_contenders(block, with_torch=with_torch, **kw), repeats, inner)
        name = f"{block} " + " ".join(f"{k}={v}" for k, v in kw.items()) \
            + FLOOR_NOTES.get(block, "")
        results[name] = res
        cells = " ".join(f"{res[k]:>11.3f}" if k in res else f"{'-':>11}" for k in (
            "numba/floor", "numpy/floor", "numba/numpy", "torch+peft/floor", "numba/torch+peft"))
        out(f"{name:<44} {cells} {res['floor_ms']:>9.3f}")
    if json_path:
        write_atomic(json_path, json.dumps(results, indent=2).encode())
    return results


# ``minilora bench --sweep``: one size varied around N=4096, 1024->1024, r=16, fp32.
SWEEPS = {"r": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
          "N": [16, 64, 256, 1024, 4096, 16384],
          "d": [128, 256, 512, 1024, 2048]}
QUICK_SWEEPS = {"r": [1, 8], "N": [16, 64], "d": [32, 64]}
SWEEP_BASE = dict(N=4096, d=1024, r=16)
QUICK_BASE = dict(N=64, d=64, r=4)  # --quick: the plumbing in seconds, not a measurement


def ideal_ratio(N, d_in, d_out, r):
    """The floor plus the low-rank products at the floor's rate, over the floor.

    The floor is 2·N·d_in·d_out multiply-adds (x Wᵀ, dy W); the low-rank products are
    x Aᵀ, h Bᵀ forward and dy B, dyᵀ h, gᵀ x, g A backward: N·r·(3·d_in + 3·d_out)."""
    return 1 + 3 * r * (d_in + d_out) / (2 * d_in * d_out)


def sweep(name, quick=False, with_torch=True, json_path=None, out=print):
    """Ratios against the floor and the ideal as one size varies; returns the rows (also written
    to ``json_path``)."""
    values = (QUICK_SWEEPS if quick else SWEEPS)[name]
    base = QUICK_BASE if quick else SWEEP_BASE
    repeats, inner = (3, 3) if quick else (7, 5)
    out(f"{name:>6} {'numba/floor':>11} {'numba/ideal':>11} {'numpy/floor':>11} "
        f"{'torch/floor':>11} {'ideal':>7} {'route':>8} {'floor ms':>9}")
    rows = []
    for value in values:
        size = dict(base, **{name: value})
        N, d, r = size["N"], size["d"], size["r"]
        p = _problem(N, d, d, r, np.float32, False)
        res = time_case(_contenders(p, "lora", with_torch), repeats,
                        inner if N * d * d > 1e9 else 20 * inner)
        res.update({"N": N, "d": d, "r": r, "ideal": ideal_ratio(N, d, d, r),
                    "route": lora_numba._route(N, d, d, None)})
        res["numba/ideal"] = res["numba/floor"] / res["ideal"]
        rows.append(res)
        torch_cell = f"{res['torch+peft/floor']:>11.3f}" if "torch+peft/floor" in res \
            else f"{'-':>11}"
        out(f"{value:>6} {res['numba/floor']:>11.3f} {res['numba/ideal']:>11.3f} "
            f"{res['numpy/floor']:>11.3f} {torch_cell} {res['ideal']:>7.3f} "
            f"{res['route']:>8} {res['floor_ms']:>9.3f}")
    if json_path:
        write_atomic(json_path, json.dumps({"sweep": name, "rows": rows}, indent=2).encode())
    return rows


def plot_sweep(name, rows, path):
    """The sweep's ratios against the floor, with the ideal, on a log axis (needs matplotlib);
    each row carries the sizes it was measured at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [row[name] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("numba/floor", "minilora (numba)"), ("numpy/floor", "minilora (numpy)"),
                       ("torch+peft/floor", "torch + PEFT"), ("ideal", "ideal")):
        if all(key in row for row in rows):
            ax.plot(x, [row[key] for row in rows], marker="o", label=label,
                    ls="--" if key == "ideal" else "-")
    ax.set_xscale("log", base=2)
    others = ", ".join(f"{k}={rows[0][k]}" for k in ("N", "d", "r") if k != name)
    ax.set(xlabel=name, ylabel="time / two-GEMM floor",
           title=f"LoRA fwd+bwd, fp32, {others}: cost as {name} grows")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _blas_info():
    """What NumPy's BLAS reports about itself (library, threads), for the record."""
    try:
        config = np.show_config(mode="dicts")
        return config.get("Build Dependencies", {}).get("blas", {})
    except (TypeError, AttributeError):  # NumPy < 1.26 prints only
        return {}
