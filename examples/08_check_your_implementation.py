"""Chapter 8: checking your own LoRA implementation with minilora's oracle.

Two candidates: a LoRA layer written with torch autograd, run in bfloat16 and in float32 (when
PyTorch is installed), and, always, a numpy implementation with a deliberate bug. The oracle
computes the float64 reference from the case's inputs and judges every output with tolerances
derived from the candidate's precision (docs/oracle.md).
"""

import minilora as ml

case = ml.oracle.make_case(d_in=64, d_out=48, r=8, batch=4, seq=8, bias=True, dropout=0.1,
                           dtype="bf16", seed=0)


def torch_candidate(case, dtype):
    import torch

    t = {k: torch.from_numpy(v).to(dtype) for k, v in case.tensors.items()}
    for k in ("x", "A", "B"):
        t[k].requires_grad_(True)
    h = (t["x"] * t["dropout_mask"]) @ t["A"].T
    y = t["x"] @ t["W"].T + t["bias"] + case.scaling * (h @ t["B"].T)
    y.backward(t["dy"])
    return {"y": y, "dx": t["x"].grad, "dA": t["A"].grad, "dB": t["B"].grad}


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
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        outputs = {k: v.detach().double().numpy() for k, v in torch_candidate(case, dtype).items()}
        report = ml.oracle.compare(case, outputs, dtype=name)
        print(f"torch LoRA in {name}:\n{report}\n")
        assert report.passed
    outputs = {k: v.detach().double().numpy()
               for k, v in torch_candidate(case, torch.bfloat16).items()}
    report = ml.oracle.compare(case, outputs, dtype="fp32")
    print("the bf16 result judged as if it claimed fp32 precision fails:",
          "FAILED" if not report.passed else "passed")
    assert not report.passed
report = ml.oracle.compare(case, buggy_numpy_candidate(case), dtype="fp32")
print(f"a numpy candidate that forgets the mask in dx:\n{report}")
assert not report.passed and [t.name for t in report.tensors if not t.passed] == ["dx"]
