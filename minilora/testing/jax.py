"""Judge a JAX LoRA implementation in-process, as ``minilora.testing.torch`` judges a torch one.

    from minilora.testing.jax import jax_outputs, assert_jax_matches

    def my_lora(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None):
        ...                                        # jax.numpy, a jax.custom_vjp function, ...
        return y

    case = ml.oracle.make_case(d_in=64, d_out=48, r=8, dropout=0.1, dtype="bf16")
    assert_jax_matches(my_lora, case, dtype="bf16")        # AssertionError with the report

The harness builds the case's arrays at the dtype, calls ``fn`` under ``jax.vjp`` with respect
to x, A and B (and m for DoRA; W and bias with ``need_dW``/``need_dbias``), pulls the case's dy
back and returns every output and gradient as float64 NumPy arrays for the oracle
(``minilora.oracle.compare``). The arguments are those of the torch harness
(``minilora.testing._harness`` lists them, blocks included): W as (d_out, d_in), the dropout
mask as the multiplier on the LoRA branch's input (0 or 1/(1 − p)).

fp64 needs JAX's 64-bit mode: the harness runs an fp64 case inside the ``jax.enable_x64(True)``
context, which is thread-local and restored on exit, so the caller's global setting
(``jax_enable_x64``) is never changed. Other precisions run in the caller's mode. Needs
``pip install minilora[jax]``; ``import minilora.testing`` never imports jax.
"""

import jax
import jax.numpy as jnp
import numpy as np

from minilora.oracle import OracleInputError, compare
from minilora.testing import _harness as harness

JAX_DTYPES = harness.dtype_map(jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


def jax_outputs(fn, case, dtype=None, *, need_dW=False, need_dbias=False):
    """Run ``fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None) -> y`` on a case.

    Parameters
    ----------
    fn : a JAX function of jax arrays (blocks: lists of arrays, see ``_harness``)
    case : a ``minilora.oracle.Case`` or a ``minilora.testing.LoRACase``
    dtype : "bf16", "fp16", "fp32", "fp64" (or an alias); default the case's precision
    need_dW, need_dbias : also differentiate with respect to W (and bias): dW, dbias

    Returns
    -------
    dict of float64 arrays: "y", "dx", "dA", "dB", and "dm" for DoRA, "dW", "dbias" when asked
    for (block cases: "y.j", "dA.j", ... as ``minilora.oracle.kinds`` names them).
    """
    case = harness.oracle_case(case)
    name = harness.precision_name(case, dtype)
    if name == "fp64":
        with _x64():  # thread-local, restored on exit
            return _outputs(fn, case, name, need_dW, need_dbias)
    return _outputs(fn, case, name, need_dW, need_dbias)


def _x64():
    """A context in which JAX's 64-bit types are enabled: ``jax.enable_x64(True)`` (newer JAX),
    else ``jax.experimental.enable_x64()``; both restore the previous state on exit."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def _outputs(fn, case, name, need_dW, need_dbias):
    jdt = JAX_DTYPES[name]
    given = harness.fn_inputs(case, name)

    def array(a):
        if a is None:
            return None
        if isinstance(a, list):
            return [array(v) for v in a]
        return jnp.asarray(a) if a.dtype.kind != "f" else jnp.asarray(a, dtype=jdt)

    # the differentiated arguments (a pytree) and the fixed ones
    primals = {"x": array(given["x"]), "A": array(given["A"]), "B": array(given["B"])}
    fixed = {"W": array(given["W"]), "bias": array(given["bias"])}
    if given.get("m") is not None:
        primals["m"] = array(given["m"])
    for wanted, key in ((need_dW, "W"), (need_dbias, "bias")):
        if wanted and fixed[key] is not None:
            primals[key] = fixed.pop(key)
    mask = array(given["dropout_mask"])
    index = array(given.get("adapter_index"))

    def run(p):
        args = {**fixed, **p}
        kwargs = dict(given["kwargs"], bias=args["bias"], dropout_mask=mask)
        if "m" in args:
            kwargs["m"] = args["m"]
        lead = (args["x"], args["W"], args["A"], args["B"])
        y = case.kind.call(fn, lead, index, kwargs)  # fn(*lead, **kwargs); multi: with index
        ys = case.kind.split(y)  # qkv: P outputs
        if not all(isinstance(v, jax.Array) for v in ys):
            raise OracleInputError(f"fn returned {type(y).__name__}, not jax arrays")
        harness.check_returned(ys, given["dys"])
        return ys

    ys, pullback = jax.vjp(run, primals)
    (grads,) = pullback([jnp.asarray(d, dtype=v.dtype) for v, d in zip(ys, given["dys"],
                                                                      strict=True)])
    grads = jax.tree_util.tree_map(lambda g: np.asarray(g, dtype=np.float64), grads)
    return harness.named_outputs(case, [np.asarray(v, dtype=np.float64) for v in ys], grads)


def assert_jax_matches(fn, case, dtype=None, *, accum_dtype=None, need_dW=False,
                       need_dbias=False):
    """``jax_outputs`` judged by the oracle at ``dtype``: returns the report when every output
    is within tolerance, raises AssertionError carrying the report's table otherwise."""
    case = harness.oracle_case(case)
    outputs = jax_outputs(fn, case, dtype, need_dW=need_dW, need_dbias=need_dbias)
    report = compare(case, outputs, dtype=dtype, accum_dtype=accum_dtype)
    if not report.passed:
        raise AssertionError("the JAX implementation does not match the float64 reference:\n"
                             + str(report))
    return report
