"""``minilora gradcheck``: sweep the library's own ops over shapes and options, checking every
gradient against finite differences in float64, and print one row per configuration."""

import functools
import itertools

import numpy as np

from minilora.functional import lora_backward, lora_forward, lora_scaling
from minilora.gradcheck import gradcheck

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


def lora_rows(backends=("numpy", "numba"), seed=0):
    """Yield one result dict per (backend, shape, options) for the LoRA pair."""
    rng = np.random.default_rng(seed)
    for backend, (lead, d_in, d_out, r), (bias, dropout, fifo, rslora) in itertools.product(
            backends, SHAPES, OPTIONS):
        scaling = lora_scaling(8, r, use_rslora=rslora)
        mask = ((rng.random(lead + (d_in,)) >= 0.25) / 0.75) if dropout else None
        inputs = dict(x=rng.standard_normal(lead + (d_in,)),
                      W=rng.standard_normal((d_in, d_out) if fifo else (d_out, d_in)),
                      A=rng.standard_normal((r, d_in)), B=rng.standard_normal((d_out, r)))
        if bias:
            inputs["bias"] = rng.standard_normal(d_out)

        def forward(x, W, A, B, bias=None, mask=mask, fifo=fifo, scaling=scaling,
                    backend=backend):
            return lora_forward(x, W, A, B, scaling=scaling, bias=bias, dropout_mask=mask,
                                fan_in_fan_out=fifo, backend=backend)

        backward = functools.partial(lora_backward, need_dW=True, need_dbias=bias)
        report = gradcheck(forward, backward, inputs, raise_on_failure=False)
        flags = [name for name, on in (("bias", bias), ("dropout", dropout),
                                       ("fan_in_fan_out", fifo), ("rslora", rslora)) if on]
        yield {"op": "lora", "backend": backend,
               "config": f"x{lead + (d_in,)} {d_in}->{d_out} r={r} " + " ".join(flags),
               "checked": ",".join(c.name for c in report.inputs),
               "worst_rel_err": report.worst_rel_err, "passed": report.passed,
               "detail": "" if report.passed else str(report)}


def run(out=print):
    """Print the sweep as a table; return True when every row passed."""
    out(f"{'op':<5} {'backend':<7} {'config':<52} {'wrt':<16} {'worst rel err':>13}  ok")
    ok = True
    for row in lora_rows():
        ok &= row["passed"]
        out(f"{row['op']:<5} {row['backend']:<7} {row['config']:<52} {row['checked']:<16} "
            f"{row['worst_rel_err']:>13.2e}  {'yes' if row['passed'] else 'NO'}")
        if row["detail"]:
            out(row["detail"])
    out("every gradient matches finite differences" if ok else "SOME GRADIENTS ARE WRONG")
    return ok
