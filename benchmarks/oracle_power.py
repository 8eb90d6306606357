"""Detection power of the oracle (docs/oracle.md): honest candidates must pass, and how small a
planted error still fails, at a small shape and at a realistic one.

Per precision and shape, over seeds (LoRA and DoRA, with and without dropout, bias, the Conv1D
layout and the detached norm): honest candidates (``honest.py``: minilora's numba backend,
PyTorch autograd when torch is installed, the reference's operations summed in another order)
must all pass; each required output scaled by 1 + ε, and one dx entry moved by ε·max|dx|, are
planted for ε on a 1-2-5 grid, and the table gives the smallest ε caught in every seed (the
worst output for the scale error). Then the two bugs of issue 10: dx's mask applied as an
indicator at p = 0.02 (bf16), and dB summed in bf16, for several token counts.

Usage: python benchmarks/oracle_power.py [--seeds N | --quick] [--json PATH]
"""

import argparse
import json
import time

import numpy as np
from honest import (
    ORDERS,
    bf16_summed_dB,
    emulated_candidate,
    indicator_mask_dx,
    numba_candidate,
    torch_candidate,
)

from minilora import oracle

DTYPES = ["bf16", "fp16", "fp32", "fp64"]
EPSILONS = [m * 10.0**-k for k in range(1, 16) for m in (5, 2, 1)]  # planted sizes, large first
SHAPES = {"small": dict(d_in=48, d_out=40, r=8, batch=6, seq=5),
          "realistic": dict(d_in=512, d_out=384, r=16, batch=2, seq=1024)}


def options(seed):
    return dict(dora=seed % 2 == 1, dropout=0.1 if seed % 4 < 2 else 0.0, bias=seed % 3 == 0,
                fan_in_fan_out=seed % 4 == 1, detach_norm=seed % 8 != 3, seed=seed)


def smallest_caught(judge, name, honest, plant):
    """The smallest ε in EPSILONS for which ``plant(honest[name], ε)`` fails the oracle."""
    caught = None
    for eps in EPSILONS:
        if judge.verdict(name, plant(honest[name], eps)).passed:
            break
        caught = eps
    return caught


def scaled(a, eps):
    return a * (1 + eps)


def one_entry_moved(a, eps):
    a = a.copy()
    a.flat[a.size // 2] += eps * np.max(np.abs(a))
    return a


def honest_candidates(case, dtype, seed):
    rng = np.random.default_rng(seed)
    yield "numba", numba_candidate(case, dtype)
    yield "torch", torch_candidate(case, dtype)
    order, stored = ORDERS[rng.integers(len(ORDERS))], bool(rng.integers(2))
    yield "emulated", emulated_candidate(case, dtype, order, stored)


def judge_honest(judge, case, dtype, seed, counts):
    """Judge each honest candidate; ``counts[name]`` becomes [passed, judged]."""
    for name, cand in honest_candidates(case, dtype, seed):
        if cand is not None:
            tally = counts.setdefault(name, [0, 0])
            tally[0] += judge.compare(cand).passed
            tally[1] += 1


def power_rows(shape, seeds):
    rows = {}
    for dtype in DTYPES:
        honest = {}
        scale, single = {}, []
        for seed in range(seeds):
            case = oracle.make_case(dtype=dtype, **SHAPES[shape], **options(seed))
            judge = oracle.Judge(case, dtype)
            judge_honest(judge, case, dtype, seed, honest)
            base = numba_candidate(case, dtype)
            for name in oracle.required_outputs(case):
                scale.setdefault(name, []).append(smallest_caught(judge, name, base, scaled))
            single.append(smallest_caught(judge, "dx", base, one_entry_moved))
        worst = {name: max(e if e else np.inf for e in eps) for name, eps in scale.items()}
        rows[dtype] = {"honest_passed": {k: f"{p}/{n}" for k, (p, n) in honest.items()},
                       "scale_error_caught_always_from": max(worst.values()),
                       "scale_error_by_output": worst,
                       "single_element_caught_always_from":
                           max(e if e else np.inf for e in single)}
    return rows


BLOCK_SHAPE = dict(d_in=64, d_out=64, hidden=128, r=8, batch=4, seq=32)


def block_rows(seeds):
    """Per block: honest candidates pass, and the smallest scale error caught in every output
    (the worst output), at each precision."""
    rows = {}
    for block in ("qkv", "mlp", "multi"):
        for dtype in DTYPES:
            honest, worst = {}, {}
            for seed in range(seeds):
                case = oracle.make_case(block=block, dtype=dtype, seed=seed, **BLOCK_SHAPE,
                                        activation=("silu", "gelu", "gelu_tanh")[seed % 3],
                                        bias=seed % 2 == 1, dropout=0.1 if seed % 4 < 2 else 0.0)
                judge = oracle.Judge(case, dtype)
                judge_honest(judge, case, dtype, seed, honest)
                base = numba_candidate(case, dtype)
                for name in oracle.required_outputs(case):
                    eps = smallest_caught(judge, name, base, scaled)
                    worst[name] = max(worst.get(name, 0.0), eps if eps else np.inf)
            rows[f"{block} {dtype}"] = {
                "honest_passed": {k: f"{p}/{n}" for k, (p, n) in honest.items()},
                "scale_error_caught_always_from": max(worst.values()),
                "worst_output": max(worst, key=worst.get)}
    return rows


def bug_rows(seeds, quick):
    """How often the two named bugs are caught (LoRA cases, judged as bf16)."""
    rows = {}
    for shape in ("small", "realistic"):
        caught = 0
        for seed in range(seeds):
            case = oracle.make_case(dtype="bf16", **SHAPES[shape],
                                    **{**options(seed), "dora": False, "dropout": 0.02})
            caught += not oracle.compare(case, indicator_mask_dx(case, "bf16")).passed
        rows[f"indicator mask, p=0.02, {shape}"] = f"{caught}/{seeds}"
    for N in (12, 48) if quick else (12, 24, 48, 96, 192):
        caught = 0
        for seed in range(seeds):
            case = oracle.make_case(dtype="bf16", d_in=512, d_out=384, r=16, batch=N,
                                    **{**options(seed), "dora": False})
            caught += not oracle.compare(case, bf16_summed_dB(case, "bf16")).passed
        rows[f"dB summed in bf16, N={N}"] = f"{caught}/{seeds}"
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--quick", action="store_true",
                        help="two seeds at the small shape, one at the realistic one")
    parser.add_argument("--json")
    args = parser.parse_args()
    start = time.perf_counter()
    result = {"small": power_rows("small", 2 if args.quick else args.seeds),
              "realistic": power_rows("realistic", 1 if args.quick else args.seeds)}
    result["bugs"] = bug_rows(2 if args.quick else args.seeds, args.quick)
    result["blocks"] = block_rows(1 if args.quick else args.seeds)
    for shape in ("small", "realistic"):
        print(f"{shape} shape ({SHAPES[shape]})")
        print(f"{'dtype':<6}{'honest passed':>40}{'scale error (worst output)':>30}"
              f"{'one dx entry':>14}")
        for dtype, row in result[shape].items():
            honest = ", ".join(f"{k} {v}" for k, v in row["honest_passed"].items())
            by = row["scale_error_by_output"]
            worst = max(by, key=by.get)
            print(f"{dtype:<6}{honest:>40}"
                  f"{'ε ≥ ' + format(row['scale_error_caught_always_from'], '.0e'):>22}"
                  f"{' (' + worst + ')':>8}"
                  f"{'ε ≥ ' + format(row['single_element_caught_always_from'], '.0e'):>14}")
    print(f"blocks ({BLOCK_SHAPE}, activation and options varied by seed)")
    for name, row in result["blocks"].items():
        honest = ", ".join(f"{k} {v}" for k, v in row["honest_passed"].items())
        print(f"  {name:<12}{honest:>40}"
              f"{'ε ≥ ' + format(row['scale_error_caught_always_from'], '.0e'):>14}"
              f"  ({row['worst_output']})")
    print("bugs caught (bf16):")
    for name, value in result["bugs"].items():
        print(f"  {name:<36}{value}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=float)


if __name__ == "__main__":
    main()
