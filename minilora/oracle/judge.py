"""Judging a candidate's outputs against the float64 reference, with derived tolerances.

For each output tensor z computed by a candidate in precision p (unit roundoff u_p, inputs and
stored intermediates in p) accumulating in precision a (u_a), the tolerance of element i is

    tol_i = (ρ·u_p + γ_K(u_a)) · mag_i + u_p · |z_i|

* mag is the reference evaluated on absolute values (``minilora.tolerance``): it bounds every
  partial sum, so cancellation cannot make the tolerance too small;
* γ_K(u) = K·u/(1 − K·u) with K the tensor's reduction length (d_in + r + 4 for y,
  d_out + N + 2 for dA, ...: ``minilora.tolerance`` lists them):
  the worst-case error of summing K products in precision a, in any order;
* ρ = 6 roundings to p on the way (inputs, the rank-r intermediates h or g, the scaling);
* u_p·|z| is the final rounding of the output to p;
* for DoRA, (3·u_p + γ_{d_in+2r+4}(u_a))·mag_n for the norms' own error, with mag_n what c = m/n
  multiplies, per row scaled by how much the row cancels (``tolerance.dora_magnitudes``).

That bound is worst-case, so honest candidates pass it. It is also loose (typical errors grow
like √K, not K), so a second rule borrowed from FlashAttention's tests tightens it: the
candidate's largest error may be at most twice that of a **baseline**, the same computation
emulated in NumPy at the candidate's precision (inputs rounded to p, products in a, outputs
rounded to p), plus a floor for a summation order other than the baseline's: 2·√K·u_a·max(mag)
(the typical size of an accumulation error) and 4·u_p times the tensor's largest |ref|. At
fp64 the baseline is the reference itself and the floor alone sets the limit. A tensor passes
when both rules hold and it has no NaN or infinity. Cosine similarity is reported but never
decides: a 0.5× scale bug has cosine 1. docs/oracle.md gives the sources and the measured
detection power.
"""

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from minilora.oracle.cases import OUTPUTS, OracleInputError, emulate, reference, reference_shapes
from minilora.precision import DEFAULT_ACCUMULATION, PRECISIONS, precision
from minilora.tolerance import dora_magnitudes, gamma, lora_magnitudes, lora_reduction_lengths

ROUNDINGS = 6
NORM_ROUNDINGS = 3  # DoRA: the inputs' rounding moves n by up to u·t (f ≥ t/n covers it), c, 1/n
BASELINE_FACTOR = 2.0
BASELINE_FLOOR_U = 4  # times u_p at the tensor's largest |ref|
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
    max_rel_err: float  # max |cand − ref| / |ref| over entries with |ref| > 1e-3·max |ref|
    normwise_rel_err: float  # ‖cand − ref‖ / ‖ref‖
    scale_ratio: float  # ⟨cand, ref⟩ / ‖ref‖²: 1 when right, 0.5 for a halving bug
    cosine: float  # reported, never decides
    tolerance_used: float  # max_i |err_i| / tol_i: above 1 fails the derived bound
    tolerance_at_worst: float  # tol_i where err_i / tol_i is largest
    baseline_max_err: float  # the emulated baseline's largest error
    baseline_limit: float  # 2 · baseline_max_err + the floor
    baseline_used: float = 0.0  # max_abs_err / baseline_limit: above 1 fails the baseline rule
    decided_by: str = ""  # the rule closest to failing (or that failed): "non-finite",
    #                       "derived bound" or "baseline max"
    margin: float = 0.0  # that rule's use of its limit (tolerance_used or baseline_used)


@dataclass
class Report:
    dtype: str
    accum_dtype: str
    tensors: list = field(default_factory=list)
    not_judged: list = field(default_factory=list)  # outputs the case has that were not judged
    warnings: list = field(default_factory=list)

    @property
    def passed(self):
        """Every judged tensor passed; and at least one was judged (``compare`` ensures it)."""
        return bool(self.tensors) and all(t.passed for t in self.tensors)

    def to_json(self):
        return json.dumps({"passed": self.passed, "dtype": self.dtype,
                           "accum_dtype": self.accum_dtype,
                           "tensors": [asdict(t) for t in self.tensors],
                           "not_judged": self.not_judged, "warnings": self.warnings}, indent=2,
                          default=float)

    def __str__(self):
        """A table: one row per tensor, columns separated by at least two spaces whatever the
        values (every number in %.3g or %.5g); "used" is the deciding rule's share of its
        limit (above 1 fails), "rule" that rule."""
        rows = [("tensor", "shape", "max abs err", "at index", "reference", "candidate",
                 "norm rel", "scale", "used", "rule", "verdict")]
        for t in self.tensors:
            rows.append((t.name, str(t.shape), f"{t.max_abs_err:.3g}", str(t.worst_index),
                         f"{t.reference_value:.5g}", f"{t.candidate_value:.5g}",
                         f"{t.normwise_rel_err:.3g}", f"{t.scale_ratio:.5g}", f"{t.margin:.3g}",
                         t.decided_by, "pass" if t.passed else "FAIL: " + "; ".join(t.reasons)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines = [f"candidate computed in {self.dtype}, accumulating in {self.accum_dtype}"]
        lines += [f"warning: {w}" for w in self.warnings]
        for row in rows:
            cells = [c.ljust(w) if i in (0, 1, 9) else c.rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths, strict=False))]
            lines.append("  ".join(cells) + "  " + row[-1])
        if self.not_judged:
            lines.append(f"not judged: {', '.join(self.not_judged)}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def magnitudes(case):
    """mag of every output, each output's reduction length K, and (DoRA) the magnitudes of what
    the norms' own error moves with the norms' K: ``(mags, K, norm_mags, norm_K)``."""
    t = {k: v.astype(np.float64) for k, v in case.tensors.items()}
    kw = dict(scaling=case.scaling, dy=t["dy"], bias=t.get("bias"),
              dropout_mask=t.get("dropout_mask"), fan_in_fan_out=case.fan_in_fan_out)
    N = int(np.prod(t["x"].shape[:-1]))
    (r, d_in), d_out = t["A"].shape, t["B"].shape[0]
    K = lora_reduction_lengths(N, d_in, d_out, r)
    if not case.dora:
        return lora_magnitudes(t["x"], t["W"], t["A"], t["B"], **kw), K, None, 0
    args = (t["x"], t["W"], t["A"], t["B"], t["m"])
    mags, extra = dora_magnitudes(*args, detach_norm=case.detach_norm, **kw)
    norm_mags, _ = dora_magnitudes(*args, detach_norm=case.detach_norm, norm_error=True, **kw)
    K = {k: v + (0 if k == "dbias" else extra) for k, v in K.items()}  # c = m/n scales all but
    # dbias = Σ dy (dW = (c ⊙ dy)ᵀ x_d + ...)
    K["dm"] = K["y"] + N
    if not case.detach_norm:  # the gradient through n adds W Aᵀ-sized sums to dA, dB, dW
        for k in ("dA", "dB", "dW"):
            K[k] += d_in + d_out + r
    return mags, K, norm_mags, extra


REQUIRED = ("y", "dx", "dA", "dB")  # every case defines these, DoRA cases dm too


def required_outputs(case):
    """The outputs a candidate must give unless the caller names a subset: y, dx, dA, dB, and
    dm for DoRA (dW and dbias are judged when given)."""
    return REQUIRED + (("dm",) if case.dora else ())


def check_candidate(case, candidate, outputs=None):
    """The candidate's arrays, as stored, checked against the case: known names of the right
    shapes and a float dtype, every required output (or every one ``outputs`` names) present.
    Returns ``(arrays to judge, names of the case's outputs not judged)``; OracleInputError
    names what is wrong."""
    shapes = reference_shapes(case)
    if not hasattr(candidate, "keys") or not hasattr(candidate, "__getitem__"):
        raise OracleInputError(f"the candidate must map output names to arrays, got "
                               f"{type(candidate).__name__}")
    names = list(candidate.keys())
    unknown = sorted(str(k) for k in names if k not in shapes)
    if unknown:
        known = [k for k in OUTPUTS if k in shapes]
        raise OracleInputError(f"the candidate has outputs {unknown} that this case does not "
                               f"define; its outputs are {known}")
    if outputs is None:
        wanted = [k for k in OUTPUTS if k in names or k in required_outputs(case)]
    else:
        if isinstance(outputs, str):
            outputs = [o for o in outputs.split(",") if o]
        wanted = list(dict.fromkeys(outputs))
        bad = sorted(str(k) for k in wanted if k not in shapes)
        if bad or not wanted:
            raise OracleInputError(f"outputs= names {bad or 'nothing'}; this case's outputs are "
                                   f"{[k for k in OUTPUTS if k in shapes]}")
    missing = [k for k in wanted if k not in names]
    if missing:
        hint = "" if outputs is not None else \
            " (name the subset you computed with outputs= or --only to judge only those)"
        raise OracleInputError(f"the candidate lacks {missing}{hint}")
    arrays = {}
    for name in wanted:
        value = candidate[name]
        if isinstance(value, np.ma.MaskedArray):
            raise OracleInputError(f"candidate {name} is a masked array: pass plain values")
        try:
            a = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise OracleInputError(f"candidate {name} cannot be read as an array ({e}); convert "
                                   f"it to float32 or float64 first") from None
        if a.dtype.kind != "f":
            raise OracleInputError(f"candidate {name} has dtype {a.dtype}, not a float")
        if a.shape != shapes[name]:
            raise OracleInputError(f"candidate {name} has shape {a.shape}, the case's {name} "
                                   f"is {shapes[name]}")
        arrays[name] = a
    not_judged = [k for k in OUTPUTS if k in shapes and k not in wanted]
    return arrays, not_judged


def _precision_warnings(arrays, prec):
    """Lines for the report when the candidate's values do not look like ``prec``'s: finer
    (values ``prec`` cannot represent) or coarser (every value fits a coarser format)."""
    values = np.concatenate([a.astype(np.float64).ravel() for a in arrays.values()])
    values = values[np.isfinite(values) & (values != 0)]
    if values.size == 0:
        return []
    if prec.name != "fp64" and not np.array_equal(prec.round(values).astype(np.float64), values):
        return [f"the candidate holds values that {prec.name} cannot represent: it was stored "
                f"in a finer precision than {prec.name}, the precision it is judged as"]
    if values.size < 16:
        return []
    coarser = [q for q in PRECISIONS.values() if q.u > prec.u
               and np.array_equal(q.round(values).astype(np.float64), values)]
    if coarser:
        q = max(coarser, key=lambda q: q.u)
        return [f"every value the candidate holds is a {q.name} value: if it computed in "
                f"{q.name}, judge it as {q.name} (judged as {prec.name}, honest {q.name} "
                f"rounding fails)"]
    return []


def _finite_or_unusable(arrays, what):
    for name, a in arrays.items():
        if not np.all(np.isfinite(a)):
            raise OracleInputError(f"case unusable: {what} has non-finite values in {name}")


def compare(case, candidate, dtype=None, accum_dtype=None, outputs=None):
    """Judge ``candidate`` (output name -> array) against ``case``.

    ``dtype`` is the precision the candidate computes in (bf16, fp16, tf32, fp32, fp64 or an
    alias such as "bfloat16"; default: the case's own precision) and ``accum_dtype`` the one it
    accumulates in (default: fp32, or fp64 for fp64). Every output the case defines (y, dx, dA,
    dB, and dm for DoRA) must be given unless ``outputs`` (names, or "y,dx") names the subset to
    judge; dW and dbias are judged when given. Unknown names, wrong shapes or dtypes, a missing
    output, and a case whose reference or honest result at ``dtype`` is not finite raise
    OracleInputError: a verdict is only given on what was judged.
    """
    prec = precision(case.input_precision if dtype is None else dtype)
    accum = precision(DEFAULT_ACCUMULATION[prec.name] if accum_dtype is None else accum_dtype)
    arrays, not_judged = check_candidate(case, candidate, outputs)
    with np.errstate(all="ignore"):
        ref = reference(case)
        _finite_or_unusable(ref, "its float64 reference")
        mags, K, norm_mags, norm_K = magnitudes(case)
        _finite_or_unusable(mags, "the magnitudes of its sums (float64 overflow)")
        base = emulate(case, prec, accum)  # the baseline
    for name in arrays:
        if not np.all(np.isfinite(base[name])):
            raise OracleInputError(f"case unusable at {prec.name}: an honest {prec.name} "
                                   f"computation of {name} overflows (values beyond "
                                   f"{prec.name}'s range); make a case with smaller values")
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond prec's range: a warning
        warnings = _precision_warnings(arrays, prec)
    report = Report(prec.name, accum.name, not_judged=not_judged, warnings=warnings)
    for name, cand in arrays.items():
        g = gamma(K[name], accum.u)  # inf when K·u ≥ 1: then only the baseline rule decides
        with np.errstate(over="ignore", invalid="ignore"):
            tol = (ROUNDINGS * prec.u + g) * mags[name] + prec.u * np.abs(ref[name])
            if norm_mags is not None:  # DoRA: the norms' error, larger where rows cancel
                tol = tol + (NORM_ROUNDINGS * prec.u + gamma(norm_K, accum.u)) * norm_mags[name]
            floor = BASELINE_FLOOR_SQRT_K * np.sqrt(K[name]) * accum.u \
                * float(np.max(mags[name], initial=0.0)) \
                + BASELINE_FLOOR_U * prec.u * float(np.max(np.abs(ref[name]), initial=0.0))
            base_err = float(np.max(np.abs(base[name] - ref[name]), initial=0.0))
            limit = BASELINE_FACTOR * base_err + floor
        if not np.isfinite(limit) or (np.isfinite(g) and not np.all(np.isfinite(tol))):
            raise OracleInputError(f"case unusable: the tolerance of {name} overflows float64 "
                                   f"(values too close to float64's range)")
        report.tensors.append(_judge(name, cand.astype(np.float64), ref[name], tol, base_err,
                                     limit, prec))
    return report


def _judge(name, cand, ref, tol, base_err, limit, prec):
    with np.errstate(over="ignore", invalid="ignore"):  # a candidate's inf or 1e308: judged
        return _judge_finite_case(name, cand, ref, tol, base_err, limit, prec)


def _judge_finite_case(name, cand, ref, tol, base_err, limit, prec):
    """The verdict on one tensor: the derived bound ``tol`` elementwise, ``limit`` (twice the
    baseline's largest error ``base_err`` plus the floor) on the largest error; ref and limit
    are finite (``compare`` checks)."""
    reasons = []
    finite = np.isfinite(cand)
    nonfinite = int(cand.size - np.count_nonzero(finite))
    if nonfinite:
        reasons.append(f"{nonfinite} non-finite value(s) (NaN or inf)")
    err = np.where(finite, np.abs(cand - ref), np.inf)
    if err.size == 0:
        return TensorVerdict(name, ref.shape, not reasons, reasons, nonfinite, 0.0, (), 0.0,
                             0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, "empty", 0.0)
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    max_err = float(err[worst])
    with np.errstate(divide="ignore", invalid="ignore"):
        used = np.where(tol > 0, err / tol, np.where(err > 0, np.inf, 0.0))
    at = np.unravel_index(int(np.argmax(used)), used.shape)
    tolerance_used = float(used[at])
    if not tolerance_used <= 1:  # (a NaN fails too)
        reasons.append(f"error {float(err[at]):.3g} at {tuple(int(i) for i in at)} exceeds the "
                       f"derived tolerance {float(tol[at]):.3g}")
    if not max_err <= limit:
        reasons.append(f"max error {max_err:.3g} exceeds {BASELINE_FACTOR:g}x the "
                       f"{prec.name} baseline's {base_err:.3g} (limit {limit:.3g})")
    baseline_used = max_err / limit if limit > 0 else (np.inf if max_err > 0 else 0.0)
    rules = {"derived bound": tolerance_used, "baseline max": baseline_used}
    decided_by = "non-finite" if nonfinite else max(rules, key=rules.get)
    c = np.where(finite, cand, 0.0)
    unit = max(float(np.max(np.abs(ref))), float(np.max(np.abs(c))))  # norms of scaled copies:
    unit = unit if 0 < unit < np.inf else 1.0  # no overflow in the squares near float64's top
    r, c, e = ref / unit, c / unit, np.where(finite, err, 0.0) / unit
    ref_norm2 = float(np.sum(r * r))
    cand_norm2 = float(np.sum(c * c))
    dot = float(np.sum(c * r))
    big = np.abs(ref) > 1e-3 * float(np.max(np.abs(ref)))
    max_rel = float(np.max(err[big] / np.abs(ref[big]))) if big.any() else 0.0
    return TensorVerdict(
        name=name, shape=ref.shape, passed=not reasons, reasons=reasons, nonfinite=nonfinite,
        max_abs_err=max_err, worst_index=tuple(int(i) for i in worst),
        reference_value=float(ref[worst]), candidate_value=float(cand[worst]),
        max_rel_err=max_rel,
        normwise_rel_err=float(np.sqrt(np.sum(e * e) / ref_norm2))
        if ref_norm2 > 0 else float(max_err > 0),
        scale_ratio=dot / ref_norm2 if ref_norm2 > 0 else 1.0,
        cosine=dot / np.sqrt(ref_norm2 * cand_norm2) if ref_norm2 * cand_norm2 > 0 else 1.0,
        tolerance_used=tolerance_used, tolerance_at_worst=float(tol[at]),
        baseline_max_err=base_err, baseline_limit=limit, baseline_used=baseline_used,
        decided_by=decided_by, margin=rules.get(decided_by, np.inf))
