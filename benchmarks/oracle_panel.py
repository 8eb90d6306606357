"""The oracle's honest panel (docs/oracle.md): how often it fails a correct implementation.

For each precision, ``--cases`` random cases (LoRA and DoRA, every option, x of 1 to 3
dimensions, N up to 4096 tokens, d_in and d_out up to 1024, r up to 64; one case in
``--big-every`` at the largest shape) are each judged against several honest candidates
(``honest.py``): minilora's numba backend, PyTorch autograd when torch is installed, and two
emulations of the reference's operations with the products summed in a random order (blas,
reversed, blocked, pairwise, split-K) and the intermediates stored in the precision or not;
fp32 cases also against a TF32 candidate (inputs rounded to TF32), judged as tf32. Every one
must pass. The table gives the judgments, the false verdicts, the rate's 95% upper bound
(Clopper-Pearson), and, per rule, the largest share of its limit an honest candidate used.

A case the oracle refuses as unusable at the precision (a DoRA row of W + s·B A that cancels
below the precision's resolution, common with d_in = 1) is counted and replaced.

Usage: python benchmarks/oracle_panel.py [--cases N] [--quick] [--dtypes bf16,fp16] [--json PATH]
"""

import argparse
import json
import math
import sys
import time

import numpy as np
from honest import ORDERS, emulated_candidate, numba_candidate, torch_candidate

from minilora import oracle

DTYPES = ["bf16", "fp16", "fp32", "fp64"]
RULES = ("tolerance_used", "baseline_used", "normwise_used", "scale_used")
BIG = dict(batch=4, seq=1024, d_in=1024, d_out=1024, r=64)
ELEMENTS = 2_000_000  # a random case's N·(d_in + d_out) + d_in·d_out stays below this


def log_uniform(rng, lo, hi):
    return round(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def random_case(rng, dtype, big):
    if big:
        shape = dict(BIG)
    else:
        while True:
            N, d_in, d_out = (log_uniform(rng, 1, 4096), log_uniform(rng, 1, 1024),
                              log_uniform(rng, 1, 1024))
            if N * (d_in + d_out) + d_in * d_out <= ELEMENTS:
                break
        seq = [None, 1, 2, 4, 8, 16][rng.integers(6)]
        seq = None if seq is None or N % seq else seq
        shape = dict(batch=N // seq if seq else N, seq=seq, d_in=d_in, d_out=d_out,
                     r=log_uniform(rng, 1, 64))
    r = shape["r"]
    alpha = [None, 1.0, 16.0, 0.5 * r, 3.0 * r][rng.integers(5)]
    rslora = bool(rng.integers(2))
    if alpha is not None and abs(alpha / (math.sqrt(r) if rslora else r)) == 1.0:
        alpha = None
    return oracle.make_case(**shape, alpha=alpha, rslora=rslora, dora=bool(rng.integers(2)),
                            dropout=[0.0, 0.0, 0.02, 0.1, 0.5][rng.integers(5)],
                            bias=bool(rng.integers(2)), fan_in_fan_out=bool(rng.integers(2)),
                            detach_norm=bool(rng.integers(2)), dtype=dtype,
                            lora_only=rng.random() < 0.1, seed=int(rng.integers(2**31)))


def candidates(case, dtype, rng):
    yield "numba", dtype, numba_candidate(case, dtype)
    yield "torch", dtype, torch_candidate(case, dtype)
    for _ in range(2):
        order, stored = ORDERS[rng.integers(len(ORDERS))], bool(rng.integers(2))
        yield f"emulated {order}{' stored' if stored else ''}", dtype, \
            emulated_candidate(case, dtype, order, stored)
    if dtype == "fp32":
        yield "tf32 inputs", "tf32", emulated_candidate(case, "tf32", "blas", False)


def upper_95(failures, n):
    """The Clopper-Pearson 95% upper bound on a rate seen ``failures`` times in ``n``."""
    if n == 0:
        return 1.0
    if failures == 0:
        return 1 - 0.05 ** (1 / n)
    lo, hi = failures / n, 1.0  # bisect P(Binomial(n, p) ≤ failures) = 0.05
    for _ in range(60):
        p = (lo + hi) / 2
        cdf = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(failures + 1))
        lo, hi = (p, hi) if cdf > 0.05 else (lo, p)
    return hi


def panel(dtype, cases, big_every, seed):
    rng = np.random.default_rng([seed, DTYPES.index(dtype)])
    judged = failed = unusable = 0
    worst = {rule: 0.0 for rule in RULES}
    failures = []
    i = 0
    while i < cases:
        case = random_case(rng, dtype, big=big_every and i % big_every == big_every - 1)
        try:  # a case the oracle refuses at this precision (a DoRA row that cancels below its
            oracle.Judge(case, dtype)  # resolution) is counted, not judged; the next is drawn
        except oracle.OracleInputError:
            unusable += 1
            continue
        i += 1
        if i % 100 == 0:
            print(f"  {dtype}: {i} cases, {judged} judgments, {failed} false, {unusable} "
                  f"unusable", file=sys.stderr, flush=True)
        judges = {}
        for name, judged_as, cand in candidates(case, dtype, rng):
            if cand is None:
                continue
            if judged_as not in judges:
                try:  # a case usable at fp32 may not be at tf32 (a DoRA row that cancels)
                    judges[judged_as] = oracle.Judge(case, judged_as)
                except oracle.OracleInputError:
                    judges[judged_as] = None
            if judges[judged_as] is None:
                continue
            report = judges[judged_as].compare(cand)
            judged += 1
            for t in report.tensors:
                for rule in RULES:
                    worst[rule] = max(worst[rule], getattr(t, rule))
            if not report.passed:
                print(f"  FALSE VERDICT {dtype} case {i}: {name} {case.layer}\n{report}",
                      file=sys.stderr, flush=True)
                failed += 1
                failures.append({"candidate": name, "case": case.layer,
                                 "shape": list(case.tensors["x"].shape),
                                 "d_out": case.tensors["dy"].shape[-1], "dora": case.dora,
                                 "report": str(report)})
    return {"cases": cases, "unusable_cases_skipped": unusable, "judgments": judged,
            "false_verdicts": failed,
            "rate": failed / judged, "upper_95": upper_95(failed, judged),
            "largest_share_used": worst, "failures": failures}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=2000, help="cases per precision")
    parser.add_argument("--big-every", type=int, default=250)
    parser.add_argument("--quick", action="store_true", help="50 small cases per precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.big_every = 50, 0
    start = time.perf_counter()
    rows = {}
    print(f"{'dtype':<6}{'cases':>7}{'judged':>8}{'false':>7}{'95% bound':>11}  "
          f"largest share of each rule's limit used (derived, baseline, normwise, scale)")
    for dtype in args.dtypes.split(","):
        row = rows[dtype] = panel(dtype, args.cases, args.big_every, args.seed)
        used = ", ".join(f"{row['largest_share_used'][rule]:.2f}" for rule in RULES)
        print(f"{dtype:<6}{row['cases']:>7}{row['judgments']:>8}{row['false_verdicts']:>7}"
              f"{row['upper_95']:>11.1e}  {used}", flush=True)
        for f in row["failures"][:3]:
            print(f"  {f['candidate']}: {f['case']}\n{f['report']}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=float)


if __name__ == "__main__":
    main()
