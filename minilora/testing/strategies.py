"""Hypothesis strategies that draw LoRA and DoRA problems: shapes, options, values.

Needs the ``hypothesis`` package (``pip install minilora[test]``).
"""

import numpy as np
from hypothesis import strategies as st

from minilora.ops.dora import row_norms, trained_magnitude
from minilora.testing import LoRACase


@st.composite
def lora_shapes(draw, max_dim=12, max_lead_dims=3, max_lead=3, lead_dims=None, min_tokens=0):
    """(lead, d_in, d_out, r): leading dims (0 to ``max_lead_dims`` of them, or exactly
    ``lead_dims`` (an int, or a (min, max) pair); sizes from 0, their product at least
    ``min_tokens``), and r from 1 to above min(d_in, d_out).

    ``lead_dims=2, min_tokens=1`` draws the (batch, seq, d_in) inputs most kernels take, never
    empty; the default includes 1-D x and zero-size batches, which a kernel should handle too.
    """
    lo, hi = (0, max_lead_dims) if lead_dims is None else \
        (lead_dims, lead_dims) if isinstance(lead_dims, int) else tuple(lead_dims)
    if min_tokens > max_lead**hi:
        raise ValueError(f"min_tokens={min_tokens} cannot be met with {hi} leading dims of at "
                         f"most {max_lead}")
    lead = tuple(draw(st.lists(st.integers(0, max_lead), min_size=lo, max_size=hi)
                      .filter(lambda d: int(np.prod(d)) >= min_tokens)))
    d_in = draw(st.integers(1, max_dim))
    d_out = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, min(d_in, d_out) + 2))
    return lead, d_in, d_out, r


VALUES = ("normal", "zeros", "wide")


def _values(rng, kind, shape, dtype):
    """Arrays of one of three kinds: standard normal; normal with about half the entries exactly
    zero (sparse inputs, ReLU outputs, exact cancellations); or a wide dynamic range, magnitudes
    log-uniform over 1e-3..1e3 with random signs."""
    a = rng.standard_normal(shape)
    if kind == "zeros":
        a = np.where(rng.random(shape) < 0.5, 0.0, a)
    elif kind == "wide":
        a = np.sign(a) * 10.0 ** rng.uniform(-3, 3, shape)
    return a.astype(dtype)


@st.composite
def lora_cases(draw, dtypes=(np.float64, np.float32), max_dim=12, dropout=None, bias=None,
               fan_in_fan_out=None, values=VALUES, lead_dims=None, min_tokens=0):
    """A LoRACase: shapes from ``lora_shapes`` (``lead_dims``, ``min_tokens`` passed on),
    options drawn unless fixed by the arguments.

    The dropout mask is drawn at one of three shapes: x's own, a per-feature (d_in,) row, or one
    value per token (..., 1); its values are 0 and 1/(1−p), both present whenever it has two
    entries or more. The scaling is never ±1 (a scaling applied twice or not at all would be
    invisible), B never zero. Array values are of a kind drawn from ``values`` ("normal",
    "zeros": about half exactly zero, "wide": magnitudes from 1e-3 to 1e3) from a drawn seed,
    so a failing example reproduces from its printed seed.
    """
    lead, d_in, d_out, r = draw(lora_shapes(max_dim=max_dim, lead_dims=lead_dims,
                                            min_tokens=min_tokens))
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    use_bias = draw(st.booleans()) if bias is None else bias
    fan_in_fan_out = draw(st.booleans()) if fan_in_fan_out is None else fan_in_fan_out
    mask_kind = draw(st.sampled_from(["none", "full", "feature", "token"])) if dropout is None \
        else ("full" if dropout else "none")
    alpha = draw(st.sampled_from([1.0, 8.0, 16.0, -2.0]))
    scaling = alpha / (np.sqrt(r) if draw(st.booleans()) else r)  # rsLoRA or alpha/r
    if abs(scaling) == 1.0:
        scaling *= 1.5
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(values))

    def normal(*shape):
        return _values(rng, kind, shape, dtype)

    B = normal(d_out, r)
    B.flat[0] = 1.0 + abs(B.flat[0])  # never all zero
    mask = None
    if mask_kind != "none":
        p = draw(st.sampled_from([0.1, 0.5]))
        shape = {"full": lead + (d_in,), "feature": (d_in,), "token": lead + (1,)}[mask_kind]
        keep = rng.random(shape) >= p
        if keep.size >= 2:  # both a kept and a dropped entry, wherever they fall
            keep.flat[rng.choice(keep.size, 2, replace=False)] = (True, False)
        mask = (keep / (1 - p)).astype(dtype)
    return LoRACase(
        x=normal(*lead, d_in),
        W=normal(d_in, d_out) if fan_in_fan_out else normal(d_out, d_in),
        A=normal(r, d_in),
        B=B,
        scaling=float(scaling),
        bias=normal(d_out) if use_bias else None,
        dropout_mask=mask,
        fan_in_fan_out=fan_in_fan_out,
        dy=normal(*lead, d_out),
    )


@st.composite
def dora_cases(draw, detach_norm=None, values=("normal", "wide"), **kwargs):
    """A LoRACase with a DoRA magnitude m: the row norms of W + s·B A times factors in [0.5, 2]
    (as after some training), so c = m/n is not 1, and ``detach_norm`` drawn unless given.
    Takes ``lora_cases``' arguments; by default not its "zeros" values, which can zero a whole
    row of W + s·B A, where the norm has no derivative (minilora defines c = 0 there)."""
    case = draw(lora_cases(values=values, **kwargs))
    case.detach_norm = draw(st.booleans()) if detach_norm is None else bool(detach_norm)
    n = row_norms(case.W, case.A, case.B, case.scaling, case.fan_in_fan_out)[0]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    case.m = trained_magnitude(n, rng).astype(case.x.dtype)
    return case


@st.composite
def block_cases(draw, block=None, dtype="fp32", max_dim=12, min_tokens=0):
    """A ``minilora.oracle.Case`` of a fused block (``minilora.ops.blocks``): "qkv", "mlp" or
    "multi" (drawn unless given), with drawn sizes, options (bias, dropout, rsLoRA, the MLP's
    activation, the number of adapters) and leading shape (batch, seq). Judge a candidate's
    outputs with ``assert_matches_reference(outputs, case)``; docs/oracle.md names them."""
    from minilora.ops.blocks import ACTIVATIONS
    from minilora.oracle import make_case
    from minilora.oracle.block_cases import BLOCKS
    from minilora.oracle.kinds import of_block

    block = draw(st.sampled_from(BLOCKS)) if block is None else block
    return make_case(block=block, d_in=draw(st.integers(1, max_dim)),
                     d_out=draw(st.integers(1, max_dim)), r=draw(st.integers(1, 4)),
                     batch=draw(st.integers(min_tokens, 3)), seq=draw(st.integers(1, 4)),
                     hidden=draw(st.integers(1, max_dim)), rslora=draw(st.booleans()),
                     dropout=draw(st.sampled_from([0.0, 0.2])), bias=draw(st.booleans()),
                     activation=draw(st.sampled_from(ACTIVATIONS)),
                     adapters=draw(st.integers(1, 4)),
                     fan_in_fan_out=of_block(block).fan_in_fan_out and draw(st.booleans()),
                     dtype=dtype,
                     seed=draw(st.integers(0, 2**32 - 1)))


@st.composite
def nf4_cases(draw, dtype=None, dtypes=("bf16", "fp16", "fp32", "fp64"), max_dim=96,
              blocksizes=(32, 64, 128, 256), double_quant=None, dora=None,
              fan_in_fan_out=None):
    """A ``minilora.oracle.Case`` with a QLoRA base (``make_case(base="nf4")``): W quantized
    to bitsandbytes' NF4 in blocks of a drawn ``blocksize`` (from ``blocksizes``), its absmax
    double-quantized or not (``double_quant`` drawn unless given), ``case.base`` keeping the
    codes and scales and ``case.tensors["W"]`` their exact float64 dequantization.

    Drawn too: d_in (1 to ``max_dim``, so that W's rows cut through blocks or hold several)
    and d_out (1 to 24; the last block is then often shorter), r, the leading shape, the
    precision (``dtype``, or one of ``dtypes``), LoRA or DoRA (``dora``), bias, dropout,
    rsLoRA, the Conv1D layout (``fan_in_fan_out``; bitsandbytes' own 4-bit weights are
    (d_out, d_in)) and the detached norm. A kernel holds W as
    ``minilora.oracle.nf4.honest_case(case, dtype)`` has it; judge its outputs with
    ``assert_matches_reference(outputs, case, dtype=...)``, or run a torch kernel on the case
    with ``minilora.testing.torch.assert_torch_matches`` (which can hand it bitsandbytes'
    4-bit weight, ``W_4bit``). DoRA cases with a row of W + s·B A that cancels below the
    precision's resolution (the judge refuses them: no honest norm has a correct bit) are not
    drawn."""
    from hypothesis import assume

    from minilora.oracle import OracleInputError, make_case
    from minilora.oracle.judge import _check_norms_resolve
    from minilora.oracle.nf4 import BLOCKSIZES
    from minilora.oracle.precision import precision as precision_of

    if not blocksizes or any(b not in BLOCKSIZES for b in blocksizes):
        raise ValueError(f"blocksizes must be a non-empty selection of {BLOCKSIZES}, got "
                         f"{blocksizes!r}")
    precision = draw(st.sampled_from(dtypes)) if dtype is None else dtype
    use_dora = draw(st.booleans()) if dora is None else bool(dora)
    case = make_case(d_in=draw(st.integers(1, max_dim)), d_out=draw(st.integers(1, 24)),
                     r=draw(st.integers(1, 8)), batch=draw(st.integers(0, 3)),
                     seq=draw(st.sampled_from([None, 1, 4])), rslora=draw(st.booleans()),
                     dora=use_dora, detach_norm=not use_dora or draw(st.booleans()),
                     dropout=draw(st.sampled_from([0.0, 0.1, 0.5])), bias=draw(st.booleans()),
                     fan_in_fan_out=draw(st.booleans()) if fan_in_fan_out is None
                     else bool(fan_in_fan_out), dtype=precision,
                     seed=draw(st.integers(0, 2**32 - 1)), base="nf4",
                     blocksize=draw(st.sampled_from(blocksizes)),
                     double_quant=draw(st.booleans()) if double_quant is None
                     else bool(double_quant))
    if use_dora:
        try:
            _check_norms_resolve(case, precision_of(precision))
        except OracleInputError:
            assume(False)
    return case
