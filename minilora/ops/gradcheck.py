"""Finite-difference gradient checking for any forward/backward pair.

    report = gradcheck(forward, backward, {"x": x, "A": A, "B": B})

``forward(**inputs) -> (y, cache)`` and ``backward(dy, cache) -> grads``, where ``grads`` is a
mapping ``{name: gradient}`` or an object with attributes ``d<name>`` (``grads.dA``), the way
``lora_backward`` returns them. Every check runs in float64 on copies of the inputs.

What is checked, for each input p named in ``wrt``:

* values: with a random cotangent v, the scalar φ(p) = ⟨v, y(p)⟩ has gradient ∂φ/∂p =
  backward(v)[p] (cs231n's ``eval_numerical_gradient_array``). Small inputs are checked over the
  full Jacobian instead: column i of J by differences, row j by ``backward(e_j)``. Large inputs are
  checked along random directions u, ⟨∂φ/∂p, u⟩, and at a sample of coordinates, so a failure
  still names an index.
* derivatives by central differences D(h) = (φ(p+hu) − φ(p−hu)) / 2h (h sized to each entry:
  eps·max(1, |p_i|) for a coordinate, eps·max(1, max|p|) along a direction), at h and h/2 and
  combined by Richardson extrapolation (4·D(h/2) − D(h))/3. The extrapolation amplifies noise
  about threefold, so 4·|D(h) − D(h/2)| plus the rounding error of φ (32 ulps of max|y| over the
  step: an output's rounding error follows the size of the terms that made it, not its own
  size) estimates the error of the difference, and widens the tolerance by that much only.
  ``method="complex"`` uses complex steps instead, Im φ(p + i·h·u)/h with h = 1e-30, which has
  no cancellation (forward must then accept complex128 and use only analytic operations).
* beside values, as torch's gradcheck does: a zero cotangent gives exactly zero gradients, two
  backward passes give identical bits, each gradient has its input's shape and dtype, and neither
  pass modifies its inputs.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

EPS64 = np.finfo(np.float64).eps


class GradcheckError(AssertionError):
    """A gradient check failed; the message names the input, index, values and error."""


@dataclass
class InputCheck:
    """The verdict for one input."""

    name: str
    shape: tuple
    mode: str  # "jacobian" or "directions"
    max_abs_err: float  # worst |analytical − numerical|
    rel_err: float  # max_abs_err / max |numerical|, the normwise relative error
    worst_index: tuple  # index into the input (jacobian mode: (output index, input index))
    numerical: float
    analytical: float
    tolerance: float  # the tolerance at the worst index
    passed: bool
    scale: float = 0.0  # the gradient's magnitude (max |numerical|, or ‖∂φ/∂p‖ for directions)

    def describe(self):
        return (f"{self.name}{self.shape} [{self.mode}]: worst at index {self.worst_index}: "
                f"numerical {self.numerical:.10g}, analytical {self.analytical:.10g}, "
                f"error {self.max_abs_err:.3g} (tolerance {self.tolerance:.3g}), "
                f"relative error {self.rel_err:.3g}")


@dataclass
class GradcheckReport:
    """Per-input verdicts and the structural problems found; ``passed`` when there are none."""

    inputs: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def passed(self):
        return not self.problems and all(c.passed for c in self.inputs)

    @property
    def worst_rel_err(self):
        return max((c.rel_err for c in self.inputs), default=0.0)

    def __str__(self):
        lines = [c.describe() + ("" if c.passed else "  FAILED") for c in self.inputs]
        return "\n".join(lines + [f"problem: {p}" for p in self.problems])


def _grad_of(grads, name):
    if isinstance(grads, Mapping):
        return grads.get(name)
    return getattr(grads, "d" + name, None)


def gradcheck(forward, backward, inputs, *, wrt=None, method="central", eps=1e-4, rtol=1e-6,
              max_jacobian=20_000, n_directions=4, n_coords=24, seed=0, raise_on_failure=True):
    """Check ``backward`` against finite differences of ``forward`` (see the module docstring).

    Parameters
    ----------
    forward : callable, ``forward(**inputs) -> (y, cache)``
    backward : callable, ``backward(dy, cache) -> grads``
    inputs : dict name -> ndarray; float arrays are checked in float64 (copies)
    wrt : names to check; default every floating-point input
    method : "central" (differences at h and h/2, Richardson-combined) or "complex"
    eps : relative step (central only): h = eps · max(1, |p_i|) for coordinate i, and
        eps · max(1, max|p|) along a random direction
    rtol : tolerance relative to the gradient's magnitude: an entry passes when
        |analytical − numerical| ≤ rtol · (|numerical| + max|numerical|) + error estimate
    max_jacobian : check the full Jacobian when y.size · p.size is at most this
    n_directions, n_coords : random directions and sampled coordinates for larger inputs
    seed : seeds the cotangent, directions and coordinates
    raise_on_failure : raise GradcheckError instead of returning a failed report

    Returns
    -------
    GradcheckReport
    """
    if method not in ("central", "complex"):
        raise ValueError(f"method must be 'central' or 'complex', got {method!r}")
    rng = np.random.default_rng(seed)
    base = {k: (np.array(v, dtype=np.float64) if _is_float_array(v) else v)
            for k, v in inputs.items()}
    wrt = [k for k, v in base.items() if _is_float_array(v)] if wrt is None else list(wrt)
    for name in wrt:
        if name not in base or not _is_float_array(base[name]):
            raise ValueError(f"wrt names {name!r}, which is not a floating-point input")
    saved = {k: v.copy() for k, v in base.items() if isinstance(v, np.ndarray)}

    report = GradcheckReport()
    y0, cache = forward(**base)
    y0 = np.asarray(y0)
    v = rng.standard_normal(y0.shape)  # the random cotangent, y's shape
    grads = backward(v, cache)
    _structural_checks(report, backward, cache, v, grads, base, wrt)
    for k, original in saved.items():
        if not np.array_equal(base[k], original, equal_nan=True):
            report.problems.append(f"forward or backward modified the input {k!r}")
    if report.problems:
        return _finish(report, raise_on_failure)

    def phi_along(name, u, t):
        """φ(p + t·u) = ⟨v, y⟩ (complex method: the imaginary part over h, t being i·h)."""
        args = dict(base)
        args[name] = base[name] + t * u
        return np.sum(v * forward(**args)[0])

    for name in wrt:
        p = base[name]
        G = np.asarray(_grad_of(grads, name), dtype=np.float64)
        steps = _Steps(p, method, eps)
        y_max = float(np.max(np.abs(y0), initial=0.0))
        v_sum = float(np.sum(np.abs(v)))

        def derivative(name, u, i=None, steps=steps, v_sum=v_sum, y_max=y_max):
            """The derivative of φ along u (coordinate i when given: its own step), and an
            estimate of its error."""
            h, unit = steps.at(i)
            if method == "complex":
                return float(np.imag(phi_along(name, u, 1j * h))) / h, 0.0
            value, err = _richardson(lambda t: phi_along(name, u, t), h)
            return value, err + 32 * EPS64 * v_sum * y_max / unit

        if y0.size * p.size <= max_jacobian:
            check = _check_jacobian(name, p, y0, forward, backward, base, cache, method, steps,
                                    rtol)
        else:
            check = _check_directions(name, p, G, derivative, rng, rtol, n_directions, n_coords)
        report.inputs.append(check)
    return _finish(report, raise_on_failure)


class _Steps:
    """The step for each coordinate of p, h_i = eps·max(1, |p_i|) (central differences: a step
    sized to the entry, so that a small entry beside large ones is not stepped past its own
    curvature), or h = eps·max(1, max|p|) along a random direction; complex steps use 1e-30.
    ``at(i)`` returns (h, unit): the rounding of y is divided by ``unit`` (the step for
    differences; for complex steps, a few ulps of y per unit of p is the floor of resolution)."""

    def __init__(self, p, method, eps):
        self.p, self.method, self.eps = p, method, eps
        self.p_max = float(np.max(np.abs(p), initial=0.0))

    def at(self, i=None):
        if self.method == "complex":
            return 1e-30, max(self.p_max, 1e-300)
        size = self.p_max if i is None else abs(float(self.p.flat[i]))
        h = self.eps * max(1.0, size)
        return h, h


def _richardson(f, h):
    """The central difference of f at 0, Richardson-extrapolated, and an estimate of its error:
    with D(h) = (f(h) − f(−h)) / 2h, (4·D(h/2) − D(h)) / 3 and 4·|D(h) − D(h/2)| (f scalar- or
    array-valued)."""
    d1 = (f(h) - f(-h)) / (2 * h)
    d2 = (f(h / 2) - f(-h / 2)) / h
    return (4 * d2 - d1) / 3, 4 * np.abs(d1 - d2)


def _is_float_array(a):
    return isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating)


def _structural_checks(report, backward, cache, v, grads, base, wrt):
    """Shapes and dtypes of the gradients, zero cotangent -> zero gradients, repeatability."""
    again = backward(v.copy(), cache)
    zero = backward(np.zeros_like(v), cache)
    for name in wrt:
        g = _grad_of(grads, name)
        if g is None:
            report.problems.append(f"backward returned no gradient for {name!r}")
            continue
        g = np.asarray(g)
        if g.shape != base[name].shape or g.dtype != base[name].dtype:
            report.problems.append(
                f"gradient of {name!r} is {g.dtype}{g.shape}, its input {base[name].dtype}"
                f"{base[name].shape}")
            continue
        if not np.array_equal(g, _grad_of(again, name), equal_nan=True):
            report.problems.append(f"two backward passes gave different bits for {name!r}")
        if np.any(np.asarray(_grad_of(zero, name)) != 0):
            report.problems.append(f"a zero cotangent gave a non-zero gradient for {name!r}")


def _tolerance(num, scale, rtol, err_est):
    return rtol * (np.abs(num) + scale) + err_est


def _check_jacobian(name, p, y0, forward, backward, base, cache, method, steps, rtol):
    """Compare the full Jacobian ∂y/∂p: columns by differences, rows by unit cotangents."""
    if p.size == 0 or y0.size == 0:
        return InputCheck(name, p.shape, "jacobian", 0.0, 0.0, (), 0.0, 0.0, 0.0, True)
    J_num = np.empty((y0.size, p.size))  # (n_out, n_in)
    J_err = np.empty_like(J_num)  # error estimate of each entry
    for i in range(p.size):
        e = np.zeros(p.size)
        e[i] = 1.0
        e = e.reshape(p.shape)

        def y_at(t, e=e):
            args = dict(base)
            args[name] = base[name] + t * e
            return np.asarray(forward(**args)[0]).ravel()

        h, unit = steps.at(i)
        if method == "complex":
            J_num[:, i], J_err[:, i] = np.imag(y_at(1j * h)) / h, 0.0
        else:
            J_num[:, i], J_err[:, i] = _richardson(y_at, h)
        J_err[:, i] += 32 * EPS64 * np.max(np.abs(y0)) / unit
    J_ana = np.empty_like(J_num)
    for j in range(y0.size):
        e = np.zeros(y0.size)
        e[j] = 1.0
        J_ana[j] = np.asarray(_grad_of(backward(e.reshape(y0.shape), cache), name)).ravel()
    scale = float(np.max(np.abs(J_num), initial=0.0))
    err = np.abs(J_ana - J_num)
    tol = _tolerance(J_num, scale, rtol, J_err)
    worst = np.unravel_index(_worst(err, tol), err.shape)
    return _verdict(name, p.shape, "jacobian", err, tol, scale, J_num, J_ana, worst,
                    (int(worst[0]), tuple(int(k) for k in np.unravel_index(worst[1], p.shape))))


def _check_directions(name, p, G, derivative, rng, rtol, n_directions, n_coords):
    """Compare ⟨∂φ/∂p, u⟩ along random directions, then entries at sampled coordinates."""
    scale = float(np.sqrt(np.sum(G * G)))  # ‖∂φ/∂p‖, the magnitude directions are judged on
    direction_failure = None
    for _ in range(n_directions):
        u = rng.standard_normal(p.shape)
        u /= np.sqrt(np.sum(u * u))
        num, est = derivative(name, u)
        ana = float(np.sum(G * u))
        err, tol = abs(ana - num), _tolerance(num, scale, rtol, est)
        if err > tol and direction_failure is None:
            rel = err / max(abs(num), scale, 1e-300)
            direction_failure = InputCheck(name, p.shape, "directions", err, rel,
                                           ("random direction",), num, ana, tol, False, scale)
    # Coordinates: the largest gradient entries (where a wrong formula shows most) and random ones.
    flat = np.abs(G).ravel()
    k = min(n_coords, p.size)
    top = np.argsort(flat, kind="stable")[::-1][: k // 2]
    idx = np.unique(np.concatenate([top, rng.choice(p.size, size=k - top.size, replace=False)]))
    num = np.empty(idx.size)
    est = np.empty(idx.size)
    for j, i in enumerate(idx):
        e = np.zeros(p.size)
        e[i] = 1.0
        num[j], est[j] = derivative(name, e.reshape(p.shape), i)
    ana = G.ravel()[idx]
    coord_scale = float(np.max(np.abs(G)))
    err = np.abs(ana - num)
    tol = _tolerance(num, coord_scale, rtol, est)
    j = _worst(err, tol)
    worst = tuple(int(k) for k in np.unravel_index(idx[j], p.shape))
    check = _verdict(name, p.shape, "directions", err, tol, coord_scale, num, ana, j, worst)
    # A wrong gradient can hide from the sampled coordinates but not from a random direction.
    return check if (not check.passed or direction_failure is None) else direction_failure


def _worst(err, tol):
    """The flat index to report: the largest error, or the largest excess over the tolerance."""
    return int(np.argmax(err) if np.all(err <= tol) else np.argmax(err - tol))


def _verdict(name, shape, mode, err, tol, scale, num, ana, at, index):
    max_abs = float(np.max(err))
    passed = bool(np.all(err <= tol))
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)
    return InputCheck(name, shape, mode, max_abs, rel, index, float(num[at]), float(ana[at]),
                      float(tol[at]), passed, scale)


def _finish(report, raise_on_failure):
    if raise_on_failure and not report.passed:
        raise GradcheckError("gradient check failed:\n" + str(report))
    return report
