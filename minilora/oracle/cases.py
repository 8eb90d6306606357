"""Oracle cases: inputs and a cotangent for one LoRA or DoRA layer, and their float64 reference
outputs and gradients. (Reading and writing case files: ``minilora.oracle.files``.)

A case holds the tensors ``x W A B dy`` and, as it needs them, ``bias m dropout_mask``, and the
layer's options: the scaling, the Conv1D layout, whether DoRA's norm is detached, and the
precision its values are exactly representable in.
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from minilora.ops._checks import check_positive_int, check_scaling
from minilora.oracle.kinds import of_block
from minilora.oracle.precision import DEFAULT_ACCUMULATION, precision


class OracleInputError(ValueError):
    """A case or candidate cannot be used: unreadable, missing tensors, wrong shapes or values."""


@dataclass
class Case:
    """One problem: input tensors (float32 or float64) and the layer's options."""

    tensors: dict
    scaling: float
    fan_in_fan_out: bool = False
    detach_norm: bool = True
    input_precision: str = "fp32"  # the precision every input is exactly representable in
    layer: dict = field(default_factory=dict)  # how make_case drew it: r, alpha, use_rslora,
    #   dropout p, lead_shape, lora_only (JSON values), so a candidate can build its own layer
    block: str | None = None  # a fused block (minilora.ops.blocks): "qkv", "mlp" or "multi", whose
    #   scaling is then a tuple (one per projection or adapter); ``kind`` is what it names
    activation: str = "silu"  # the MLP block's
    base: object = None  # a QLoRA base's NF4Weight (minilora.oracle.nf4): its codes and absmax,
    #   of which tensors["W"] is the exact float64 dequantization; None for a float base

    def __post_init__(self):
        self.input_precision = precision(self.input_precision).name  # "bfloat16" -> "bf16"
        of_block(self.block)  # ValueError for an unknown block

    @property
    def kind(self):
        """What this kind of case is (``minilora.oracle.kinds``): a single layer or a block."""
        return of_block(self.block)

    @property
    def dtype(self):
        """The old name of ``input_precision`` (the file format's metadata key)."""
        return self.input_precision

    @property
    def dora(self):
        return "m" in self.tensors

    def with_tensors(self, tensors):
        """The same problem over other tensors (rounded or widened copies of these)."""
        return dataclasses.replace(self, tensors=tensors)

    def with_scaling(self, scaling):
        """The same problem with another scaling (an honest candidate's rounded s; a sequence
        for a block)."""
        return dataclasses.replace(self, scaling=self.kind.scaling(scaling))

    @property
    def scalings(self):
        """The scaling as a tuple (one entry for a single layer)."""
        return self.kind.scalings(self.scaling)

    def metadata(self):
        kind = self.kind
        meta = {"format": "minilora-oracle-case/1", "op": kind.op(self),
                "scaling": kind.scaling_text(self.scaling),
                "fan_in_fan_out": self.fan_in_fan_out, "detach_norm": self.detach_norm,
                "dtype": self.input_precision, **kind.extra_metadata(self)}
        if self.layer:
            meta["layer"] = json.dumps(self.layer, sort_keys=True)
        return meta


def make_case(*, d_in, d_out, r, batch=4, seq=None, alpha=None, rslora=False, dora=False,
              dropout=0.0, bias=False, fan_in_fan_out=False, detach_norm=True, dtype="fp32",
              lora_only=False, block=None, hidden=None, activation="silu", adapters=3, seed=0,
              base=None, blocksize=64, double_quant=False):
    """Draw a case in which every term of every output matters. Values are rounded to ``dtype``
    (bf16, fp16, tf32, fp32 or fp64) so that a candidate computing in that format reads them
    exactly; they are stored as float32 (float64 for fp64).

    W ~ N(0, 1/d_in) (W's rows as (d_out, d_in), stored (d_in, d_out) with fan_in_fan_out), or
    W = 0 with ``lora_only``; A Kaiming-uniform; B normal, scaled so that the LoRA branch s·B A is
    as large as W (1.25 times, Frobenius norms): the LoRA terms of y and dx are then the size of
    the base terms, so a bug in them shows in y and dx, not only in dA and dB; B is never zero
    (with B = 0, dA = 0 and a wrong dA would pass). The scaling is alpha/r (alpha/√r for rsLoRA)
    with alpha = 2r by default; an alpha that makes |s| = 1 is refused (a scaling applied twice,
    or not at all, would be invisible). x and dy ~ N(0, 1), bias ~ N(0, 0.1²), m the row norms
    of W + s·B A times factors in [0.5, 2], the dropout mask 0 or 1/(1−p) with both values
    present (whenever it has two entries or more). ``case.layer`` (and the file's metadata)
    records r, alpha, use_rslora, the dropout p, the leading shape and lora_only; the mask
    itself is rounded to ``dtype`` like every input: use the mask, not p, to reproduce it.

    ``block`` draws a fused block's case instead (``minilora.oracle.kinds``): "qkv"
    (three projections of x, to d_out, d_out/2, d_out/2), "mlp" (gate and up to ``hidden``,
    default 2·d_in, then down to d_out, with ``activation``) or "multi" (``adapters`` adapters
    of ranks r, 2r, r, 2r, ... on one layer, each token given one or none); every projection
    is drawn as above, and every adapter and the base layer occur in the batch.

    ``base="nf4"``: a QLoRA base (``minilora.oracle.nf4.make_nf4_case``): W quantized to
    bitsandbytes' NF4 (``blocksize`` values per absmax, the absmax itself quantized with
    ``double_quant``); ``case.base`` keeps the codes and scales and W is their exact
    dequantization.
    """
    if base is not None:
        if base != "nf4":
            raise ValueError(f"base must be None or 'nf4', got {base!r}")
        from minilora.oracle.nf4 import make_nf4_case

        nf4 = make_nf4_case(blocksize=blocksize, double_quant=double_quant, d_in=d_in,
                            d_out=d_out, r=r, batch=batch, seq=seq, alpha=alpha, rslora=rslora,
                            dora=dora, dropout=dropout, bias=bias, fan_in_fan_out=fan_in_fan_out,
                            detach_norm=detach_norm, dtype=dtype, lora_only=lora_only,
                            block=block, seed=seed)
        return dataclasses.replace(nf4.case, base=nf4.weight)
    d_in, d_out, r = (check_positive_int(v, n) for v, n in ((d_in, "d_in"), (d_out, "d_out"),
                                                             (r, "r")))
    batch = check_positive_int(batch, "batch", minimum=0)
    seq = None if seq is None else check_positive_int(seq, "seq", minimum=0)
    dropout = check_scaling(dropout, "dropout")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    alpha = check_scaling(2 * r if alpha is None else alpha, "alpha")
    prec = precision(dtype)
    lead = (batch,) if seq is None else (batch, seq)
    N = math.prod(lead)
    check_fits_memory(N * (2 * d_in + d_out) + d_out * d_in + r * (d_in + d_out), "the case")
    rng = np.random.default_rng(seed)
    kind = of_block(block)
    hidden, adapters = kind.check_options(dora=dora, lora_only=lora_only,
                                          fan_in_fan_out=fan_in_fan_out, activation=activation,
                                          hidden=hidden, adapters=adapters)
    t, scaling = kind.draw(rng, prec.round, lead, d_in=d_in, d_out=d_out, r=r, alpha=alpha,
                           rslora=rslora, dropout=dropout, bias=bias,
                           fan_in_fan_out=fan_in_fan_out, dora=dora, lora_only=lora_only,
                           hidden=hidden, activation=activation, adapters=adapters)
    record, options = kind.drawn(lora_only=lora_only, detach_norm=detach_norm,
                                 activation=activation)
    layer = {"r": r, "alpha": alpha, "use_rslora": bool(rslora), "dropout": dropout,
             "lead_shape": list(lead), **record}
    return Case(t, scaling, bool(fan_in_fan_out), input_precision=prec.name, layer=layer,
                **options)


def check_fits_memory(elements, what):
    """ValueError unless ``elements`` float64 numbers, with the reference's temporaries (a few
    times as much), fit in this machine's memory: refused up front, not by a MemoryError."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return
    if 8 * 4 * elements > memory:
        raise ValueError(f"{what} needs about {8 * 4 * elements / 2**30:.1f} GiB to make and "
                         f"evaluate, more than this machine's {memory / 2**30:.1f} GiB")


def reference(case):
    """The float64 outputs and gradients of a case: y, dx, dA, dB, dW (and dm, dbias)."""
    return evaluate(case.with_tensors({k: v.astype(np.float64) if v.dtype.kind == "f" else v
                                       for k, v in case.tensors.items()}))


def evaluate(case, backend="numpy"):
    """Every output and gradient of a case, computed in the dtype of the case's tensors."""
    return case.kind.evaluate(case, backend)


def emulate(case, prec, accum=None, backend="numpy"):
    """The case computed the way an honest candidate at precision ``prec`` computes it: inputs
    rounded to ``prec``, arithmetic in ``accum`` (default: fp32, fp64 for fp64), outputs
    rounded to ``prec``; returned as float64 arrays: an honest candidate that keeps its
    intermediates in ``accum`` (the tests' and benchmarks' run it on the numba backend). The
    oracle's own model of honest rounding is ``minilora.oracle.emulation``."""
    prec = precision(prec)
    accum = precision(DEFAULT_ACCUMULATION[prec.name] if accum is None else accum)
    rounded = {k: prec.round(v).astype(accum.numpy_dtype) if v.dtype.kind == "f" else v
               for k, v in case.tensors.items()}
    return {k: prec.round(v).astype(np.float64)
            for k, v in evaluate(case.with_tensors(rounded), backend=backend).items()}


def reference_shapes(case):
    """The shape of every output, in the canonical order (OUTPUTS', or the block's), checking
    the case's shapes on the way (ValueError if wrong)."""
    return case.kind.shapes(case)
