"""Judging a candidate's outputs against the float64 reference, with derived tolerances.

For each output tensor z computed by a candidate in precision p (unit roundoff u_p, inputs and
stored intermediates in p) accumulating in precision a (u_a), the tolerance of element i is

    tol_i = (ρ·u_p + γ_K(u_a)) · mag_i + u_p · |z_i|

* mag is the reference evaluated on absolute values (``minilora.tolerance``): it bounds every
  partial sum, so cancellation cannot make the tolerance too small;
* γ_K(u) = K·u/(1 − K·u) with K the tensor's reduction length (d_in + r for y, N for dA, ...):
  the worst-case error of summing K products in precision a, in any order;
* ρ = 6 roundings to p on the way (inputs, the rank-r intermediates h or g, the scaling);
* u_p·|z| is the final rounding of the output to p.

That bound is worst-case, so honest candidates pass it. It is also loose (typical errors grow
like √K, not K), so a second rule borrowed from FlashAttention's tests tightens it: the
candidate's largest error may be at most twice that of a **baseline**, the same computation
emulated in NumPy at the candidate's precision (inputs rounded to p, products in a, outputs
rounded to p), plus a floor for a summation order other than the baseline's: 2·√K·u_a·max(mag)
(the typical size of an accumulation error) and 4 ulps of p at the tensor's largest value. At
fp64 the baseline is the reference itself and the floor alone sets the limit. A tensor passes
when both rules hold and it has no NaN or infinity. Cosine similarity is reported but never
decides: a 0.5× scale bug has cosine 1. docs/oracle.md gives the sources and the measured
detection power.
"""

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from minilora.oracle.cases import Case, evaluate, reference
from minilora.oracle.precision import DEFAULT_ACCUMULATION, precision
from minilora.tolerance import dora_magnitudes, gamma, lora_magnitudes, lora_reduction_lengths

ROUNDINGS = 6
BASELINE_FACTOR = 2.0
BASELINE_FLOOR_ULPS = 4  # of the candidate's precision, at the tensor's largest value
BASELINE_FLOOR_SQRT_K = 2.0  # times √K·u_a·max(mag), another summation order's typical error


@dataclass
class TensorVerdict:
    name: str
    shape: tuple
    passed: bool
    reasons: list
    nonfinite: int  # NaN and infinities in the candidate
    max_abs_err: float
    worst_index: tuple  # where |candidate − reference| is largest
    reference_value: float
    candidate_value: float
    max_rel_err: float  # max |cand − ref| / |ref| over entries with |ref| > tiny
    normwise_rel_err: float  # ‖cand − ref‖ / ‖ref‖
    scale_ratio: float  # ⟨cand, ref⟩ / ‖ref‖²: 1 when right, 0.5 for a halving bug
    cosine: float  # reported, never decides
    tolerance_used: float  # max_i |err_i| / tol_i: above 1 fails the derived bound
    tolerance_at_worst: float  # tol_i where err_i / tol_i is largest
    baseline_max_err: float  # the emulated baseline's largest error
    baseline_limit: float  # 2 · baseline_max_err + the floor


@dataclass
class Report:
    dtype: str
    accum_dtype: str
    tensors: list = field(default_factory=list)

    @property
    def passed(self):
        return all(t.passed for t in self.tensors)

    def to_json(self):
        return json.dumps({"passed": self.passed, "dtype": self.dtype,
                           "accum_dtype": self.accum_dtype,
                           "tensors": [asdict(t) for t in self.tensors]}, indent=2,
                          default=float)

    def __str__(self):
        head = (f"{'tensor':<7}{'shape':<16}{'max abs err':>12}{'at index':>16}{'reference':>13}"
                f"{'candidate':>13}{'norm rel':>10}{'scale':>9}{'tol used':>10}  verdict")
        lines = [f"candidate computed in {self.dtype}, accumulating in {self.accum_dtype}", head]
        for t in self.tensors:
            lines.append(
                f"{t.name:<7}{t.shape!s:<16}{t.max_abs_err:>12.3e}{t.worst_index!s:>16}"
                f"{t.reference_value:>13.5g}{t.candidate_value:>13.5g}"
                f"{t.normwise_rel_err:>10.2e}{t.scale_ratio:>9.4f}{t.tolerance_used:>10.3f}  "
                + ("pass" if t.passed else "FAIL: " + "; ".join(t.reasons)))
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def magnitudes(case):
    """mag of every output, and each output's reduction length K."""
    t = {k: v.astype(np.float64) for k, v in case.tensors.items()}
    kw = dict(scaling=case.scaling, dy=t["dy"], bias=t.get("bias"),
              dropout_mask=t.get("dropout_mask"), fan_in_fan_out=case.fan_in_fan_out)
    N = int(np.prod(t["x"].shape[:-1]))
    (r, d_in), d_out = t["A"].shape, t["B"].shape[0]
    K = lora_reduction_lengths(N, d_in, d_out, r)
    if not case.dora:
        return lora_magnitudes(t["x"], t["W"], t["A"], t["B"], **kw), K
    mags, extra = dora_magnitudes(t["x"], t["W"], t["A"], t["B"], t["m"],
                                  detach_norm=case.detach_norm, **kw)
    K = {k: v + (0 if k in ("dW", "dbias") else extra) for k, v in K.items()}
    K["dm"] = K["y"] + N
    if not case.detach_norm:  # the gradient through n adds W Aᵀ-sized sums to dA, dB, dW
        for k in ("dA", "dB", "dW"):
            K[k] += d_in + d_out + r
    return mags, K


def baseline(case, prec, accum):
    """The case computed the way an honest candidate at ``prec`` would: inputs rounded to prec,
    arithmetic in ``accum``, outputs rounded to prec."""
    dtype = np.float64 if accum.name == "fp64" else np.float32
    rounded = {k: prec.round(v).astype(dtype) for k, v in case.tensors.items()}
    emulated = Case(rounded, case.scaling, case.fan_in_fan_out, case.detach_norm, case.dtype)
    return {k: prec.round(v).astype(np.float64) for k, v in evaluate(emulated).items()}


def compare(case, candidate, dtype="fp32", accum_dtype=None):
    """Judge ``candidate`` (name -> array, any subset of the outputs) against ``case``.

    ``dtype`` is the precision the candidate computes in (bf16, fp16, tf32, fp32, fp64) and
    ``accum_dtype`` the one it accumulates in (default: fp32, or fp64 for fp64).
    """
    prec = precision(dtype)
    accum = precision(accum_dtype or DEFAULT_ACCUMULATION[dtype])
    ref = reference(case)
    mags, K = magnitudes(case)
    base = baseline(case, prec, accum)
    report = Report(prec.name, accum.name)
    for name in ref:
        if name in candidate:
            tol = (ROUNDINGS * prec.u + gamma(K[name], accum.u)) * mags[name] \
                + prec.u * np.abs(ref[name])
            floor = BASELINE_FLOOR_SQRT_K * np.sqrt(K[name]) * accum.u \
                * float(np.max(mags[name], initial=0.0)) \
                + BASELINE_FLOOR_ULPS * prec.u * float(np.max(np.abs(ref[name]), initial=0.0))
            report.tensors.append(_judge(name, np.asarray(candidate[name], np.float64),
                                         ref[name], tol, base[name], floor, prec))
    return report


def _judge(name, cand, ref, tol, base, floor, prec):
    reasons = []
    finite = np.isfinite(cand)
    nonfinite = int(cand.size - np.count_nonzero(finite))
    if nonfinite:
        reasons.append(f"{nonfinite} non-finite value(s) (NaN or inf)")
    err = np.where(finite, np.abs(cand - ref), np.inf)
    if err.size == 0:
        return TensorVerdict(name, ref.shape, not reasons, reasons, nonfinite, 0.0, (), 0.0,
                             0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    max_err = float(err[worst])
    with np.errstate(divide="ignore", invalid="ignore"):
        used = np.where(tol > 0, err / tol, np.where(err > 0, np.inf, 0.0))
    at = np.unravel_index(int(np.argmax(used)), used.shape)
    tolerance_used = float(used[at])
    if tolerance_used > 1:
        reasons.append(f"error {float(err[at]):.3g} at {tuple(int(i) for i in at)} exceeds the "
                       f"derived tolerance {float(tol[at]):.3g}")
    base_err = float(np.max(np.abs(base - ref)))
    limit = BASELINE_FACTOR * base_err + floor
    if max_err > limit:
        reasons.append(f"max error {max_err:.3g} exceeds {BASELINE_FACTOR:g}x the "
                       f"{prec.name} baseline's {base_err:.3g} (limit {limit:.3g})")
    c = np.where(finite, cand, 0.0)
    ref_norm2 = float(np.sum(ref * ref))
    cand_norm2 = float(np.sum(c * c))
    dot = float(np.sum(c * ref))
    big = np.abs(ref) > 1e-3 * float(np.max(np.abs(ref)))
    max_rel = float(np.max(err[big] / np.abs(ref[big]))) if big.any() else 0.0
    return TensorVerdict(
        name=name, shape=ref.shape, passed=not reasons, reasons=reasons, nonfinite=nonfinite,
        max_abs_err=max_err, worst_index=tuple(int(i) for i in worst),
        reference_value=float(ref[worst]), candidate_value=float(cand[worst]),
        max_rel_err=max_rel,
        normwise_rel_err=float(np.sqrt(np.sum(np.where(finite, err, 0.0) ** 2) / ref_norm2))
        if ref_norm2 > 0 else float(max_err > 0),
        scale_ratio=dot / ref_norm2 if ref_norm2 > 0 else 1.0,
        cosine=dot / np.sqrt(ref_norm2 * cand_norm2) if ref_norm2 * cand_norm2 > 0 else 1.0,
        tolerance_used=tolerance_used, tolerance_at_worst=float(tol[at]),
        baseline_max_err=base_err, baseline_limit=limit)
