"""Judging a candidate's outputs against the float64 reference, with derived limits.

A candidate computes in precision p (unit roundoff u_p; inputs and stored intermediates in p)
and accumulates in precision a (u_a). Each output tensor z must pass four rules
(docs/oracle.md derives them):

* **derived bound**, elementwise: |z_i − ref_i| ≤ (ρ·u_p + γ_K(u_a))·mag_i + u_p·|ref_i|
  + (1 + ρ)·η_p, with mag the reference evaluated on absolute values (``minilora.oracle.tolerance``:
  it bounds every partial sum, so cancellation cannot make the tolerance too small),
  γ_K = K·u/(1 − K·u) the worst-case error of K-term sums in any order (K per output:
  ``tolerance.lora_reduction_lengths``), ρ = 6 roundings to p on the way, u_p·|z| the output's
  own rounding, η_p the absolute error of rounding below p's normal range; for DoRA,
  (3·u_p + γ_{d_in+2r+4}(u_a))·mag_n for the norms' error, with mag_n what c = m/n multiplies,
  per row scaled by how much the row cancels (``tolerance.dora_magnitudes``). Worst-case, so
  honest candidates pass it; loose, so three tighter rules follow, built on the
  operation-by-operation model of an honest candidate in ``minilora.oracle.emulation``;
* **baseline max**: the largest error at most twice the **baseline**'s (the model with every
  result rounded to p) or the random runs', plus a floor for another summation order,
  2·√K·u_a·max(mag) + 4·u_p·max|ref|;
* **normwise**: ‖z − ref‖ at most (2 + 6/√n_eff) times the honest error's norm (the larger of
  the baseline's and the RMS over ``RANDOM_RUNS`` random honest candidates);
* **scale**: the scale ratio − 1, ⟨z − ref, ref⟩/‖ref‖², within 8σ (σ that of the random runs)
  of [0, the baseline's], widened by the shift that storing the scaling s in p or a gives.

For fp16 the derived bound also takes four times its measured underflow share (the baseline
against the same computation without fp16's narrow exponent range); at fp64 the runs' spread is
taken √2 wider (the float64 reference rounds as much as the candidate). A DoRA case with a row
that cancels below p's resolution is refused as unusable at p.

A tensor passes when every rule holds and it has no NaN or infinity. Cosine similarity is
reported but never decides: a 0.5× scale bug has cosine 1.
"""

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from minilora.ops.dora import inverse_norms, norm_bounds, row_norms
from minilora.oracle import emulation, nf4
from minilora.oracle.cases import OracleInputError, reference, reference_shapes
from minilora.oracle.precision import DEFAULT_ACCUMULATION, PRECISIONS, precision
from minilora.oracle.tolerance import gamma

ROUNDINGS = 6
NORM_ROUNDINGS = 3  # DoRA: the inputs' rounding moves n by up to u·t (f ≥ t/n covers it), c, 1/n
BASELINE_FACTOR = 2.0
BASELINE_FLOOR_U = 4  # times u_p at the tensor's largest |ref|
BASELINE_FLOOR_SQRT_K = 2.0  # times √K·u_a·max(mag), another summation order's typical error
RANDOM_RUNS = 16  # honest candidates drawn from the rounding model, for the whole-tensor rules
NORM_FACTOR = 2.0  # ‖error‖ ≤ (NORM_FACTOR + NORM_TAIL/√n_eff) × the honest error's norm
NORM_TAIL = 6.0
SCALE_Z = 8.0  # |scale ratio − 1| ≤ SCALE_Z·σ + the scaling's own rounding
UNDERFLOW_FACTOR = 4.0  # times fp16's measured underflow share, added to the derived bound


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
    baseline_limit: float  # 2 · max(baseline_max_err, the random runs' largest error) + the floor
    baseline_used: float = 0.0  # max_abs_err / baseline_limit: above 1 fails the baseline rule
    normwise_limit: float = 0.0  # the limit on ‖cand − ref‖
    normwise_used: float = 0.0  # ‖cand − ref‖ / normwise_limit
    scale_limit: float = 0.0  # the limit on |scale_ratio − 1| on the side it lies
    scale_shift: float = 0.0  # scale_ratio − 1 = ⟨cand − ref, ref⟩/‖ref‖², computed from the error
    scale_used: float = 0.0  # |scale_shift| / scale_limit
    decided_by: str = ""  # the rule closest to failing (or that failed): "non-finite",
    #                       "derived bound", "baseline max", "normwise" or "scale"
    margin: float = 0.0  # that rule's use of its limit: tolerance_used, baseline_used,
    #                      normwise_used or scale_used (inf when decided by "non-finite")


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
                 "norm rel", "scale - 1", "used", "rule", "verdict")]
        for t in self.tensors:
            rows.append((t.name, str(t.shape), f"{t.max_abs_err:.3g}", str(t.worst_index),
                         f"{t.reference_value:.5g}", f"{t.candidate_value:.5g}",
                         f"{t.normwise_rel_err:.3g}", f"{t.scale_shift:.3g}", f"{t.margin:.3g}",
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
    return case.kind.magnitudes(case)


def required_outputs(case):
    """The outputs a candidate must give unless the caller names a subset: y, dx, dA, dB, and
    dm for DoRA (dW and dbias are judged when given); for a block every y.j, dA.j and dB.j."""
    return case.kind.required(case)


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
        raise OracleInputError(f"the candidate has outputs {unknown} that this case does not "
                               f"define; its outputs are {list(shapes)}")
    if outputs is None:
        required = required_outputs(case)
        wanted = [k for k in shapes if k in names or k in required]
    else:
        if isinstance(outputs, str):
            outputs = [o for o in outputs.split(",") if o]
        wanted = list(dict.fromkeys(outputs))
        bad = sorted(str(k) for k in wanted if k not in shapes)
        if bad or not wanted:
            raise OracleInputError(f"outputs= names {bad or 'nothing'}; this case's outputs are "
                                   f"{list(shapes)}")
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
    not_judged = [k for k in shapes if k not in wanted]
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
    OracleInputError: a verdict is only given on what was judged. To judge several candidates
    on one case, ``Judge(case, dtype, accum_dtype)`` prepares the limits once.
    """
    check_candidate(case, candidate, outputs)  # a malformed candidate is refused before work
    return Judge(case, dtype, accum_dtype).compare(candidate, outputs)


@dataclass
class Limits:
    """What one output is judged against (see the module docstring)."""

    ref: np.ndarray  # the float64 reference
    tol: np.ndarray  # the derived bound, elementwise
    base_err: float  # the emulated baseline's largest error
    limit: float  # on the largest error: 2·(the baseline's or the runs' largest) + the floor
    norm_model: float  # the honest error's norm: the baseline's or the random runs' RMS
    norm_limit: float  # on ‖candidate − reference‖
    scale_sigma: float  # the honest scale ratio's standard deviation (the random runs')
    scale_systematic: float  # the scale ratio that rounding the scaling s to p or a gives
    scale_band: tuple  # (lo, hi): scale ratio − 1 must lie in it


class Judge:
    """The limits of every output of one case at one precision, computed once: ``compare``
    judges any number of candidates against them."""

    def __init__(self, case, dtype=None, accum_dtype=None):
        self.case = case
        self.prec = prec = precision(case.input_precision if dtype is None else dtype)
        self.accum = accum = precision(DEFAULT_ACCUMULATION[prec.name] if accum_dtype is None
                                       else accum_dtype)
        with np.errstate(all="ignore"):
            ref = reference(case)
            _finite_or_unusable(ref, "its float64 reference")
            mags, K, norm_mags, norm_K = magnitudes(case)
            _finite_or_unusable(mags, "the magnitudes of its sums (float64 overflow)")
            if case.dora:
                _check_norms_resolve(case, prec)
            # an NF4 base: honest kernels hold the dequantized W rounded to the precision
            model = nf4.honest_case(case, prec.name) if case.layer.get("base") == "nf4" \
                else case
            base = emulation.run(model, emulation.rounded_type(prec, accum),
                                 emulation.rounded_type(accum, accum))  # the baseline
            for name, value in base.items():
                if not np.all(np.isfinite(value)):
                    raise OracleInputError(
                        f"case unusable at {prec.name}: an honest {prec.name} computation of "
                        f"{name} overflows (values beyond {prec.name}'s range); make a case "
                        f"with smaller values")
            runs = _run_statistics(model, prec, accum, ref)
            underflow = _underflow(model, prec, accum, base)
            systematic = _scaling_rounding(case, ref, (prec, accum))
        self.limits = {}
        for name in ref:
            self.limits[name] = self._limits(name, ref[name], base[name], mags[name], K[name],
                                             None if norm_mags is None else norm_mags[name],
                                             norm_K, runs[name], systematic[name],
                                             underflow.get(name, 0.0))

    def _limits(self, name, ref, base, mag, K, norm_mag, norm_K, runs, systematic, underflow):
        prec, accum = self.prec, self.accum
        g = gamma(K, accum.u)  # inf when K·u ≥ 1: then only the other rules decide
        with np.errstate(over="ignore", invalid="ignore"):
            tol = (ROUNDINGS * prec.u + g) * mag + prec.u * np.abs(ref) \
                + (1 + ROUNDINGS) * prec.eta + UNDERFLOW_FACTOR * underflow  # (below the
            #   normal range rounding is absolute: the output's own, and the intermediates')
            floor = BASELINE_FLOOR_SQRT_K * np.sqrt(K) * accum.u \
                * float(np.max(mag, initial=0.0)) \
                + BASELINE_FLOOR_U * prec.u * float(np.max(np.abs(ref), initial=0.0))
            if norm_mag is not None:  # DoRA: the norms' error, larger where rows cancel
                tol = tol + (NORM_ROUNDINGS * prec.u + gamma(norm_K, accum.u)) * norm_mag
            base_err = float(np.max(np.abs(base - ref), initial=0.0))
            limit = BASELINE_FACTOR * max(base_err, runs.max_err) + floor  # (where DoRA's rows
            #   cancel, n's error varies widely between honest candidates: the runs show it)
        if not np.isfinite(limit) or (np.isfinite(g) and not np.all(np.isfinite(tol))):
            raise OracleInputError(f"case unusable: the tolerance of {name} overflows float64 "
                                   f"(values too close to float64's range)")
        unit = _unit(ref)
        r = ref / unit
        ref_norm2 = float(np.sum(r * r))
        # the runs share the float64 reference's own rounding, a candidate does not: where
        # that is as large as the candidate's (fp64), the difference of two honest results
        # spreads √2 times as wide
        both = np.sqrt(1 + (PRECISIONS["fp64"].u / prec.u) ** 2)
        total = float(np.sum(runs.square))
        n_eff = total**2 / float(np.sum(runs.square**2)) if total > 0 else 1.0
        spread = float(np.var(runs.norms2))  # errors that share a few sources (g's r values
        if spread > 0:  # make all of a 1-token dA) count as few: ‖e‖² ~ χ²_ν with ν = 2m²/v
            n_eff = min(n_eff, 2 * float(np.mean(runs.norms2)) ** 2 / spread)
        norm_model = max(both * np.sqrt(total), float(np.linalg.norm((base - ref) / unit)))
        norm_limit = (NORM_FACTOR + NORM_TAIL / np.sqrt(n_eff)) * norm_model
        sigma = both * float(np.sqrt(np.mean(np.square(runs.scales)))) / ref_norm2 \
            if ref_norm2 > 0 else 0.0
        base_shift = float(np.sum((base - ref) / unit * r)) / ref_norm2 if ref_norm2 > 0 else 0.0
        margin = SCALE_Z * sigma + systematic  # around [0, the baseline's]: rounding a product
        band = (min(0.0, base_shift) - margin, max(0.0, base_shift) + margin)  # by a constant
        #   (x ⊙ mask, s·v) can shift every entry alike; a kernel that stores them does so too
        return Limits(ref, tol, base_err, limit, norm_model * unit, norm_limit * unit,
                      sigma, systematic, band)

    def verdict(self, name, array):
        """The TensorVerdict on one output ``name`` given as ``array`` (checked by ``compare``,
        not here: for benchmarks that judge many variants of one tensor)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return _judge(name, np.asarray(array, dtype=np.float64), self.limits[name],
                          self.prec)

    def compare(self, candidate, outputs=None):
        """The Report on ``candidate`` (see the module-level ``compare``)."""
        arrays, not_judged = check_candidate(self.case, candidate, outputs)
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond prec's range: warned
            warnings = _precision_warnings(arrays, self.prec)
        report = Report(self.prec.name, self.accum.name, not_judged=not_judged,
                        warnings=warnings)
        report.tensors = [self.verdict(name, cand) for name, cand in arrays.items()]
        return report


def _unit(a):
    """A power of two near max |a| (1 for an empty, zero or non-finite a): dividing by it keeps
    sums of squares far from overflow and underflow, exactly."""
    top = float(np.max(np.abs(a), initial=0.0))
    return float(2.0 ** np.frexp(top)[1]) if 0 < top < np.inf else 1.0


def _check_norms_resolve(case, prec):
    """OracleInputError if a row of W + s·B A cancels so far that its norm has no correct bit
    in ``prec``: n_j ≤ 2·u_p·t_j, with t_j the size of the terms summed into V_j (about one ulp
    of t_j), where the honest rounding error of n_j, up to u_p·t_j, is half of n_j or more.
    Every honest computation of c = m/n there is noise, and PEFT's is 0/0 where V_j rounds to
    zero."""
    t = {k: v.astype(np.float64) for k, v in case.tensors.items() if k in ("W", "A", "B")}
    args = (t["W"], t["A"], t["B"], case.scaling, case.fan_in_fan_out)
    n = row_norms(*args)[0]
    ratio = np.where(n > 0, norm_bounds(*args) * inverse_norms(n), np.inf)  # (d_out,) t_j/n_j
    rows = np.flatnonzero(ratio * prec.u >= 0.5)  # u·t_j/n_j ≥ 1/2 (a zero row: no direction)
    if rows.size:
        raise OracleInputError(
            f"case unusable at {prec.name}: row {int(rows[0])} of W + s·B A cancels to "
            f"{1 / ratio[rows[0]]:.2g} of its terms' size ({rows.size} such row(s)), below "
            f"{prec.name}'s resolution: no honest {prec.name} computation of its norm has a "
            f"correct bit; make a case without such rows")


@dataclass
class RunStatistics:
    """What the random runs say of one output, in units of ``_unit(ref)``: each element's mean
    square error, each run's scale ratio − 1 times ‖ref‖², and the largest error (absolute)."""

    square: np.ndarray
    scales: list
    norms2: list  # each run's ‖error‖²
    max_err: float = 0.0


def _merged_sizes(case):
    """For every frozen weight, the size of W + s·B A in W's layout (for multi, W plus the
    largest adapter's update): an honest kernel may merge the adapter into W and round that
    (minilora's numba backend does, and PEFT's merged inference), whose rounding moves every
    row of y or dx alike; the random runs give W that rounding."""
    t = {k: v.astype(np.float64) for k, v in case.tensors.items() if v.dtype.kind == "f"}
    sizes = {}
    for name, terms in case.kind.merged_updates(case, t).items():
        W = np.abs(t[name])
        update = np.max([np.abs(s * B @ A) for s, B, A in terms], axis=0)  # (d_out, d_in)
        sizes[name] = W + (update.T if case.fan_in_fan_out else update)
    return sizes


def _run_statistics(case, prec, accum, ref):
    """``RANDOM_RUNS`` honest candidates drawn from the model (``emulation.perturbed_type``),
    seeded by the precision so that a verdict is reproducible, summarized per output as they
    come (a run's arrays are not kept). Inputs that ``prec`` holds exactly are not perturbed."""
    exact = [k for k, v in case.tensors.items() if v.dtype.kind != "f"
             or np.array_equal(prec.round(v).astype(np.float64), v.astype(np.float64))]
    rng = np.random.default_rng(list(PRECISIONS).index(prec.name))
    kind = emulation.perturbed_type(prec, accum, rng)
    norms_kind = emulation.perturbed_type(accum, accum, rng)
    stats = {name: RunStatistics(np.zeros(r.shape), [], []) for name, r in ref.items()}
    merged = _merged_sizes(case)
    for _ in range(RANDOM_RUNS):
        weights = {k: case.tensors[k] + emulation.half_ulp(v, prec) * rng.uniform(-1, 1, v.shape)
                   for k, v in merged.items()}  # each run's merged-weight rounding
        run = emulation.run(case.with_tensors({**case.tensors, **weights}), kind, norms_kind,
                            exact + list(weights))
        for name, r in ref.items():
            unit, st = _unit(r), stats[name]
            e = (run[name] - r) / unit
            st.square += e * e / RANDOM_RUNS
            st.scales.append(float(np.sum(e * (r / unit))))
            st.norms2.append(float(np.sum(e * e)))
            st.max_err = max(st.max_err, float(np.max(np.abs(e), initial=0.0)) * unit)
    return stats


def _underflow(case, prec, accum, base):
    """For fp16, whose exponent range is narrow, each output's elementwise share of underflow:
    the baseline against the same computation with fp32's exponent range (tf32 rounds to fp16's
    10 bits without underflow). An intermediate rounded below the normal range errs by up to
    half the subnormal spacing whatever its size, and carries that into what it multiplies;
    the relative bound does not see it. Empty for the other formats."""
    if prec.name != "fp16":
        return {}
    wide = emulation.run(case, emulation.rounded_type(PRECISIONS["tf32"], accum),
                         emulation.rounded_type(accum, accum))
    return {name: np.abs(base[name] - wide[name]) for name in base}


def _scaling_rounding(case, ref, formats):
    """For every output, the largest |scale ratio − 1| that storing the scaling s in one of
    ``formats`` gives (0 where s is exact in them): an honest candidate may hold s in p."""
    shifts = {name: 0.0 for name in ref}
    for fmt in formats:
        s = tuple(float(fmt.round(np.float64(v))) for v in case.scalings)
        if s == case.scalings:
            continue
        moved = reference(case.with_scaling(case.kind.per_projection(s)))
        for name, r in ref.items():
            unit = _unit(r)
            norm2 = float(np.sum((r / unit)**2))
            if norm2 > 0:
                shift = abs(float(np.sum((moved[name] - r) / unit * (r / unit)))) / norm2
                shifts[name] = max(shifts[name], shift)
    return shifts


def _judge(name, cand, lim, prec):
    """The verdict on one tensor: every rule of the module docstring against ``lim``."""
    ref, tol = lim.ref, lim.tol
    reasons = []
    finite = np.isfinite(cand)
    nonfinite = int(cand.size - np.count_nonzero(finite))
    if nonfinite:
        reasons.append(f"{nonfinite} non-finite value(s) (NaN or inf)")
    err = np.where(finite, np.abs(cand - ref), np.inf)
    if err.size == 0:
        return TensorVerdict(name, ref.shape, not reasons, reasons, nonfinite, 0.0, (), 0.0,
                             0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, decided_by="empty")
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    max_err = float(err[worst])
    with np.errstate(divide="ignore", invalid="ignore"):
        used = np.where(tol > 0, err / tol, np.where(err > 0, np.inf, 0.0))
    at = np.unravel_index(int(np.argmax(used)), used.shape)
    tolerance_used = float(used[at])
    if not tolerance_used <= 1:  # (a NaN fails too)
        reasons.append(f"error {float(err[at]):.3g} at {tuple(int(i) for i in at)} exceeds the "
                       f"derived tolerance {float(tol[at]):.3g}")
    if not max_err <= lim.limit:
        reasons.append(f"max error {max_err:.3g} exceeds {BASELINE_FACTOR:g}x the "
                       f"{prec.name} baseline's {lim.base_err:.3g} or its random runs' (limit "
                       f"{lim.limit:.3g})")
    c = np.where(finite, cand, 0.0)
    unit = _unit(np.concatenate([ref.ravel(), c.ravel()]))  # exact scaling: no overflow
    r, c = ref / unit, c / unit
    e = c - r
    ref_norm2 = float(np.sum(r * r))
    cand_norm2 = float(np.sum(c * c))
    dot = float(np.sum(c * r))
    err_norm = float(np.sqrt(np.sum(e * e))) * unit if not nonfinite else np.inf
    shift = float(np.sum(e * r)) / ref_norm2 if ref_norm2 > 0 else 0.0  # scale ratio − 1, from
    scale = 1.0 + shift  # the error itself: ⟨c, r⟩/‖r‖² − 1 would lose it to rounding at fp64
    normwise_used = _used(err_norm, lim.norm_limit)
    scale_limit = lim.scale_band[1] if shift >= 0 else -lim.scale_band[0]  # the side it is on
    scale_used = _used(abs(shift), scale_limit) if ref_norm2 > 0 and not nonfinite else 0.0
    if not normwise_used <= 1:
        reasons.append(f"error norm {err_norm:.3g} exceeds {lim.norm_limit:.3g}, "
                       f"{lim.norm_limit / lim.norm_model if lim.norm_model > 0 else np.inf:.3g}"
                       f"x that of honest {prec.name} rounding")
    if not scale_used <= 1:
        reasons.append(f"scale ratio 1 {shift:+.3g} is off 1 by more than {scale_limit:.3g} "
                       f"(honest rounding: σ = {lim.scale_sigma:.2g}): a systematic error")
    baseline_used = _used(max_err, lim.limit)
    rules = {"derived bound": tolerance_used, "baseline max": baseline_used,
             "normwise": normwise_used, "scale": scale_used}
    decided_by = "non-finite" if nonfinite else max(rules, key=rules.get)
    big = np.abs(ref) > 1e-3 * float(np.max(np.abs(ref)))
    max_rel = float(np.max(err[big] / np.abs(ref[big]))) if big.any() else 0.0
    return TensorVerdict(
        name=name, shape=ref.shape, passed=not reasons, reasons=reasons, nonfinite=nonfinite,
        max_abs_err=max_err, worst_index=tuple(int(i) for i in worst),
        reference_value=float(ref[worst]), candidate_value=float(cand[worst]),
        max_rel_err=max_rel,
        normwise_rel_err=err_norm / (np.sqrt(ref_norm2) * unit) if ref_norm2 > 0
        else float(max_err > 0),
        scale_ratio=scale,
        cosine=dot / np.sqrt(ref_norm2 * cand_norm2) if ref_norm2 * cand_norm2 > 0 else 1.0,
        tolerance_used=tolerance_used, tolerance_at_worst=float(tol[at]),
        baseline_max_err=lim.base_err, baseline_limit=lim.limit, baseline_used=baseline_used,
        normwise_limit=lim.norm_limit, normwise_used=normwise_used,
        scale_limit=scale_limit, scale_shift=shift, scale_used=scale_used,
        decided_by=decided_by, margin=rules.get(decided_by, np.inf))


def _used(value, limit):
    """value / limit, the share of a limit used (inf when the limit is 0 and value is not)."""
    if limit > 0:
        return value / limit
    return np.inf if value > 0 else 0.0
