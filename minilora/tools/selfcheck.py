"""``minilora gradcheck``: sweep the library's own ops over shapes and options, checking every
gradient against finite differences in float64, and print one row per configuration."""

import functools
import itertools

import numpy as np

from minilora.ops.dora import row_norms, trained_magnitude
from minilora.ops.functional import (
    dora_backward,
    dora_forward,
    lora_backward,
    lora_forward,
    lora_scaling,
)
from minilora.ops.gradcheck import gradcheck

# (leading dims, d_in, d_out, r): a vector, a batch, a sequence batch, a zero batch, and ranks
# from 1 to above min(d_in, d_out).
SHAPES = [((), 6, 4, 2), ((5,), 8, 6, 1), ((2, 3), 7, 5, 3), ((0,), 4, 3, 2), ((4,), 3, 5, 6)]
OPTIONS = [  # (bias, dropout, fan_in_fan_out, rslora)
    (False, False, False, False),
    (True, False, False, True),
    (True, True, False, False),
    (False, True, True, True),
    (True, False, True, False),
]


OPS = ["lora", "dora", "dora-full"]  # DoRA with the norm detached (PEFT), then not


def rows(backends=("numpy", "numba"), seed=0):
    """Yield one result dict per (op, backend, shape, options)."""
    rng = np.random.default_rng(seed)
    for op, backend, shape, options in itertools.product(OPS, backends, SHAPES, OPTIONS):
        (lead, d_in, d_out, r), (bias, dropout, fan_in_fan_out, rslora) = shape, options
        scaling = lora_scaling(8, r, use_rslora=rslora)
        mask = ((rng.random(lead + (d_in,)) >= 0.25) / 0.75) if dropout else None
        inputs = dict(x=rng.standard_normal(lead + (d_in,)),
                      W=rng.standard_normal((d_in, d_out) if fan_in_fan_out else (d_out, d_in)),
                      A=rng.standard_normal((r, d_in)), B=rng.standard_normal((d_out, r)))
        if bias:
            inputs["bias"] = rng.standard_normal(d_out)
        kw = dict(scaling=scaling, dropout_mask=mask, fan_in_fan_out=fan_in_fan_out,
                  backend=backend)
        if op == "lora":
            def forward(x, W, A, B, bias=None, kw=kw):
                return lora_forward(x, W, A, B, bias=bias, **kw)

            backward = functools.partial(lora_backward, need_dW=True, need_dbias=bias)
        else:
            n = row_norms(inputs["W"], inputs["A"], inputs["B"], scaling, fan_in_fan_out)[0]
            inputs["m"] = trained_magnitude(n, rng)
            if op == "dora":  # the detached gradient: the derivative with n held fixed
                kw["norms"] = n

            def forward(x, W, A, B, m, bias=None, kw=kw, op=op):
                return dora_forward(x, W, A, B, m, bias=bias, detach_norm=op == "dora", **kw)

            backward = functools.partial(dora_backward, need_dW=True, need_dbias=bias)
        report = gradcheck(forward, backward, inputs, raise_on_failure=False)
        flags = [name for name, on in zip(("bias", "dropout", "fan_in_fan_out", "rslora"),
                                          options, strict=True) if on]
        yield {"op": op, "backend": backend,
               "config": f"x{lead + (d_in,)} {d_in}->{d_out} r={r} " + " ".join(flags),
               "checked": ",".join(c.name for c in report.inputs),
               "worst_rel_err": report.worst_rel_err, "passed": report.passed,
               "detail": "" if report.passed else str(report)}


def run(out=print):
    """Print the sweep as a table; return True when every row passed."""
    out(f"{'op':<9} {'backend':<7} {'config':<52} {'wrt':<18} {'worst rel err':>13}  ok")
    ok = True
    for row in rows():
        ok &= row["passed"]
        out(f"{row['op']:<9} {row['backend']:<7} {row['config']:<52} {row['checked']:<18} "
            f"{row['worst_rel_err']:>13.2e}  {'yes' if row['passed'] else 'NO'}")
        if row["detail"]:
            out(row["detail"])
    out("every gradient matches finite differences" if ok else "SOME GRADIENTS ARE WRONG")
    return ok
