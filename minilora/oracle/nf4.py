"""QLoRA's base weights: bitsandbytes' NF4 by its definition, in NumPy, and an oracle case family.

A weight of n values is cut, in row-major order, into blocks of ``blocksize`` values (64 by
default; the last block may be shorter). Each block keeps its absmax a_b = max |w| (float32)
and each value the index q of the NF4 code nearest to w / a_b; two indices share a byte, the
first in the high nibble. The weight it stands for is

    W_i = c[q_i] · a_b(i)          (c the 16 NF4 codes, float32; b(i) = ⌊i / blocksize⌋)

computed here exactly in float64 (a product of two float32 numbers has at most 48 significant
bits). With double quantization (``quantize_4bit(..., compress_statistics=True)``) the absmax
are stored as 8-bit indices too: their mean μ is kept (float32), a_b − μ is quantized
blockwise in blocks of 256 with bitsandbytes' signed dynamic 8-bit map d (256 float32 values),
each block of absmax keeping its own absmax a2, and

    a_b = fl32(fl32(d[p_b] · a2_k(b)) + μ)

in float32, as bitsandbytes' ``dequantize_blockwise`` computes it before any 4-bit kernel
reads it: that float32 a_b is the scale every kernel multiplies by, so the float64 W above is
exact for it too.

Where the definition comes from (bitsandbytes 0.50.2, ``bitsandbytes/functional.py`` and
``bitsandbytes/backends/default/ops.py``, ``csrc/cpu_ops.cpp``, ``csrc/common.cpp``):

* the codes: ``get_4bit_type("nf4")``, the hard-coded table of
  ``create_normal_map(offset=0.9677083, use_extra_value=True)`` (QLoRA, arXiv 2305.14314),
  divided by its largest |value| (1.0, so unchanged), as float32;
* quantize (the ``quantize_4bit`` default kernel, the one that runs on CPU): in float32, full
  blocks scaled by x · (1 / max(a_b, 1e-38)), the shorter last block by x / max(a_b, 1e-38)
  (whose stored absmax is the clamped one), both clipped to [−1, 1]; q the number of code
  midpoints fl32((c_j + c_{j+1}) / 2) strictly below the scaled value (``torch.bucketize``:
  a value on a midpoint takes the lower code); an odd count padded with a scaled 0;
* the dynamic map: ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``,
  rebuilt here with torch's float32 ``linspace`` rule (checked equal to bitsandbytes' tensor
  in tests/test_oracle_nf4_bnb.py);
* the 8-bit quantization of a_b − μ (the CPU kernel ``quantize_block``): x / a2 in float32,
  the map's largest entry ≤ it found with the map's first entry taken as −1 (in the distances
  too), then the next entry taken if its float32 distance is strictly smaller (ties to the
  lower index); a block of absmax with a2 = 0 dequantizes to 0 whatever its indices (here: the
  index of 0). Two things are not bit for bit with bitsandbytes' build: μ here is the float64
  mean rounded to float32 (torch's float32 ``mean`` sums in its own order: within 2 ulp), and
  about 0.2% of the 8-bit indices differ by one from its compiled kernel's. Neither changes
  what a case judges: W is defined from the stored state, and dequantizing a bitsandbytes
  state here is bit for bit (tests/test_oracle_nf4_bnb.py).

torchao's NF4 (``torchao.dtypes.nf4tensor``) is another definition: its table is rounded to
fewer digits, and it scales by a second-level int8 quantization of the per-block scalers
rather than bitsandbytes' dynamic map; docs/oracle.md ("QLoRA bases (NF4)") gives the size
of the difference. This module judges bitsandbytes' definition.
"""

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from minilora.oracle.precision import precision

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)  # (16,) bitsandbytes' get_4bit_type("nf4"), sorted, c[7] = 0
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # quantize_4bit's allowed sizes
ABSMAX_BLOCKSIZE = 256  # double quantization's blocks of absmax
_TINY = np.float32(1e-38)  # the clamp on a block's absmax before dividing by it


def dynamic_map():
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``), float32, sorted.

    Returns
    -------
    d : (256,) float32
        For exponent level i = 0..6, the 2^i midpoints of a float32 ``linspace(0.1, 1, 2^i + 1)``
        times fl32(10^(i−6)), with their negatives, then 0 and 1, sorted.
    """
    f = np.float32
    data = [f(0.0), f(1.0)]
    for i in range(7):
        k = 2**i + 1
        step = f((f(1.0) - f(0.1)) / f(k - 1))
        j = np.arange(k)
        bounds = np.where(j < k // 2, np.float64(f(0.1)) + np.float64(step) * j,
                          np.float64(f(1.0)) - np.float64(step) * (k - 1 - j)).astype(f)  # (k,)
        means = (bounds[:-1] + bounds[1:]) / f(2)  # (k − 1,) float32
        level = f(10.0 ** (i - 6)) * means  # (k − 1,) float32
        data += list(level) + list(-level)
    return np.sort(np.array(data, dtype=np.float32))  # (256,)


@dataclass(frozen=True)
class NF4Weight:
    """A weight as bitsandbytes stores it in NF4 (``Params4bit.data`` + its ``QuantState``).

    Attributes
    ----------
    codes : (⌈n/2⌉,) uint8
        Two 4-bit indices per byte, element 2k in the high nibble, 2k+1 in the low one
        (bitsandbytes holds it as (⌈n/2⌉, 1)); an odd n pads the last low nibble with 7 (c = 0).
    absmax : (n_blocks,) float32, or uint8 with double quantization
        Each block's absmax, or its 8-bit index into ``dynamic_map()`` (``QuantState.absmax``).
    shape : tuple of int
        The weight's shape (n = its product); row-major order.
    blocksize : int
        One of ``BLOCKSIZES``.
    absmax_absmax : (⌈n_blocks/256⌉,) float32 or None
        With double quantization: each block of 256 absmax's own absmax (``state2.absmax``).
    offset : numpy.float32 or None
        With double quantization: the mean μ of the absmax (``QuantState.offset``).
    """

    codes: np.ndarray
    absmax: np.ndarray
    shape: tuple
    blocksize: int = 64
    absmax_absmax: np.ndarray | None = None
    offset: np.float32 | None = None

    def __post_init__(self):
        check_nf4_weight(self)

    @property
    def double_quant(self):
        return self.offset is not None

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_blocks(self):
        return -(-self.size // self.blocksize)

    @property
    def absmax_dtype(self):
        """The dtype bitsandbytes stores ``QuantState.absmax`` in: float32, or uint8 nested."""
        return self.absmax.dtype


def check_nf4_weight(q):
    """ValueError naming the field unless ``q`` is a consistent NF4Weight."""
    if not isinstance(q.shape, tuple) or not all(isinstance(s, (int, np.integer)) and s >= 0
                                                  for s in q.shape):
        raise ValueError(f"NF4Weight.shape must be a tuple of non-negative ints, got {q.shape!r}")
    _check_blocksize(q.blocksize, "NF4Weight.blocksize")
    n = q.size
    _check_array(q.codes, "NF4Weight.codes", np.uint8, ((n + 1) // 2,))
    if q.double_quant:
        _check_array(q.absmax, "NF4Weight.absmax (double quantized)", np.uint8, (q.n_blocks,))
        _check_array(q.absmax_absmax, "NF4Weight.absmax_absmax", np.float32,
                     (-(-q.n_blocks // ABSMAX_BLOCKSIZE),))
        if not isinstance(q.offset, np.float32) or not np.isfinite(q.offset):
            raise ValueError(f"NF4Weight.offset must be a finite numpy.float32, got {q.offset!r}")
    else:
        if q.absmax_absmax is not None:
            raise ValueError("NF4Weight.absmax_absmax is given without an offset: double "
                             "quantization needs both")
        _check_array(q.absmax, "NF4Weight.absmax", np.float32, (q.n_blocks,))
    if q.absmax.dtype == np.float32 and not np.all(np.isfinite(q.absmax) & (q.absmax >= 0)):
        raise ValueError("NF4Weight.absmax must be finite and non-negative")
    if q.absmax_absmax is not None and not np.all(np.isfinite(q.absmax_absmax)
                                                  & (q.absmax_absmax >= 0)):
        raise ValueError("NF4Weight.absmax_absmax must be finite and non-negative")


def _check_blocksize(blocksize, name):
    if not (isinstance(blocksize, (int, np.integer)) and not isinstance(blocksize, bool)
            and blocksize in BLOCKSIZES):
        raise ValueError(f"{name} must be one of {BLOCKSIZES} (an int), got {blocksize!r}")


def _check_array(a, name, dtype, shape):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")


def quantize_nf4(W, blocksize=64, double_quant=False):
    """W in NF4, as bitsandbytes' ``quantize_4bit(W, blocksize, compress_statistics=double_quant,
    quant_type="nf4")`` stores it (see the module docstring for every rounding).

    Parameters
    ----------
    W : (...) float32 or float16 array (float64 only if every value is a float32), finite
    blocksize : int, one of BLOCKSIZES
    double_quant : bool
        Quantize the absmax too (8-bit, blocks of 256, around their mean).

    Returns
    -------
    NF4Weight
    """
    W = _check_weight(W)
    _check_blocksize(blocksize, "blocksize")
    flat = W.reshape(-1).astype(np.float32)  # (n,) a copy: W is never modified
    n = flat.size
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)  # (n // blocksize, blocksize)
    absmax = np.abs(blocks).max(axis=1, initial=np.float32(0))  # (n // blocksize,) float32
    scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, _TINY))[:, None],
                     np.float32(-1), np.float32(1)).reshape(-1)  # (full,) x · (1/a), float32
    if n > full:  # the shorter last block: x / a, and the clamped a is stored
        last = np.maximum(np.abs(flat[full:]).max(), _TINY)  # () float32
        absmax = np.append(absmax, last).astype(np.float32)  # (n_blocks,)
        scaled = np.append(scaled, np.clip(flat[full:] / last, np.float32(-1), np.float32(1)))
    if n % 2:
        scaled = np.append(scaled, np.float32(0))  # (n + 1,) the pad, code 7
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)  # (15,) float32
    q = np.searchsorted(midpoints, scaled.astype(np.float32), side="left").astype(np.uint8)
    #   (n or n + 1,): midpoints strictly below the value; on a midpoint, the lower code
    codes = (q[0::2] << 4) | q[1::2]  # (⌈n/2⌉,) high nibble first
    if not double_quant:
        return NF4Weight(codes, absmax, tuple(int(s) for s in W.shape), blocksize)
    offset = np.float32(np.mean(absmax, dtype=np.float64)) if absmax.size else np.float32(0)
    p, absmax_absmax = quantize_blockwise(absmax - offset, ABSMAX_BLOCKSIZE)
    return NF4Weight(codes, p, tuple(int(s) for s in W.shape), blocksize, absmax_absmax, offset)


def quantize_blockwise(a, blocksize=ABSMAX_BLOCKSIZE):
    """bitsandbytes' 8-bit blockwise quantization with the dynamic map (its CPU kernel).

    Parameters
    ----------
    a : (n,) float32, finite
    blocksize : int

    Returns
    -------
    p : (n,) uint8
        Indices into ``dynamic_map()``.
    a2 : (⌈n/blocksize⌉,) float32
        Each block's absmax.

    Notes
    -----
    v = fl32(a_i / a2_k); p_i = the largest j with d'_j ≤ v (d' the map with d'_0 = −1), plus
    one if |v − d_{j+1}| < |v − d_j| in float32. A block with a2 = 0 gets the index of 0.
    """
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 1):
        raise ValueError(f"a must be a 1-D float32 array, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if not np.all(np.isfinite(a)):
        raise ValueError("a has NaN or infinite values")
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) \
            or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    d = dynamic_map()  # (256,)
    search = d.copy()  # (256,)
    search[0] = np.float32(-1)  # the CPU kernel's d'_0 (so that v = −1 finds index 0)
    n = a.size
    a2 = np.array([np.abs(a[k:k + blocksize]).max() for k in range(0, n, blocksize)],
                  dtype=np.float32)  # (⌈n/blocksize⌉,)
    scale = np.repeat(a2, blocksize)[:n]  # (n,)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = a / scale  # (n,) float32
    j = np.clip(np.searchsorted(search, v, side="right") - 1, 0, 255)  # (n,)
    up = np.minimum(j + 1, 255)  # (n,)
    left = np.abs(v - search[j])  # (n,) float32
    right = np.abs(v - search[up])  # (n,) float32
    p = np.where((j < 255) & (right < left), up, j)  # (n,)
    p = np.where(scale == 0, int(np.flatnonzero(d == 0)[0]), p).astype(np.uint8)  # (n,)
    return p, a2


def dequantize_absmax(q):
    """The float32 absmax every kernel scales by: ``q.absmax``, or with double quantization
    a_b = fl32(fl32(d[p_b] · a2_k(b)) + μ) (bitsandbytes' ``dequantize_blockwise`` + offset).

    Returns
    -------
    a : (n_blocks,) float32
    """
    if not q.double_quant:
        return q.absmax.copy()  # (n_blocks,)
    d = dynamic_map()  # (256,)
    a2 = np.repeat(q.absmax_absmax, ABSMAX_BLOCKSIZE)[:q.n_blocks]  # (n_blocks,)
    return (d[q.absmax] * a2 + q.offset).astype(np.float32)  # (n_blocks,) float32 steps


def unpack_codes(q):
    """The 4-bit indices, one per value: element 2k from byte k's high nibble.

    Returns
    -------
    idx : (n,) uint8, each in 0..15
    """
    idx = np.empty(2 * q.codes.size, dtype=np.uint8)  # (2·⌈n/2⌉,)
    idx[0::2] = q.codes >> 4
    idx[1::2] = q.codes & 0x0F
    return idx[:q.size]  # (n,)


def dequantize_nf4(q):
    """The weight an NF4Weight stands for, exactly: W_i = c[q_i] · a_b(i) in float64.

    Parameters
    ----------
    q : NF4Weight

    Returns
    -------
    W : q.shape float64
        Exact (c and a are float32, their product fits float64); bitsandbytes' float32
        dequantization is fl32(W), its bf16 or fp16 one the float32 result rounded again.
    """
    check_nf4_weight(q)
    a = dequantize_absmax(q).astype(np.float64)  # (n_blocks,)
    c = NF4_CODE.astype(np.float64)[unpack_codes(q)]  # (n,)
    scale = np.repeat(a, q.blocksize)[:q.size]  # (n,)
    return (c * scale).reshape(q.shape)  # q.shape


def honest_weight(q, dtype):
    """The dequantized W as a real kernel holds it in the compute precision ``dtype``: the
    float32 product fl32(c[q] · a) (bitsandbytes' kernels multiply in float32), then rounded to
    ``dtype`` (bf16, fp16, tf32, fp32 or fp64; fp64 keeps the exact W). The judge's honest
    baseline model for an NF4 case.

    Returns
    -------
    W_p : q.shape float64
    """
    prec = precision(dtype)
    W = dequantize_nf4(q)  # q.shape float64, exact
    if prec.name == "fp64":
        return W
    return prec.round(W.astype(np.float32)).astype(np.float64)  # q.shape


def _check_weight(W):
    if not isinstance(W, np.ndarray):
        raise ValueError(f"W must be a numpy array, got {type(W).__name__}")
    if W.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"W must be float16, float32 or float64 (bitsandbytes quantizes "
                         f"16/32-bit floats), got {W.dtype}")
    if not np.all(np.isfinite(W)):
        raise ValueError("W has NaN or infinite values: NF4 cannot store them")
    if W.dtype == np.float64 and not np.array_equal(W.astype(np.float32), W):
        raise ValueError("W is float64 with values float32 cannot hold: bitsandbytes quantizes "
                         "a float32 (or 16-bit) tensor; round it to float32 first")
    return W


class NF4Case(NamedTuple):
    """An oracle case whose base weight is NF4: ``case.tensors["W"]`` is
    ``dequantize_nf4(weight)`` (float64, exact); ``weight`` holds the codes and scales."""

    case: object  # minilora.oracle.Case
    weight: NF4Weight


def make_nf4_case(*, blocksize=64, double_quant=False, **make_case_args):
    """A case drawn as ``make_case(**make_case_args)`` draws it, whose base weight W is then
    quantized to NF4 in its stored layout ((d_out, d_in), or (d_in, d_out) with
    fan_in_fan_out; an fp64 case's W is rounded to float32 first, as bitsandbytes quantizes
    16/32-bit floats) and replaced by its exact float64 dequantization.

    The other inputs stay rounded to the case's precision; W is not representable in it (nor
    in float32): an honest kernel holds ``honest_weight(weight, dtype)``, which
    ``honest_case`` puts in the case for the judge's baseline. DoRA's magnitude m is drawn from
    the unquantized W's row norms (it is a trained magnitude: any positive values serve). A
    lora_only case's W = 0 quantizes to 0 exactly. Fused blocks are refused.

    Returns
    -------
    NF4Case
    """
    from minilora.oracle.cases import make_case

    if make_case_args.get("block") is not None:
        raise ValueError("make_nf4_case takes no block: NF4 bases are single-layer cases")
    case = make_case(**make_case_args)
    weight = quantize_nf4(case.tensors["W"].astype(np.float32), blocksize, double_quant)
    tensors = {**case.tensors, "W": dequantize_nf4(weight)}  # W: float64, exact
    layer = {**case.layer, "base": "nf4", "blocksize": blocksize,
             "double_quant": bool(double_quant)}
    return NF4Case(dataclasses.replace(case, tensors=tensors, layer=layer), weight)


def honest_case(case, dtype):
    """The case with W as an honest kernel at ``dtype`` holds it (``honest_weight``): what the
    judge's baseline and random runs should start from for an NF4 case.

    ``case`` is an NF4Case, or a Case whose W is an exact NF4 dequantization (one read back
    from a file: W = c·a exactly, so fl32(W) is the kernels' float32 product and
    p(fl32(W)) = ``honest_weight`` without the codes)."""
    if isinstance(case, NF4Case):
        case, weight = case
        W = honest_weight(weight, dtype)  # W's shape
    else:
        prec = precision(dtype)
        W = case.tensors["W"].astype(np.float64)  # W's shape
        if prec.name != "fp64":
            W = prec.round(W.astype(np.float32)).astype(np.float64)  # W's shape
    return case.with_tensors({**case.tensors, "W": W})
