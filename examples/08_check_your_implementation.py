"""Chapter 8: checking your own LoRA implementation with minilora's oracle.

Two candidates: a LoRA layer written with torch autograd, run in bfloat16 and in float32 (when
PyTorch is installed), and, always, a numpy implementation with a deliberate bug. The oracle
computes the float64 reference from the case's inputs and judges every output with tolerances
derived from the candidate's precision (docs/oracle.md).
"""

import minilora as ml

case = ml.oracle.make_case(d_in=64, d_out=48, r=8, batch=4, seq=8, bias=True, dropout=0.1,
                           dtype="bf16", seed=0)


def torch_lora(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None):
    """Someone's LoRA layer in PyTorch: the oracle needs only this forward (autograd, or an
    autograd.Function with a hand-written backward, does the rest)."""
    h = (x * dropout_mask) @ A.T
    return x @ W.T + bias + scaling * (h @ B.T)


def buggy_numpy_candidate(case):
    t = case.tensors
    x, W, A, B, mask, dy = (t[k] for k in ("x", "W", "A", "B", "dropout_mask", "dy"))
    x2, m2, dy2 = (a.reshape(-1, a.shape[-1]) for a in (x, mask, dy))  # fold batch and sequence
    h = (x2 * m2) @ A.T
    g = dy2 @ B
    dx = dy2 @ W + case.scaling * (g @ A)  # BUG: the dropout mask is missing here
    return {"y": (x2 @ W.T + t["bias"] + case.scaling * h @ B.T).reshape(dy.shape),
            "dx": dx.reshape(x.shape), "dA": case.scaling * g.T @ (x2 * m2),
            "dB": case.scaling * dy2.T @ h}


try:
    import torch
except ImportError:
    torch = None

if torch is not None:
    from minilora.testing.torch import assert_torch_matches, torch_outputs

    for name in ("bf16", "fp32"):  # in-process: the harness runs it at that dtype
        report = assert_torch_matches(torch_lora, case, dtype=name)
        print(f"torch LoRA in {name}:\n{report}\n")
    report = ml.oracle.compare(case, torch_outputs(torch_lora, case, "bf16"), dtype="fp32")
    print("the bf16 result judged as if it claimed fp32 precision fails:",
          "FAILED" if not report.passed else "passed")
    assert not report.passed
report = ml.oracle.compare(case, buggy_numpy_candidate(case), dtype="fp32")
print(f"a numpy candidate that forgets the mask in dx:\n{report}")
assert not report.passed and [t.name for t in report.tensors if not t.passed] == ["dx"]
