"""Detection power of the oracle (docs/oracle.md): honest candidates must pass, and how small a
planted scale error or single-element corruption still fails.

Honest candidates: minilora's numba backend run at the candidate's precision (inputs rounded,
arithmetic in the accumulation format, outputs rounded: a different summation order from the
oracle's baseline), and PyTorch autograd at that dtype when torch is installed.
Usage: python benchmarks/oracle_power.py [--seeds N | --quick] [--json PATH]
"""

import argparse
import json

import numpy as np

from minilora import oracle
from minilora.oracle.cases import emulate

DTYPES = ["bf16", "fp16", "fp32", "fp64"]
EPSILONS = [m * 10.0**-k for k in range(1, 16) for m in (5, 2, 1)]  # planted sizes, large first


def minilora_candidate(case, dtype):
    """minilora's numba backend at ``dtype`` (a summation order other than the baseline's)."""
    return emulate(case, dtype, backend="numba")


def torch_candidate(case, dtype):
    try:
        import torch
    except ImportError:
        return None
    if dtype == "tf32":
        return None
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
           "fp64": torch.float64}[dtype]
    t = {k: torch.from_numpy(v.astype(np.float64)).to(tdt) for k, v in case.tensors.items()}
    for k in ("x", "W", "A", "B", "m", "bias"):
        if k in t:
            t[k].requires_grad_(True)
    x = t["x"]
    x_d = x * t["dropout_mask"] if "dropout_mask" in t else x
    W = t["W"].T if case.fan_in_fan_out else t["W"]
    lora = (x_d @ t["A"].T) @ t["B"].T
    if case.dora:
        n = torch.linalg.norm(W + case.scaling * t["B"] @ t["A"], dim=1)
        c = t["m"] / (n.detach() if case.detach_norm else n)
        y = x @ W.T + (c - 1) * (x_d @ W.T) + c * case.scaling * lora
    else:
        y = x @ W.T + case.scaling * lora
    if "bias" in t:
        y = y + t["bias"]
    y.backward(t["dy"])
    out = {"y": y, "dx": x.grad, "dA": t["A"].grad, "dB": t["B"].grad, "dW": t["W"].grad}
    if case.dora:
        out["dm"] = t["m"].grad
    if "bias" in t:
        out["dbias"] = t["bias"].grad
    return {k: v.detach().double().numpy() for k, v in out.items()}


def cases(seeds):
    for seed in range(seeds):
        for dora in (False, True):
            yield seed, dora, dict(d_in=48, d_out=40, r=8, batch=6, seq=5, dora=dora,
                                   dropout=0.1 if seed % 2 else 0.0, bias=seed % 3 == 0,
                                   fan_in_fan_out=seed % 4 == 1, detach_norm=seed % 2 == 0,
                                   seed=seed)


def smallest_caught(case, honest, dtype, plant):
    """The smallest ε in EPSILONS for which ``plant(outputs, ε)`` fails the oracle."""
    caught = None
    for eps in EPSILONS:
        if oracle.compare(case, plant(honest, eps), dtype=dtype).passed:
            break
        caught = eps
    return caught


def scale_dA(outputs, eps):
    return {**outputs, "dA": outputs["dA"] * (1 + eps)}


def corrupt_one(outputs, eps):
    dx = outputs["dx"].copy()
    dx.flat[dx.size // 2] += eps * np.max(np.abs(dx))
    return {**outputs, "dx": dx}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="two seeds: the plumbing, fast")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.seeds = 2
    rows = {}
    for dtype in DTYPES:
        honest = {"minilora": [0, 0], "torch": [0, 0]}
        scale, single = [], []
        for _, _, kw in cases(args.seeds):
            case = oracle.make_case(dtype=dtype, **kw)
            for name, make in (("minilora", minilora_candidate), ("torch", torch_candidate)):
                cand = make(case, dtype)
                if cand is None:
                    continue
                honest[name][1] += 1
                honest[name][0] += oracle.compare(case, cand, dtype=dtype).passed
            base = minilora_candidate(case, dtype)
            scale.append(smallest_caught(case, base, dtype, scale_dA))
            single.append(smallest_caught(case, base, dtype, corrupt_one))
        rows[dtype] = {
            "honest_minilora_passed": f"{honest['minilora'][0]}/{honest['minilora'][1]}",
            "honest_torch_passed": f"{honest['torch'][0]}/{honest['torch'][1]}",
            "scale_error_caught_always_from": max(e if e else np.inf for e in scale),
            "single_element_caught_always_from": max(e if e else np.inf for e in single),
        }
    print(f"{'dtype':<6}{'honest minilora':>14}{'honest torch':>14}{'dA scaled by 1+ε':>20}"
          f"{'one dx entry +ε·max|dx|':>26}")
    for dtype, row in rows.items():
        print(f"{dtype:<6}{row['honest_minilora_passed']:>14}{row['honest_torch_passed']:>14}"
              f"{'ε ≥ ' + format(row['scale_error_caught_always_from'], '.0e'):>20}"
              f"{'ε ≥ ' + format(row['single_element_caught_always_from'], '.0e'):>26}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
