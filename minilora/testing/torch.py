"""Judge a PyTorch LoRA implementation in-process: no files, no adapters to write.

    from minilora.testing.torch import torch_outputs, assert_torch_matches

    def my_lora(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None):
        ...                                        # any torch code, or MyFunction.apply(...)
        return y

    case = ml.oracle.make_case(d_in=64, d_out=48, r=8, dropout=0.1, bias=True, dtype="bf16")
    assert_torch_matches(my_lora, case, dtype="bf16")     # AssertionError with the report

The harness builds the case's tensors at the dtype, with x, A and B (and m for DoRA) requiring
grad (W and bias too with ``need_dW``/``need_dbias``), calls ``fn``, runs the backward with the
case's dy and returns every output and gradient as float64 NumPy arrays, which the oracle judges
(``minilora.oracle.compare``). W is handed over as (d_out, d_in) whatever the case's layout (a
Conv1D case's W is transposed for ``fn``, and its dW transposed back), the dropout mask as the
multiplier on the LoRA branch's input (0 or 1/(1 − p)). Needs ``pip install minilora[torch]``.

A QLoRA case (``make_case(base="nf4")``) hands ``fn`` its W as kernels hold it: the float32
dequantization fl32(c[q]·a) rounded to the dtype (``minilora.oracle.nf4.honest_weight``). A
kernel that dequantizes inside, as unsloth's do, asks for the 4-bit weight itself by naming a
keyword ``W_4bit`` in its signature:

    def my_qlora(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None, W_4bit=None):
        W = bitsandbytes.functional.dequantize_4bit(W_4bit, W_4bit.quant_state)  # (d_out, d_in)
        ...

``W_4bit`` is a ``bitsandbytes.nn.Params4bit`` built from the case's own codes and absmax
(``params4bit``), so that bitsandbytes dequantizes it to exactly the W above; None for a case
whose base is not quantized. A fn without that keyword is called as before.
"""

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from minilora.oracle import OracleInputError, compare
from minilora.oracle.kinds import LINEAR, MLP, QKV
from minilora.oracle.precision import precision
from minilora.testing._harness import (
    check_returned,
    dtype_map,
    fn_inputs,
    named_outputs,
    oracle_case,
    precision_name,
)

TORCH_DTYPES = dtype_map(torch.bfloat16, torch.float16, torch.float32, torch.float64)


def resolve_device(device, owner=None):
    """The torch device to build tensors on: ``device``, else the device of ``owner``'s first
    parameter (a module, or the module a bound method belongs to), else "cpu". Refuses a
    device torch does not have here and one whose tensors cannot be read back ("meta")."""
    if device is None:
        module = owner if isinstance(owner, torch.nn.Module) else getattr(owner, "__self__", None)
        params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
        device = params[0].device if params else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device: {e}") from None
    if dev.type == "meta":
        raise ValueError("device='meta' holds no values: the outputs could not be read back "
                         "to be judged; choose a device with storage ('cpu', 'cuda')")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(dev)!r}: torch sees no CUDA device on this machine "
                         f"(torch.cuda.is_available() is False; torch {torch.__version__})")
    try:
        probe = torch.ones(1, device=dev)
        probe.cpu().numpy()
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        raise ValueError(f"device={str(dev)!r} cannot be used here: tensors cannot be made "
                         f"there and read back ({type(e).__name__}: {e})") from None
    return dev


QUANTIZED_KEYWORD = "W_4bit"  # the keyword through which fn asks for the 4-bit base weight


def params4bit(weight, dtype="bf16", device="cpu"):
    """An NF4 weight as bitsandbytes holds it: a ``bitsandbytes.nn.Params4bit`` whose
    ``quant_state`` is built from the weight's own codes and scales, so that
    ``bitsandbytes.functional.dequantize_4bit(P, P.quant_state)`` gives
    ``nf4.honest_weight(weight, dtype)`` (at tf32: float32, fl32(c[q]·a), which a tf32 matmul
    rounds itself), as ``torch_outputs`` checks before handing it to a kernel.

    Parameters
    ----------
    weight : ``minilora.oracle.nf4.NF4Weight``, or a Case whose ``.base`` is one
    dtype : the dequantization's dtype, ``quant_state.dtype`` ("bf16", "fp16", "tf32" or
        "fp32"; bitsandbytes dequantizes to 16/32-bit floats only)
    device : where the codes and the state are built

    Returns
    -------
    P : Params4bit, data (⌈n/2⌉, 1) uint8 (the codes, high nibble first), ``P.quant_state``:
        absmax (n_blocks,) float32, or with double quantization uint8 indices with ``offset``
        (μ) and ``state2`` (absmax_absmax, the dynamic map, blocks of 256); shape, blocksize,
        quant_type "nf4", dtype; ``P.blocksize``, ``P.compress_statistics``, ``P.quant_type``.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from minilora.oracle.nf4 import NF4Weight, check_nf4_weight

    q = getattr(weight, "base", weight)
    if not isinstance(q, NF4Weight):
        raise ValueError(f"params4bit takes an NF4Weight or a Case with an NF4 base (make_case("
                         f"base='nf4')), got {type(weight).__name__}"
                         + (" whose base is None" if hasattr(weight, "base") else ""))
    check_nf4_weight(q)
    name = precision(dtype).name
    if name == "fp64":
        raise ValueError("params4bit: bitsandbytes dequantizes to bf16, fp16 or fp32 only, "
                         "not fp64 (an fp64 case's W is the exact float64 c[q]·a, which no "
                         "bitsandbytes dequantization gives); judge the kernel at fp32")
    dev = torch.device(device)

    def host(a):
        return torch.from_numpy(np.array(a)).to(dev)  # a copy: the weight is never aliased

    nested = {}
    if q.double_quant:
        state2 = F.QuantState(absmax=host(q.absmax_absmax),
                              code=F.create_dynamic_map().to(dev),
                              blocksize=256, dtype=torch.float32)  # bitsandbytes' state2
        nested = {"offset": host(np.float32(q.offset)), "state2": state2}
    state = F.QuantState(absmax=host(q.absmax), shape=torch.Size(q.shape),
                         code=F.get_4bit_type("nf4", device=dev), blocksize=q.blocksize,
                         quant_type="nf4", dtype=TORCH_DTYPES[name], **nested)
    return bnb.nn.Params4bit(host(q.codes.reshape(-1, 1)), requires_grad=False,
                             quant_state=state, blocksize=q.blocksize,
                             compress_statistics=q.double_quant, quant_type="nf4",
                             bnb_quantized=True)  # (⌈n/2⌉, 1) uint8, as quantize_4bit packs


def _takes_keyword(fn, name):
    """Whether ``fn``'s signature names a parameter ``name`` it can take by keyword."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    p = parameters.get(name)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _quantized_weight(case, name, dev, need_dW):
    """The Params4bit ``fn`` asked for through ``W_4bit`` (None for a float base), refused
    with the reason where it could not stand for the case's W."""
    if case.layer.get("base") != "nf4":
        return None
    why = None
    if case.base is None:
        why = ("the case has no codes and scales (case.base is None: a case read back from a "
               "file keeps only its exact W); draw it with make_case(base='nf4')")
    elif case.fan_in_fan_out:
        why = ("the case's W was quantized in the Conv1D layout (d_in, d_out); bitsandbytes "
               "holds a 4-bit weight as (d_out, d_in): draw it with fan_in_fan_out=False")
    elif name == "fp64":
        why = ("bitsandbytes dequantizes to bf16, fp16 or fp32, never to the exact float64 "
               "W an fp64 case holds: judge the kernel at fp32")
    elif need_dW:
        why = "need_dW: a quantized base is frozen, its W_4bit has no gradient"
    if why is not None:
        raise OracleInputError(f"fn takes {QUANTIZED_KEYWORD}, which cannot be given: {why}")
    try:
        import bitsandbytes
        import bitsandbytes.functional as F
    except ImportError as e:
        raise OracleInputError(f"fn takes {QUANTIZED_KEYWORD}, a bitsandbytes Params4bit, but "
                               f"bitsandbytes does not import here ({e}): pip install "
                               f"bitsandbytes") from None
    from minilora.oracle.nf4 import honest_weight

    P = params4bit(case.base, name, dev)
    got = _numpy(F.dequantize_4bit(P, P.quant_state))  # q.shape, what bitsandbytes gives here
    want = honest_weight(case.base, "fp32" if name == "tf32" else name)  # q.shape float64,
    #   the case's W as the kernel reads it (tf32: float32, which the tf32 matmul rounds)
    if got.shape != want.shape:  # a 2-value weight comes back transposed (a compat shim)
        how = f"a {got.shape} array, not the case's {want.shape}"
    else:
        bad = got != want  # q.shape
        how = (f"{int(bad.sum())} of {want.size} entries differ, by up to "
               f"{np.max(np.abs(got - want)):.3g}")
    if got.shape != want.shape or bad.any():
        known = ""
        if dev.type == "cpu" and got.shape == want.shape and \
                case.base.shape[-1] % case.base.blocksize:
            known = (f" (its CPU kernel's vectorized path indexes the absmax row by row, "
                     f"wrong when a row's {case.base.shape[-1]} values are not a multiple of "
                     f"the blocksize {case.base.blocksize}: draw the case with d_in a multiple "
                     f"of {case.base.blocksize})")
        raise OracleInputError(
            f"fn takes {QUANTIZED_KEYWORD}, but bitsandbytes {bitsandbytes.__version__}'s "
            f"dequantize_4bit on {dev} does not give this case's W from it: {how}{known}; a "
            f"kernel dequantizing with it would be judged on a wrong W")
    return P


def _numpy(t):
    """A tensor (on any device) as float64 NumPy on the host."""
    return t.detach().to("cpu", torch.float64).numpy()


def torch_outputs(fn, case, dtype=None, *, need_dW=False, need_dbias=False, device=None):
    """Run ``fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None) -> y`` on a case.

    Parameters
    ----------
    fn : a torch callable (a function, a module's forward, ``autograd.Function.apply`` wrapped)
    case : a ``minilora.oracle.Case`` or a ``minilora.testing.LoRACase``
    dtype : "bf16", "fp16", "fp32", "fp64" (or an alias); default the case's precision
    need_dW, need_dbias : also make W (and bias) require grad and return dW (dbias)
    device : where the tensors are built and fn runs ("cpu", "cuda", "cuda:1", a
        ``torch.device``); default the device of fn's module when fn is one (or a bound method
        of one), else "cpu". "meta" and a device torch does not have raise ValueError.

    A QLoRA case (``make_case(base="nf4")``): W is handed over as kernels hold it,
    p(fl32(c[q]·a)) (``nf4.honest_weight``); when fn's signature names a keyword ``W_4bit``,
    it also receives the base as bitsandbytes stores it, a ``bitsandbytes.nn.Params4bit``
    from the case's codes and absmax (``params4bit``; ``quant_state.dtype`` the dtype), so a
    kernel that dequantizes inside (``dequantize_4bit(W_4bit, W_4bit.quant_state)``, unsloth's
    pattern) is judged as it runs. ``W_4bit`` is None for a float base. Before handing it over
    the harness dequantizes it with bitsandbytes on the device and refuses (OracleInputError)
    when that is not exactly the case's W: bitsandbytes 0.50.2's CPU kernel gets a weight of
    several rows wrong when their length is a multiple of 16 but not of the blocksize
    (docs/oracle.md, "QLoRA bases (NF4)", gives the measured condition). Also
    refused: fp64 (bitsandbytes dequantizes to 16/32-bit floats), a Conv1D-layout case
    (bitsandbytes holds (d_out, d_in)), ``need_dW``, a case read back from a file (no codes),
    bitsandbytes not installed.

    Returns
    -------
    dict of float64 host arrays: "y", "dx", "dA", "dB", and "dm" for DoRA, "dW", "dbias" when
    asked for (block cases: the names of ``minilora.oracle.block_cases``); a gradient torch
    left as None (fn did not use that input) is returned as zeros.
    """
    case = oracle_case(case)
    tdt = TORCH_DTYPES[precision_name(case, dtype)]
    dev = resolve_device(device, fn)
    given = fn_inputs(case, dtype)  # a QLoRA case's W in float32 below fp64

    def tensor(a, grad=False):
        if a is None:
            return None
        if isinstance(a, list):
            return [tensor(v, grad) for v in a]
        if a.dtype.kind != "f":
            return torch.from_numpy(a).to(dev)
        return torch.from_numpy(a).to(dev, tdt).requires_grad_(grad)

    x, A, B = tensor(given["x"], True), tensor(given["A"], True), tensor(given["B"], True)
    W, bias = tensor(given["W"], need_dW), tensor(given["bias"], need_dbias)
    kwargs = dict(given["kwargs"], bias=bias, dropout_mask=tensor(given["dropout_mask"]))
    if _takes_keyword(fn, QUANTIZED_KEYWORD):
        kwargs[QUANTIZED_KEYWORD] = _quantized_weight(case, precision_name(case, dtype), dev,
                                                      need_dW)
    m = tensor(given.get("m"), True)
    if m is not None:
        kwargs["m"] = m
    y = case.kind.call(fn, (x, W, A, B), tensor(given.get("adapter_index")), kwargs)
    ys = case.kind.split(y)  # qkv: P outputs
    if not all(isinstance(v, torch.Tensor) for v in ys):
        raise OracleInputError(f"fn returned {type(y).__name__}, not torch tensors")
    check_returned(ys, given["dys"])
    torch.autograd.backward(ys, [tensor(d).to(v.dtype) for v, d in zip(ys, given["dys"],
                                                                       strict=True)])

    def grad(leaf):
        if leaf is None:
            return None
        if isinstance(leaf, list):
            return [grad(v) for v in leaf]
        return _numpy(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))

    grads = {"x": grad(x), "A": grad(A), "B": grad(B), "m": grad(m),
             "W": grad(W) if need_dW else None, "bias": grad(bias) if need_dbias else None}
    return named_outputs(case, [_numpy(v) for v in ys], grads)


def assert_torch_matches(fn, case, dtype=None, *, accum_dtype=None, need_dW=False,
                         need_dbias=False, device=None):
    """``torch_outputs`` judged by the oracle at ``dtype``: returns the report when every output
    is within tolerance, raises AssertionError carrying the report's table otherwise."""
    case = oracle_case(case)
    outputs = torch_outputs(fn, case, dtype, need_dW=need_dW, need_dbias=need_dbias,
                            device=device)
    report = compare(case, outputs, dtype=dtype, accum_dtype=accum_dtype)
    if not report.passed:
        raise AssertionError("the torch implementation does not match the float64 reference:\n"
                             + str(report))
    return report


# -- a whole model --------------------------------------------------------------------------------

@dataclass
class LayerVerdict:
    """One judged module or block of a model."""

    name: str  # the module's name in the model (the attention or MLP module for a block)
    block: str  # "linear", "qkv" or "mlp"
    passed: bool
    worst: tuple  # (rule, ratio, output): the tensor closest to failing (or failing worst)
    report: object  # the oracle's Report for this module


@dataclass
class ModelReport:
    """``check_model``'s verdict: a row per judged module and what could not be judged."""

    dtype: str
    layers: list = field(default_factory=list)  # LayerVerdict rows, in the model's order
    not_judged: list = field(default_factory=list)  # (name, why)

    @property
    def passed(self):
        """Every LoRA'd module was judged, and passed."""
        return bool(self.layers) and not self.not_judged and all(r.passed for r in self.layers)

    @property
    def failed(self):
        """The names of the modules that were judged and failed."""
        return [r.name for r in self.layers if not r.passed]

    def __str__(self):
        rows = [("module", "block", "worst output", "rule", "used", "verdict")]
        rows += [(r.name, r.block, r.worst[2], r.worst[0], f"{r.worst[1]:.3g}",
                  "pass" if r.passed else "FAIL") for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"check_model at {self.dtype}: {len(self.layers)} modules judged, "
                 f"{len(self.failed)} failed, {len(self.not_judged)} not judged"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]
        lines += [f"not judged: {name}: {why}" for name, why in self.not_judged]
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


ACTIVATION_NAMES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu",
                    "GELU": "gelu", "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh",
                    "NewGELUActivation": "gelu_tanh", "GELUTanhActivation": "gelu_tanh"}


def _activation(act):
    name = ACTIVATION_NAMES.get(type(act).__name__)
    if isinstance(act, torch.nn.GELU):
        name = "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return name


class _Capture:
    """What one module's hooks saw: per forward call its input and output, per backward its
    dx and dy (detached, on the model's device until judged)."""

    def __init__(self):
        self.forward, self.backward = [], []

    def attach(self, module):
        def on_forward(mod, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()), None)
            self.forward.append((x.detach() if isinstance(x, torch.Tensor) else None,
                                 output.detach() if isinstance(output, torch.Tensor) else None))

        def on_backward(mod, grad_input, grad_output):
            self.backward.append((grad_input[0] if grad_input else None,
                                  grad_output[0] if grad_output else None))

        return [module.register_forward_hook(on_forward, with_kwargs=True),
                module.register_full_backward_hook(on_backward)]

    def problem(self):
        """Why this capture cannot be judged (None when it can)."""
        if not self.forward:
            return ("its forward never ran as a module call (a patched forward computes it "
                    "inside itself), so its input and upstream gradient were not captured")
        if len(self.forward) > 1 or len(self.backward) > 1:
            return f"called {len(self.forward)} times in one forward; one call is judged"
        if not self.backward or self.backward[0][1] is None:
            return "no upstream gradient reached its output in the backward"
        if self.forward[0][0] is None or self.forward[0][1] is None:
            return "its input or output is not a tensor"
        return None


def _host(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _quantized_base(layer):
    """Whether a LoRA layer's base weight is 4-bit (a bitsandbytes ``Params4bit``, as in
    QLoRA), and why it cannot be judged (None when it can): (is_4bit, why)."""
    qs = getattr(getattr(layer.get_base_layer(), "weight", None), "quant_state", None)
    if qs is None:
        return False, None
    from minilora.oracle.nf4 import ABSMAX_BLOCKSIZE, BLOCKSIZES, NF4_CODE, dynamic_map

    if qs.quant_type != "nf4":
        return True, f"a {qs.quant_type} 4-bit base: check_model judges bitsandbytes' NF4"
    if qs.blocksize not in BLOCKSIZES or not np.array_equal(_host(qs.code), NF4_CODE):
        return True, "its 4-bit base's blocksize or code book is not bitsandbytes' NF4"
    if qs.state2 is not None and (qs.state2.blocksize != ABSMAX_BLOCKSIZE or not np.array_equal(
            _host(qs.state2.code), dynamic_map())):
        return True, "its 4-bit base's absmax are quantized otherwise than bitsandbytes' default"
    return True, None


def _nf4_weight(layer):
    """A 4-bit base (``_quantized_base`` True, no reason against) as an NF4Weight on the host:
    the codes (n/2 bytes), absmax, and with double quantization state2's absmax and μ."""
    from minilora.oracle.nf4 import NF4Weight

    weight = layer.get_base_layer().weight
    qs = weight.quant_state
    nested = qs.state2 is not None
    return NF4Weight(weight.data.detach().view(torch.uint8).cpu().numpy().reshape(-1).copy(),
                     qs.absmax.detach().cpu().numpy().copy(), tuple(int(v) for v in qs.shape),
                     int(qs.blocksize),
                     qs.state2.absmax.detach().cpu().numpy().copy() if nested else None,
                     np.float32(qs.offset.item()) if nested else None)


def _lora_parts(layer, adapter, base_nf4=None):
    """(W, A, B, bias, m, scaling) of a PEFT LoRA Linear's adapter, float64 on the host; with
    ``base_nf4`` (the layer's 4-bit base as an NF4Weight) W is its exact dequantization."""
    from minilora.oracle.nf4 import dequantize_nf4

    base = layer.get_base_layer()
    m = None
    if layer.use_dora.get(adapter, False):
        m = _host(layer.lora_magnitude_vector[adapter].weight).reshape(-1)
    bias = getattr(base, "bias", None)
    W = _host(base.weight) if base_nf4 is None else dequantize_nf4(base_nf4)  # (d_out, d_in)
    return (W, _host(layer.lora_A[adapter].weight),
            _host(layer.lora_B[adapter].weight), _host(bias), m, float(layer.scaling[adapter]))


def _mask(layer, adapter, dropouts, shape):
    """The dropout mask the layer's LoRA branch used (0 or 1/(1 − p) in the model's dtype),
    as (mask, None), or (None, why-not); (None, None) when the layer applies no dropout."""
    drop = layer.lora_dropout[adapter]
    if not isinstance(drop, torch.nn.Dropout) or drop.p == 0 or not drop.training:
        return None, None
    calls = dropouts.get(id(drop), [])
    if len(calls) != 1:
        return None, f"its dropout module ran {len(calls)} times: the mask is not known"
    mask = _host(calls[0])
    if mask.shape != tuple(shape):
        return None, f"its dropout ran on {mask.shape}, not on its input's {tuple(shape)}"
    return mask, None  # (..., d_in)


def check_model(model, batch, loss_fn=None, dtype="bf16", device=None):
    """Judge every LoRA'd module of a PEFT model as it runs: the user's forward and backward,
    their kernels in place, captured with hooks and judged against the float64 reference.

    Parameters
    ----------
    model : a PEFT model (``peft.get_peft_model``), its forwards patched or not
    batch : dict for ``model(**batch)`` (tensors are moved to the device)
    loss_fn : loss_fn(output) -> scalar tensor; default ``output.loss``
    dtype : the precision the model computes in ("bf16", "fp16", "fp32", "fp64")
    device : where the model is (default: its parameters' device); the model is never moved

    Returns
    -------
    ModelReport: ``.passed``, ``.layers`` (rows: name, block, passed, worst), ``.not_judged``.

    Notes
    -----
    Units: a module with ``gate_proj``, ``up_proj``, ``down_proj`` all LoRA'd (and a known
    ``act_fn``) is judged as the ``mlp`` block at its own boundary (y = down(act(gate x) ⊙
    up x)); ``q_proj``, ``k_proj``, ``v_proj`` all LoRA'd and fed the same input as the
    ``qkv`` block (dx summed over the three); every other LoRA Linear as a linear layer. Each
    unit's input x, output y, upstream dy and dx come from module hooks, A's and B's (and m's)
    gradients from the parameters after the backward (their ``.grad`` is restored afterwards);
    each unit's float64 case is built on the host one at a time. What a hook cannot see is
    reported as not judged with the reason, never guessed. The input embeddings' output is
    made to require grad during the run so that the first layer's dx is computed too, and each
    LoRA dropout's mask is drawn by a hook (its output is input ⊙ mask, keep ~ Bernoulli(1 − p),
    the same distribution as torch's) so that the mask is known at every entry, zeros of the
    input included. A QLoRA base (a bitsandbytes ``Params4bit``, NF4) is read back from its
    ``quant_state`` and its module judged as an NF4 case (W the exact dequantization of the
    codes and absmax), always as a linear layer; another 4-bit format is not judged.
    """
    import peft

    from minilora.oracle import Case
    from minilora.oracle.precision import precision

    prec = precision(dtype)
    params = list(model.parameters())
    dev = resolve_device(device if device is not None else
                         (params[0].device if params else "cpu"))
    if params and any(p.device != dev for p in params):
        raise ValueError(f"the model's parameters are on {params[0].device}, not on {dev}: "
                         f"check_model never moves a model (move it, or pass its device)")
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict for model(**batch), got {type(batch).__name__}")
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    named = dict(model.named_modules())
    layers = {n: m for n, m in named.items() if isinstance(m, peft.tuners.lora.LoraLayer)}
    not_judged, units, claimed = [], [], set()
    for name, layer in layers.items():
        if not isinstance(layer, peft.tuners.lora.Linear):
            not_judged.append((name, f"a {type(layer).__name__} LoRA layer: check_model "
                                     f"knows LoRA Linear layers only"))
            claimed.add(name)
        elif len(layer.active_adapters) != 1 or layer.merged or layer.disable_adapters:
            not_judged.append((name, "not exactly one active, unmerged adapter"))
            claimed.add(name)
        elif _quantized_base(layer)[1] is not None:
            not_judged.append((name, _quantized_base(layer)[1]))
            claimed.add(name)
    for name, module in named.items():
        prefix = f"{name}." if name else ""
        for kind in (MLP, QKV):
            members = [prefix + c for c in kind.peft_modules]
            if not all(m in layers and m not in claimed for m in members):
                continue
            adapters = {layers[m].active_adapters[0] for m in members}
            if len(adapters) > 1 or any(layers[m].use_dora.get(layers[m].active_adapters[0])
                                        or _quantized_base(layers[m])[0]
                                        for m in members):
                continue  # judged as linear layers (a block's case holds float bases only)
            activation = None
            if "z" in kind.inputs:  # down takes z = act(gate(x)) ⊙ up(x): the module's act_fn
                activation = _activation(getattr(module, "act_fn", None))
                if activation is None:
                    continue
            units.append((kind, name, members, activation))
            claimed.update(members)
    units += [(LINEAR, n, [n], None) for n in layers if n not in claimed]

    captures = {n: _Capture() for n in named}
    dropouts, handles = {}, []
    watched = {n for kind, name, members, _ in units for n in _boundary(kind, name, members)}
    for n in watched:
        handles += captures[n].attach(named[n])

    def on_dropout(mod, args, output):  # the mask drawn here, so that every entry is known
        if not (isinstance(mod, torch.nn.Dropout) and mod.training and mod.p > 0):
            return None
        keep = torch.rand(args[0].shape, device=args[0].device) >= mod.p  # (..., d)
        mask = (keep / (1.0 - mod.p)).to(args[0].dtype)  # 0 or 1/(1 − p), in the model's dtype
        dropouts.setdefault(id(mod), []).append(mask)
        return args[0] * mask

    for layer in layers.values():
        if isinstance(layer, peft.tuners.lora.Linear):
            handles += [d.register_forward_hook(on_dropout) for d in layer.lora_dropout.values()]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        handles.append(embeddings.register_forward_hook(
            lambda mod, args, output: output.requires_grad_(True)))
    lora_params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in lora_params]
    for p in lora_params:
        p.grad = None
    try:
        output = model(**batch)
        loss = getattr(output, "loss", None) if loss_fn is None else loss_fn(output)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"the loss is {type(loss).__name__}, not a scalar tensor: give "
                             f"batch its labels (output.loss) or pass loss_fn(output) -> scalar")
        loss.backward()
    finally:
        for h in handles:
            h.remove()

    report = ModelReport(prec.name)
    try:
        for kind, name, members, activation in units:
            row = _judge_unit(kind, name, members, activation, layers, captures, dropouts,
                              prec, Case)
            if isinstance(row, LayerVerdict):
                report.layers.append(row)
            else:
                report.not_judged.extend(row)
    finally:
        for p, g in zip(lora_params, saved_grads, strict=True):
            p.grad = g
    report.not_judged = not_judged + report.not_judged
    return report


def _boundary(kind, name, members):
    """The modules whose hooks carry a unit's x and dy: each projection where each has its own
    output and dy (qkv), else the unit's own module (the MLP, or the single layer)."""
    return members if kind.dy_each else [name]


def _judge_unit(kind, name, members, activation, layers, captures, dropouts, prec, Case):
    """One unit's case from its captures, judged: a LayerVerdict, or [(name, why)]."""
    from minilora.oracle import compare

    boundary = _boundary(kind, name, members)
    for n in boundary:
        why = captures[n].problem()
        if why is not None:
            if kind.separable:  # judge each projection alone where its hooks fired
                return [(n, f"{why}")] if len(boundary) == 1 else _qkv_fallback(
                    members, layers, captures, dropouts, prec, Case)
            return [(n, why)]
    parts, masks, grads = [], [], []
    base_nf4 = None  # blocks hold float bases only
    if kind.nf4_base and _quantized_base(layers[name])[0]:
        try:
            base_nf4 = _nf4_weight(layers[name])
        except ValueError as e:  # NF4Weight's checks: names the field that does not fit
            return [(name, f"its 4-bit base's quant_state is not one NF4 weight: {e}")]
    for n in members:
        layer = layers[n]
        adapter = layer.active_adapters[0]
        parts.append(_lora_parts(layer, adapter, base_nf4))
        grads.append(tuple(_host(p.grad) if p.grad is not None else None
                           for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                                     *([layer.lora_magnitude_vector[adapter].weight]
                                       if layer.use_dora.get(adapter) else []))))
    if any(g is None for gs in grads for g in gs):
        return [(name, "an adapter's parameter received no gradient in the backward")]
    x = _host(captures[boundary[0]].forward[0][0])
    shapes = []
    for j, n in enumerate(members):
        layer = layers[n]
        adapter = layer.active_adapters[0]
        shape = x.shape if kind.inputs[j] == "x" else \
            (*x.shape[:-1], parts[j][0].shape[-1])  # the MLP's z: (..., d_ff)
        mask, why = _mask(layer, adapter, dropouts, shape)
        if why is not None:
            return [(n, why)]
        masks.append(mask)
        shapes.append(shape)
    if any(mk is not None for mk in masks):  # every projection's, ones where it has none
        masks = [np.ones(shape) if mk is None else mk for mk, shape in zip(masks, shapes,
                                                                           strict=True)]
    if not kind.fan_in_fan_out and any(layers[n].fan_in_fan_out for n in members):
        return [(name, "a fan_in_fan_out (Conv1D) block: judged blocks take (d_out, d_in)")]
    inputs = [captures[n].forward[0][0] for n in boundary]
    if kind.separable and not all(i.shape == inputs[0].shape and torch.equal(i, inputs[0])
                                  for i in inputs):
        return _qkv_fallback(members, layers, captures, dropouts, prec, Case)  # (q, k, v
        #   fed different inputs: judged one by one)
    dxs = [captures[n].backward[0][0] for n in boundary]
    dx = None if any(d is None for d in dxs) else sum(map(_host, dxs[1:]), _host(dxs[0]))
    #   (qkv: summed over q, k, v)
    dys = [_host(captures[n].backward[0][1]) for n in boundary]  # (qkv: one per projection)
    W, A, B, bias, m, s = zip(*parts, strict=True)  # one entry per projection
    t = kind.named_inputs(x, dys, W, A, B, bias, m, masks)
    case = Case(t, kind.per_projection(s), bool(layers[members[0]].fan_in_fan_out), True,
                prec.name, block=kind.block, activation=activation or "silu")
    if base_nf4 is not None:  # a QLoRA base: W exact, the judge's honest W p(fl32(W))
        case.layer = {"base": "nf4", "blocksize": base_nf4.blocksize,
                      "double_quant": base_nf4.double_quant}
        case.base = base_nf4
    ys = [_host(captures[n].forward[0][1]) for n in boundary]
    dms = [g[2] if len(g) > 2 else None for g in grads]
    dA, dB = (kind.per_projection([g[i] for g in grads]) for i in (0, 1))
    cand = kind.named_outputs(case, ys, {"x": dx, "A": dA, "B": dB,
                                         "m": kind.per_projection(dms)})
    outputs = None
    if dx is None:
        del cand["dx"]
        outputs = list(cand)  # the input needed no gradient: dx is not judged
    try:
        rep = compare(case, cand, dtype=prec.name, outputs=outputs)
    except OracleInputError as e:
        return [(name, f"its case cannot be judged at {prec.name}: {e}")]
    failing = [v for v in rep.tensors if not v.passed] or rep.tensors
    worst = max(failing, key=lambda v: v.margin)
    return LayerVerdict(name, kind.name, rep.passed, (worst.decided_by, float(worst.margin),
                                                      worst.name), rep)


def _qkv_fallback(members, layers, captures, dropouts, prec, Case):
    """q, k, v judged one by one (their inputs differ, or some hooks never fired)."""
    rows = []
    for n in members:
        row = _judge_unit(LINEAR, n, [n], None, layers, captures, dropouts, prec, Case)
        rows.extend(row if isinstance(row, list) else [row])
    return rows
