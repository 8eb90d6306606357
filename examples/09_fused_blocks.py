"""Chapter 9: a transformer's LoRA'd MLP and attention projections as fused blocks.

LLaMA's MLP is y = down(silu(gate(x)) ⊙ up(x)); attention starts with q, k, v = three
projections of one x. With LoRA on every projection, ``ml.lora_mlp_forward`` and
``ml.lora_qkv_forward`` compute each block as one op (docs/math.md §7). This chapter checks
their gradients against finite differences, shows what the MLP keeps between the passes, and
judges a bf16 run of the block with the oracle.
"""

import tracemalloc

import numpy as np

import minilora as ml
from minilora import oracle
from minilora.oracle.cases import emulate

rng = np.random.default_rng(0)
d, hidden, r = 8, 20, 2
shapes = [(hidden, d), (hidden, d), (d, hidden)]  # gate, up, down
W = [rng.standard_normal(s) / np.sqrt(s[1]) for s in shapes]
A = [rng.standard_normal((r, s[1])) / np.sqrt(s[1]) for s in shapes]
B = [rng.standard_normal((s[0], r)) for s in shapes]
x = rng.standard_normal((2, 5, d))  # (batch, seq, d)

# 1. Every gradient of the MLP block, for each activation, against finite differences.
for activation in ("silu", "gelu", "gelu_tanh"):
    def forward(x, A0, B0, A1, B1, A2, B2, activation=activation):
        return ml.lora_mlp_forward(x, W, [A0, A1, A2], [B0, B1, B2], scaling=[2.0, 2.0, 0.5],
                                   activation=activation)

    def backward(dy, cache):
        g = ml.lora_mlp_backward(dy, cache)
        return {"x": g.dx, **{f"{n}{j}": getattr(g, f"d{n}")[j] for j in range(3) for n in "AB"}}

    inputs = dict(x=x, A0=A[0], B0=B[0], A1=A[1], B1=B[1], A2=A[2], B2=B[2])
    report = ml.gradcheck(forward, backward, inputs)
    print(f"MLP ({activation}): dx, dA and dB of gate, up and down match finite differences, "
          f"worst relative error {report.worst_rel_err:.1e}")

# 2. The attention projections (q to d, k and v to d/2 as in grouped-query attention).
Wq = [rng.standard_normal((o, d)) / np.sqrt(d) for o in (d, d // 2, d // 2)]
Aq = [rng.standard_normal((r, d)) for _ in range(3)]
Bq = [rng.standard_normal((o, r)) for o in (d, d // 2, d // 2)]


def qkv_forward(x, A0, A1, A2):
    ys, cache = ml.lora_qkv_forward(x, Wq, [A0, A1, A2], Bq, scaling=2.0)
    return np.concatenate(ys, axis=-1), cache


def qkv_backward(dy, cache):
    g = ml.lora_qkv_backward(np.split(dy, [d, d + d // 2], axis=-1), cache)
    return {"x": g.dx, "A0": g.dA[0], "A1": g.dA[1], "A2": g.dA[2]}


report = ml.gradcheck(qkv_forward, qkv_backward, dict(x=x, A0=Aq[0], A1=Aq[1], A2=Aq[2]))
print(f"QKV: dx (the sum over q, k, v) and each dA match, worst relative error "
      f"{report.worst_rel_err:.1e}")

# 3. What the MLP keeps between the passes: e and u (N × hidden each), not z = act(e) ⊙ u,
#    which the backward recomputes in the same pass that forms de and du.
N, d, hidden, r = 512, 256, 704, 8
shapes = [(hidden, d), (hidden, d), (d, hidden)]
W = [(rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for s in shapes]
A = [(rng.standard_normal((r, s[1])) / np.sqrt(s[1])).astype(np.float32) for s in shapes]
B = [(0.1 * rng.standard_normal((s[0], r))).astype(np.float32) for s in shapes]
x = rng.standard_normal((N, d)).astype(np.float32)
y, cache = ml.lora_mlp_forward(x, W, A, B, scaling=2.0)
kept = cache.e.nbytes + cache.u.nbytes
print(f"between the passes the block keeps e and u: {kept / 2**20:.1f} MiB; a framework that "
      f"saves every op's output keeps e, u, act(e) and z: {2 * kept / 2**20:.1f} MiB")
tracemalloc.start()
ml.lora_mlp_backward(np.ones_like(y), cache)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(f"the backward's peak: {peak / 2**20:.1f} MiB, of which its outputs dx, dA, dB are "
      f"{(x.nbytes + sum(a.nbytes + b.nbytes for a, b in zip(A, B, strict=True))) / 2**20:.1f}")

# 4. The oracle on a bf16 run of the block: an honest one passes, one with the wrong
#    activation derivative in its backward fails.
case = oracle.make_case(block="mlp", activation="gelu", d_in=64, d_out=64, r=8, batch=2,
                        seq=16, dtype="bf16", seed=0)
honest = emulate(case, "bf16")
assert oracle.compare(case, honest).passed
wrong = oracle.reference(oracle.Case(case.tensors, case.scaling, block="mlp",
                                     activation="silu", input_precision="bf16"))
report = oracle.compare(case, {**honest, "dx": wrong["dx"]})
print("an honest bf16 GELU MLP passes the oracle; with SiLU's derivative in its backward, dx "
      "fails:", "FAILED" if not report.passed else "passed")
assert not report.passed
