"""Detection power of the oracle on the NF4 case family (``minilora.oracle.nf4``), the approach
of benchmarks/oracle_power.py: honest candidates must pass, and the table gives the smallest
planted error ε (on a 1-2-5 grid) caught in every seed.

The judge takes the case as ``make_nf4_case`` makes it (the reference on the exact float64
dequantization); the honest candidates compute from ``honest_case`` (W as a kernel holds it:
fl32(c·absmax) rounded to the precision): minilora's numba backend, PyTorch autograd, and the
reference's operations summed in another order. Planted: each required output scaled by 1 + ε,
one dx entry moved by ε·max|dx|, and W's dequantization scaled by 1 + ε before the candidate
computes (a kernel whose table or absmax is off; the worst output over seeds decides).

Usage: python benchmarks/nf4_power.py [--seeds N] [--dtypes bf16,fp32] [--json PATH]
"""

import argparse
import json
import time

import numpy as np
from honest import ORDERS, emulated_candidate, numba_candidate, torch_candidate
from oracle_power import EPSILONS, one_entry_moved, scaled, smallest_caught

from minilora import oracle
from minilora.oracle import nf4
from minilora.oracle.precision import precision

SHAPE = dict(d_in=256, d_out=128, r=8, batch=4, seq=16)


def options(seed):
    return dict(dora=seed % 2 == 1, dropout=0.1 if seed % 4 < 2 else 0.0, bias=seed % 3 == 0,
                fan_in_fan_out=seed % 4 == 1, detach_norm=seed % 8 != 3, seed=seed,
                double_quant=seed % 2 == 0, blocksize=(64, 64, 128, 32)[seed % 4])


def honest_candidates(honest, dtype, seed):
    rng = np.random.default_rng(seed)
    yield "numba", numba_candidate(honest, dtype)
    yield "torch", torch_candidate(honest, dtype)
    order, stored = ORDERS[rng.integers(len(ORDERS))], bool(rng.integers(2))
    yield "emulated", emulated_candidate(honest, dtype, order, stored)


def smallest_weight_error_caught(judge, honest, dtype):
    """The smallest ε for which a candidate computing from (1 + ε)·W fails the oracle."""
    caught = None
    for eps in EPSILONS:
        off = honest.with_tensors({**honest.tensors, "W": honest.tensors["W"] * (1 + eps)})
        if judge.compare(numba_candidate(off, dtype)).passed:
            break
        caught = eps
    return caught


def power_rows(seeds, dtypes):
    rows = {}
    for dtype in dtypes:
        passed, scale, single, weight, double_rounded = {}, {}, [], [], 0
        for seed in range(seeds):
            c = nf4.make_nf4_case(dtype=dtype, **SHAPE, **options(seed))
            honest = nf4.honest_case(c, dtype)
            judge = oracle.Judge(c.case, dtype)
            W = c.case.tensors["W"]
            direct = precision(dtype).round(W).astype(np.float64)
            double_rounded += int(np.sum(direct != honest.tensors["W"]))
            for name, cand in honest_candidates(honest, dtype, seed):
                if cand is not None:
                    tally = passed.setdefault(name, [0, 0])
                    tally[0] += judge.compare(cand).passed
                    tally[1] += 1
            base = numba_candidate(honest, dtype)
            for name in oracle.required_outputs(c.case):
                scale.setdefault(name, []).append(smallest_caught(judge, name, base, scaled))
            single.append(smallest_caught(judge, "dx", base, one_entry_moved))
            weight.append(smallest_weight_error_caught(judge, honest, dtype))
        worst = {k: max(e if e else np.inf for e in v) for k, v in scale.items()}
        rows[dtype] = {"honest_passed": {k: f"{p}/{n}" for k, (p, n) in passed.items()},
                       "scale_error_caught_always_from": max(worst.values()),
                       "scale_error_by_output": worst,
                       "single_element_caught_always_from":
                           max(e if e else np.inf for e in single),
                       "weight_scale_caught_always_from":
                           max(e if e else np.inf for e in weight),
                       "W_entries_where_p(W)_differs_from_p(fl32(W))": double_rounded}
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,fp64")
    parser.add_argument("--json")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = power_rows(args.seeds, args.dtypes.split(","))
    print(f"NF4 cases ({SHAPE}; blocksize, double quantization and layer options by seed)")
    print(f"{'dtype':<6}{'honest passed':>36}{'scale error (worst)':>26}{'one dx entry':>14}"
          f"{'W scaled':>11}")
    for dtype, row in rows.items():
        honest = ", ".join(f"{k} {v}" for k, v in row["honest_passed"].items())
        by = row["scale_error_by_output"]
        print(f"{dtype:<6}{honest:>36}"
              f"{'ε ≥ ' + format(row['scale_error_caught_always_from'], '.0e'):>18}"
              f"{' (' + max(by, key=by.get) + ')':>8}"
              f"{'ε ≥ ' + format(row['single_element_caught_always_from'], '.0e'):>14}"
              f"{'ε ≥ ' + format(row['weight_scale_caught_always_from'], '.0e'):>11}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=float)


if __name__ == "__main__":
    main()
