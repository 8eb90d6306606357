"""The kinds of oracle case, one object each: a single LoRA or DoRA layer and the fused blocks
of ``minilora.ops.blocks``. Whatever differs between them is here, so the oracle and the harnesses
ask ``case.kind`` instead of testing ``case.block``.

    kind     inputs                                              outputs
    linear   x W A B (bias m dropout_mask) dy                    y dx dA dB (dm dbias dW)
    qkv      x, W.j A.j B.j (bias.j dropout_mask.j) dy.j         y.j dx dA.j dB.j (dW.j dbias.j)
    mlp      x, W.j A.j B.j (bias.j dropout_mask.j) dy           y dx dA.j dB.j (dW.j dbias.j)
    multi    x, W (bias dropout_mask) A.k B.k adapter_index dy   y dx dA.k dB.k (dW dbias)

j = 0 … P−1 the projections (mlp: 0 gate, 1 up, 2 down), k = 0 … K−1 the adapters. A single
layer's scaling is a float, a block's a tuple (one per projection or adapter). Each kind:

    check_options, draw, drawn       a drawn case's options, tensors and scaling, and record
                                     (``cases.make_case``)
    evaluate(case, backend)          every output, in the case's dtype (the reference in float64)
    shapes(case), upstream           every output's shape (and the cotangents'), checking the
                                     case's shapes; required(case): what a candidate must give
    magnitudes(case)                 what its tolerances scale with (``judge``)
    merged_updates(case, t)          the weights an honest kernel may merge the adapters into
    scaling, scalings,               its scaling as the Case holds it, as a tuple, and back
    per_projection                   (any values, one per projection, as this kind holds them)
    scaling_text, read_scaling       its scaling in a file's metadata (``files``), and
    check_names, output_names        the tensor names its files may hold
    fn_inputs, call, split,          the harnesses' wiring (``minilora.testing``): fn's
    named_outputs                    arguments, the call, its outputs, the candidate's names
    inputs, dy_each, separable,      what each projection takes, its cotangents, and its
    peft_modules                     modules in a transformers model (``check_model``, bench)

and a block's ``forward``, ``backward`` (its ``minilora.ops.blocks`` op) and, for qkv and mlp,
``compose(projections, x, act)``: the block built from its projections as callables.
"""

import json
import math

import numpy as np

from minilora.ops import blocks
from minilora.ops._checks import check_dy, check_layer_shapes, check_positive_int
from minilora.ops.blocks import ACTIVATIONS
from minilora.ops.dora import row_norms, trained_magnitude
from minilora.ops.functional import dora_backward, dora_forward, lora_backward, lora_forward
from minilora.oracle import block_cases
from minilora.oracle.block_cases import BLOCKS, indexed, optional
from minilora.oracle.tolerance import dora_magnitudes, lora_magnitudes, lora_reduction_lengths

INPUTS = ("x", "W", "A", "B", "bias", "m", "dropout_mask", "dy")
OUTPUTS = ("y", "dx", "dA", "dB", "dm", "dbias", "dW")
REQUIRED_INPUTS = ("x", "W", "A", "B", "dy")
REQUIRED = ("y", "dx", "dA", "dB")  # every case defines these, DoRA cases dm too
BLOCK_INPUTS = ("x", "W", "A", "B", "bias", "dropout_mask", "dy", "adapter_index")
UNSUFFIXED = ("x", "W", "bias", "dropout_mask", "dy", "adapter_index")  # the rest take ".j"


def _float64(a):
    return None if a is None else np.ascontiguousarray(a, dtype=np.float64)


# -- drawing: every term of every output of comparable size (see ``cases.make_case``) ----------

def _adapter(rng, d_out, d_in, r, W, s):
    """A Kaiming-uniform, B normal, scaled so that ‖s·B A‖ = 1.25·‖W‖ (Frobenius): the LoRA
    terms are the size of the base terms, and a 1×1 layer's W + s·B A is never exactly 0."""
    A = rng.uniform(-1, 1, (r, d_in)) / np.sqrt(d_in)  # (r, d_in)
    B = rng.standard_normal((d_out, r))  # (d_out, r)
    B *= 1.25 * np.linalg.norm(W) / max(np.linalg.norm(s * B @ A), 1e-300)
    return A, B


def _mask(rng, rounded, shape, dropout):
    """A dropout mask, 0 or 1/(1 − p), with both values present (given two entries or more)."""
    keep = rng.random(shape) >= dropout
    if keep.size >= 2:  # both kept and dropped entries, wherever they fall
        keep.flat[rng.choice(keep.size, 2, replace=False)] = (True, False)
    return rounded(keep / (1.0 - dropout))


def _block_scaling(alpha, r, rslora):
    """alpha/r (alpha/√r), moved off |s| = 1, where a scaling applied twice is invisible."""
    s = alpha / (math.sqrt(r) if rslora else r)
    return s if abs(s) != 1.0 else 1.5 * s


class Kind:
    """The defaults the kinds share (the module docstring lists what each one defines)."""

    name = ""
    block = None  # the Case's ``block``: None for a single layer, else ``name``
    ops = ()  # the values of a file's metadata "op"; the first is assumed when it has none
    fan_in_fan_out = False  # whether W may be stored as (d_in, d_out), GPT-2's Conv1D layout
    inputs = ("x",)  # what each projection takes: x, or the MLP's z = act(gate(x)) ⊙ up(x)
    dy_each = False  # a cotangent dy.j per projection's output (qkv), or one dy
    separable = False  # its projections are single layers on one x (qkv): judged one by one
    #   where they turn out not to share x
    peft_modules = ()  # the projections' names in a transformers model, as PEFT targets them
    nf4_base = False  # whether W may be a QLoRA base's exact dequantization (``case.base``)

    def __repr__(self):
        return f"<{self.name} case kind>"

    @property
    def label(self):
        """The kind in a sentence: "a {label}'s tensors"."""
        return self.name

    def op(self, case):
        return self.ops[0]

    def extra_metadata(self, case):
        return {}

    def required(self, case):
        """y (every y.j), dx, and every dA and dB."""
        return tuple(k for k in self.shapes(case) if k.split(".")[0] in REQUIRED)

    def call(self, fn, args, index, kwargs):
        """``fn(x, W, A, B, **kwargs)``, ``args`` = (x, W, A, B)."""
        return fn(*args, **kwargs)

    def split(self, y):
        """fn's result as the list of its outputs."""
        return [y]


class Linear(Kind):
    """One LoRA or DoRA layer: ``ml.lora_forward`` / ``ml.dora_forward``."""

    name = "linear"
    ops = ("lora", "dora")
    fan_in_fan_out = True
    nf4_base = True
    label = "single layer"

    def op(self, case):
        return "dora" if case.dora else "lora"

    # -- the scaling: one float ------------------------------------------------------------
    def scaling(self, value):
        return float(value)

    def scalings(self, scaling):
        return (scaling,)

    def count(self, t):
        return 1

    def scaling_text(self, scaling):
        return repr(scaling)

    def read_scaling(self, text, count):
        try:
            value = float(text)
        except (ValueError, RecursionError):
            value = None
        if value is None or not np.isfinite(value):
            raise ValueError("metadata lacks a finite 'scaling'")
        return value

    # -- tensors ---------------------------------------------------------------------------
    def check_names(self, names):
        """ValueError for a name a case does not hold; returns the missing required ones."""
        unknown = sorted(set(names) - set(INPUTS))
        if unknown:
            raise ValueError(f"unknown tensors {unknown}; a case holds {INPUTS}")
        return [k for k in REQUIRED_INPUTS if k not in names]

    def check_options(self, *, hidden, adapters, **options):
        """``(hidden, adapters)``: a block's options, which a single layer ignores."""
        return hidden, adapters

    def draw(self, rng, rounded, lead, *, d_in, d_out, r, alpha, rslora, dropout, bias,
             fan_in_fan_out, dora, lora_only, **block_options):
        """``(tensors, scaling)``, as ``cases.make_case`` describes them."""
        scaling = alpha / (np.sqrt(r) if rslora else r)
        if abs(scaling) == 1.0:
            raise ValueError(f"alpha={alpha} gives the scaling |s| = 1, where a scaling applied "
                             f"twice or not at all is invisible; choose another alpha")
        W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)  # (d_out, d_in)
        A, B = _adapter(rng, d_out, d_in, r, W, scaling)  # (r, d_in), (d_out, r)
        if lora_only:
            W[...] = 0.0
        t = {"x": rounded(rng.standard_normal((*lead, d_in))),
             "W": rounded(W.T.copy() if fan_in_fan_out else W), "A": rounded(A),
             "B": rounded(B), "dy": rounded(rng.standard_normal((*lead, d_out)))}
        if bias:
            t["bias"] = rounded(0.1 * rng.standard_normal(d_out))
        if dropout > 0:
            t["dropout_mask"] = _mask(rng, rounded, (*lead, d_in), dropout)
        if dora:
            n = row_norms(t["W"].astype(np.float64), t["A"].astype(np.float64),
                          t["B"].astype(np.float64), scaling, fan_in_fan_out)[0]
            t["m"] = rounded(trained_magnitude(n, rng))
        return t, float(scaling)

    def drawn(self, *, lora_only, detach_norm, activation):
        """``(what case.layer records beyond the sizes, the Case's options)`` of a drawn case."""
        return {"lora_only": bool(lora_only)}, {"detach_norm": bool(detach_norm)}

    def evaluate(self, case, backend):
        t = case.tensors
        kw = dict(scaling=case.scaling, bias=t.get("bias"), dropout_mask=t.get("dropout_mask"),
                  fan_in_fan_out=case.fan_in_fan_out, backend=backend)
        need = dict(need_dx=True, need_dW=True, need_dbias="bias" in t)
        if case.dora:
            y, cache = dora_forward(t["x"], t["W"], t["A"], t["B"], t["m"],
                                    detach_norm=case.detach_norm, **kw)
            grads = dora_backward(t["dy"], cache, **need)
        else:
            y, cache = lora_forward(t["x"], t["W"], t["A"], t["B"], **kw)
            grads = lora_backward(t["dy"], cache, **need)
        return {"y": y, **{k: v for k, v in grads._asdict().items() if v is not None}}

    def shapes(self, case):
        t = case.tensors
        _, d_out, _ = check_layer_shapes(t["x"], t["W"], t["A"], t["B"],
                                         fan_in_fan_out=case.fan_in_fan_out, bias=t.get("bias"),
                                         dropout_mask=t.get("dropout_mask"), m=t.get("m"))
        check_dy(t["dy"], t["x"].shape[:-1] + (d_out,), t["dy"].dtype)
        shapes = {"y": t["dy"].shape, "dx": t["x"].shape, "dA": t["A"].shape,
                  "dB": t["B"].shape, "dm": t["m"].shape if "m" in t else None,
                  "dbias": t["bias"].shape if "bias" in t else None, "dW": t["W"].shape}
        return {k: v for k, v in shapes.items() if v is not None}

    def output_names(self, shapes):
        """The names an outputs file may hold (``shapes``: this case's)."""
        return OUTPUTS

    def required(self, case):
        return REQUIRED + (("dm",) if case.dora else ())

    # -- bounds ----------------------------------------------------------------------------
    def magnitudes(self, case):
        """``(mags, K, norm_mags, norm_K)``, see ``judge.magnitudes``."""
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
        norm_mags, _ = dora_magnitudes(*args, detach_norm=case.detach_norm, norm_error=True,
                                       **kw)
        K = {k: v + (0 if k == "dbias" else extra) for k, v in K.items()}  # c = m/n scales all
        # but dbias = Σ dy (dW = (c ⊙ dy)ᵀ x_d + ...)
        K["dm"] = K["y"] + N
        if not case.detach_norm:  # the gradient through n adds W Aᵀ-sized sums to dA, dB, dW
            for k in ("dA", "dB", "dW"):
                K[k] += d_in + d_out + r
        return mags, K, norm_mags, extra

    def merged_updates(self, case, t):
        """{frozen weight's name: [(s, B, A), ...]}: what an honest kernel may merge into it."""
        return {"W": [(case.scaling, t["B"], t["A"])]}

    # -- the harnesses ---------------------------------------------------------------------
    def fn_inputs(self, case):
        t = case.tensors
        W = t["W"].T if case.fan_in_fan_out else t["W"]  # (d_out, d_in)
        return {"x": _float64(t["x"]), "W": _float64(W), "A": _float64(t["A"]),
                "B": _float64(t["B"]), "bias": _float64(t.get("bias")),
                "dropout_mask": _float64(t.get("dropout_mask")), "m": _float64(t.get("m")),
                "dys": [_float64(t["dy"])], "kwargs": {"scaling": case.scaling}}

    def per_projection(self, values):
        """Values, one per projection, as this kind holds them (its scaling, fn's arrays, their
        gradients): a single layer its one value, a block the tuple."""
        return values[0]

    def named_inputs(self, x, dys, W, A, B, bias, m, masks):
        """A case's tensors from lists of one per projection (None where absent), in the case's
        layout: the inverse of ``fn_inputs`` (``check_model`` builds its cases so)."""
        t = {"x": x, "W": W[0], "A": A[0], "B": B[0], "dy": dys[0]}
        return t | {k: v[0] for k, v in (("bias", bias), ("m", m), ("dropout_mask", masks))
                    if v[0] is not None}

    def named_outputs(self, case, ys, grads):
        out = {"dx": grads["x"], "y": ys[0], "dA": grads["A"], "dB": grads["B"]}
        for name in ("m", "W", "bias"):
            if grads.get(name) is not None:
                out["d" + name] = grads[name]
        return out


class _Block(Kind):
    """What the fused blocks share: names with a suffix per projection or adapter, a tuple of
    scalings, no DoRA."""

    def __init__(self, name):
        self.name = self.block = name
        self.ops = (name,)

    def scaling(self, value):
        return tuple(map(float, value))

    def scalings(self, scaling):
        return tuple(scaling)

    def per_projection(self, values):
        return tuple(values)

    def count(self, t):
        """P (projections) or K (adapters)."""
        return len(indexed(t, "A"))

    def scaling_text(self, scaling):
        return json.dumps(list(scaling))

    def read_scaling(self, text, count):
        """A JSON list of ``count`` finite numbers."""
        try:
            value = json.loads(str(text))
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, list) or len(value) != count or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
                for v in value):
            raise ValueError(f"metadata 'scaling' must be a JSON list of {count} finite numbers "
                             f"(one per projection or adapter)")
        return tuple(float(v) for v in value)

    def check_names(self, names):
        unknown = sorted(k for k in names if k.split(".")[0] not in BLOCK_INPUTS
                         or (k.count(".") != (k not in UNSUFFIXED)))
        if unknown:
            raise ValueError(f"unknown tensors {unknown} in a {self.name} case "
                             f"(docs/oracle.md names a block's tensors)")
        return [k for k in ("x", "A.0", "B.0") if k not in names]

    def check_options(self, *, dora, lora_only, fan_in_fan_out, activation, hidden, adapters):
        """ValueError for an option a block does not take; returns ``(hidden, adapters)``."""
        if dora or lora_only or (fan_in_fan_out and not self.fan_in_fan_out):
            raise ValueError(f"a {self.name} case takes neither dora nor lora_only"
                             f"{'' if self.fan_in_fan_out else ' nor fan_in_fan_out'}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        hidden = None if hidden is None else check_positive_int(hidden, "hidden")
        return hidden, check_positive_int(adapters, "adapters")

    def drawn(self, *, lora_only, detach_norm, activation):
        return {"block": self.name}, {"block": self.name, "activation": "silu"}

    def shapes(self, case):
        """Every output's shape, in the canonical order, checking the case's shapes, its
        cotangents' included, on the way (ValueError naming what is wrong)."""
        t = case.tensors
        if self.count(t) < 1 or len(indexed(t, "B")) != self.count(t):
            raise ValueError(f"a {self.name} case needs A.0, B.0, ... with one B.j per A.j")
        shapes = self._shapes(case)
        for name, shape in self.upstream(case, shapes).items():
            if name not in t:
                raise ValueError(f"the case lacks {name}")
            check_dy(t[name], shape, t[name].dtype)
        return shapes

    def upstream(self, case, shapes):
        """The cotangents' shapes: dy's (qkv: every dy.j's)."""
        return {"dy": shapes["y"]}

    def output_names(self, shapes):
        return tuple(shapes)

    def fn_inputs(self, case):
        """x, and A, B and the scalings as lists; the rest is the block's own."""
        t = case.tensors
        listed = [[_float64(t.get(f"{name}.{j}")) for j in range(self.count(t))]
                  for name in ("A", "B")]
        return {"x": _float64(t["x"]), "A": listed[0], "B": listed[1],
                "kwargs": {"scaling": list(case.scaling)}}

    def named_outputs(self, case, ys, grads):
        out = {"dx": grads["x"], **self._ys(ys)}
        out |= {f"dA.{j}": a for j, a in enumerate(grads["A"])}
        out |= {f"dB.{j}": b for j, b in enumerate(grads["B"])}
        return out

    def _ys(self, ys):
        """fn's outputs named: y (qkv: y.j)."""
        return {"y": ys[0]}


class _Projections(_Block):
    """qkv and mlp: P projections, each with its own W.j (bias.j, dropout_mask.j)."""

    projections = None  # how many a case has (None: any number)
    roles = ""  # their names, for an error message
    inputs = ("x", "x", "x")

    def _inputs(self, t):
        """Each projection's input (mlp's down: a placeholder shaped like z)."""
        return [t["x"]] * self.count(t)

    def _shapes(self, case):
        t, n = case.tensors, self.count(case.tensors)
        if len(indexed(t, "W")) != n or self.projections not in (None, n):
            raise ValueError(f"a {self.name} case needs W.j, A.j, B.j for every projection"
                             f"{self.roles}")
        x = t["x"]
        outs = []
        for j, x_j in enumerate(self._inputs(t)):
            _, d_j, _ = check_layer_shapes(x_j, t[f"W.{j}"], t[f"A.{j}"], t[f"B.{j}"],
                                           fan_in_fan_out=False, bias=t.get(f"bias.{j}"),
                                           dropout_mask=t.get(f"dropout_mask.{j}"))
            outs.append(x.shape[:-1] + (d_j,))
        out = self._ys(outs) | {"dx": x.shape}
        out |= {f"dA.{j}": t[f"A.{j}"].shape for j in range(n)}
        out |= {f"dB.{j}": t[f"B.{j}"].shape for j in range(n)}
        out |= {f"dbias.{j}": t[f"bias.{j}"].shape for j in range(n) if f"bias.{j}" in t}
        out |= {f"dW.{j}": t[f"W.{j}"].shape for j in range(n)}
        return out

    def _draw(self, rng, rounded, lead, dims, inputs, *, r, alpha, rslora, dropout, bias):
        """x, then W.j, A.j, B.j (bias.j, dropout_mask.j; dy.j with ``dy_each``) of the
        projections ``dims[j]`` = (d_out_j, d_in_j) on inputs shaped ``inputs[j]``."""
        t, scalings = {"x": rounded(rng.standard_normal(inputs[0]))}, []
        for j, (d_o, d_i) in enumerate(dims):
            W = rng.standard_normal((d_o, d_i)) / np.sqrt(d_i)  # (d_o, d_i)
            s = _block_scaling(alpha, r, rslora)
            A, B = _adapter(rng, d_o, d_i, r, W, s)  # (r, d_i), (d_o, r)
            t[f"W.{j}"], t[f"A.{j}"], t[f"B.{j}"] = rounded(W), rounded(A), rounded(B)
            scalings.append(s)
            if bias:
                t[f"bias.{j}"] = rounded(0.1 * rng.standard_normal(d_o))
            if dropout > 0:
                t[f"dropout_mask.{j}"] = _mask(rng, rounded, inputs[j], dropout)
            if self.dy_each:
                t[f"dy.{j}"] = rounded(rng.standard_normal(lead + (d_o,)))
        return t, tuple(scalings)

    def _named_grads(self, out, g):
        """``out`` with dx, and dA.j, dB.j, dW.j (dbias.j) of the backward's ``g``."""
        out["dx"] = g.dx
        for j in range(len(g.dA)):
            out[f"dA.{j}"], out[f"dB.{j}"], out[f"dW.{j}"] = g.dA[j], g.dB[j], g.dW[j]
            if g.dbias is not None and g.dbias[j] is not None:
                out[f"dbias.{j}"] = g.dbias[j]
        return out

    def merged_updates(self, case, t):
        return {f"W.{j}": [(s, t[f"B.{j}"], t[f"A.{j}"])] for j, s in enumerate(case.scaling)}

    def fn_inputs(self, case):
        t = case.tensors
        P = self.count(t)

        def listed(name, optional=False):
            values = [_float64(t.get(f"{name}.{j}")) for j in range(P)]
            return None if optional and all(v is None for v in values) else values

        return super().fn_inputs(case) | {
            "W": listed("W"), "bias": listed("bias", optional=True),
            "dropout_mask": listed("dropout_mask", optional=True), "dys": self._dys(t)}

    def _dys(self, t):
        return [_float64(t["dy"])]

    def named_inputs(self, x, dys, W, A, B, bias, m, masks):
        t = {"x": x} | self._named_dys(dys)
        for j in range(len(W)):
            t |= {f"W.{j}": W[j], f"A.{j}": A[j], f"B.{j}": B[j]}
            if bias[j] is not None:
                t[f"bias.{j}"] = bias[j]
        return t | {f"dropout_mask.{j}": mk for j, mk in enumerate(masks) if mk is not None}

    def _named_dys(self, dys):
        return {"dy": dys[0]}

    def named_outputs(self, case, ys, grads):
        out = super().named_outputs(case, ys, grads)
        for name in ("W", "bias"):
            if grads.get(name) is not None:
                out |= {f"d{name}.{j}": v for j, v in enumerate(grads[name]) if v is not None}
        return out


class Qkv(_Projections):
    """P projections of one x (``ml.lora_qkv_forward``), each with its own output y.j."""

    dy_each = separable = True
    peft_modules = ("q_proj", "k_proj", "v_proj")
    forward = staticmethod(blocks.lora_qkv_forward)
    backward = staticmethod(blocks.lora_qkv_backward)

    def __init__(self):
        super().__init__("qkv")

    def compose(self, projections, x, act=None):
        """The block from its projections (callables): (q(x), k(x), v(x))."""
        return tuple(p(x) for p in projections)

    def _ys(self, ys):
        return {f"y.{j}": y for j, y in enumerate(ys)}

    def upstream(self, case, shapes):
        return {f"dy.{j}": shapes[f"y.{j}"] for j in range(self.count(case.tensors))}

    def _dys(self, t):
        return [_float64(d) for d in indexed(t, "dy")]

    def _named_dys(self, dys):
        return {f"dy.{j}": d for j, d in enumerate(dys)}

    def split(self, y):
        return list(y) if isinstance(y, (tuple, list)) else [y]

    def draw(self, rng, rounded, lead, *, d_in, d_out, r, alpha, rslora, dropout, bias,
             **unused):
        """q to d_out, k and v to d_out/2, each drawn as a single layer is."""
        dims = [(d_out, d_in), (max(1, d_out // 2), d_in), (max(1, d_out // 2), d_in)]
        return self._draw(rng, rounded, lead, dims, [lead + (d_in,)] * 3, r=r, alpha=alpha,
                          rslora=rslora, dropout=dropout, bias=bias)

    def evaluate(self, case, backend):
        t = case.tensors
        n = self.count(t)
        ys, cache = self.forward(
            t["x"], indexed(t, "W"), indexed(t, "A"), indexed(t, "B"),
            scaling=list(case.scaling), bias=optional(t, "bias", n),
            dropout_mask=optional(t, "dropout_mask", n), backend=backend)
        g = self.backward(indexed(t, "dy"), cache, need_dx=True, need_dW=True,
                          need_dbias=optional(t, "bias", n) is not None)
        return self._named_grads(self._ys(ys), g)

    def magnitudes(self, case):
        mags, K = block_cases.qkv_magnitudes(case)
        return mags, K, None, 0


class Mlp(_Projections):
    """y = down(act(gate(x)) ⊙ up(x)) (``ml.lora_mlp_forward``): three projections."""

    projections = 3
    roles = " (gate, up, down)"
    inputs = ("x", "x", "z")  # z = act(gate(x)) ⊙ up(x), down's input
    peft_modules = ("gate_proj", "up_proj", "down_proj")
    forward = staticmethod(blocks.lora_mlp_forward)
    backward = staticmethod(blocks.lora_mlp_backward)

    def __init__(self):
        super().__init__("mlp")

    def compose(self, projections, x, act):
        """The block from its projections (callables): down(act(gate(x)) ⊙ up(x))."""
        gate, up, down = projections
        return down(act(gate(x)) * up(x))

    def extra_metadata(self, case):
        return {"activation": case.activation}

    def drawn(self, *, lora_only, detach_norm, activation):
        return {"block": self.name}, {"block": self.name, "activation": activation}

    def _inputs(self, t):
        x, hidden = t["x"], t["W.0"].shape[0]
        if t["W.1"].shape[0] != hidden:
            raise ValueError(f"gate and up must have one hidden size, got W.0 {t['W.0'].shape} "
                             f"and W.1 {t['W.1'].shape}")
        z = np.broadcast_to(np.zeros((), x.dtype), x.shape[:-1] + (hidden,))  # z's shape
        return [x, x, z]

    def _ys(self, ys):
        return {"y": ys[-1]}  # the last projection's, down's

    def draw(self, rng, rounded, lead, *, d_in, d_out, r, alpha, rslora, dropout, bias,
             hidden, **unused):
        """gate and up to ``hidden`` (default 2·d_in), down to d_out."""
        hidden = hidden or 2 * d_in
        dims = [(hidden, d_in), (hidden, d_in), (d_out, hidden)]
        shape = {"x": lead + (d_in,), "z": lead + (hidden,)}
        t, scalings = self._draw(rng, rounded, lead, dims, [shape[n] for n in self.inputs],
                                 r=r, alpha=alpha, rslora=rslora, dropout=dropout, bias=bias)
        t["dy"] = rounded(rng.standard_normal(lead + (d_out,)))
        return t, scalings

    def evaluate(self, case, backend):
        t = case.tensors
        y, cache = self.forward(
            t["x"], indexed(t, "W"), indexed(t, "A"), indexed(t, "B"),
            scaling=list(case.scaling), activation=case.activation,
            bias=optional(t, "bias", 3), dropout_mask=optional(t, "dropout_mask", 3),
            backend=backend)
        g = self.backward(t["dy"], cache, need_dx=True, need_dW=True,
                          need_dbias=optional(t, "bias", 3) is not None)
        return self._named_grads({"y": y}, g)

    def magnitudes(self, case):
        mags, K = block_cases.mlp_magnitudes(case)
        return mags, K, None, 0

    def fn_inputs(self, case):
        inputs = super().fn_inputs(case)
        inputs["kwargs"]["activation"] = case.activation
        return inputs


class Multi(_Block):
    """K adapters on one layer, each token given one or none (``ml.multi_lora_forward``)."""

    fan_in_fan_out = True
    forward = staticmethod(blocks.multi_lora_forward)
    backward = staticmethod(blocks.multi_lora_backward)

    def __init__(self):
        super().__init__("multi")

    def _shapes(self, case):
        t = case.tensors
        n = self.count(t)
        x = t["x"]
        lead = x.shape[:-1]
        for k in range(n):
            check_layer_shapes(x, t["W"], t[f"A.{k}"], t[f"B.{k}"],
                               fan_in_fan_out=case.fan_in_fan_out, bias=t.get("bias"),
                               dropout_mask=t.get("dropout_mask"))
        index = t.get("adapter_index")
        if index is None or index.shape != lead or index.dtype.kind not in "iu":
            raise ValueError(f"adapter_index must be integers shaped like x's leading "
                             f"dimensions {lead}")
        d_out = t["W"].shape[0 if not case.fan_in_fan_out else 1]
        out = {"y": lead + (d_out,), "dx": x.shape}
        out |= {f"dA.{k}": t[f"A.{k}"].shape for k in range(n)}
        out |= {f"dB.{k}": t[f"B.{k}"].shape for k in range(n)}
        out["dW"] = t["W"].shape
        if "bias" in t:
            out["dbias"] = t["bias"].shape
        return out

    def draw(self, rng, rounded, lead, *, d_in, d_out, r, alpha, rslora, dropout, bias,
             fan_in_fan_out, adapters, **options):
        """One W, adapters of ranks r, 2r, r, 2r, ..., every adapter and the base layer
        (index −1) present among the tokens (when there are enough)."""
        t = {"x": rounded(rng.standard_normal((*lead, d_in)))}
        W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)  # (d_out, d_in)
        t["W"] = rounded(W.T.copy() if fan_in_fan_out else W)
        ranks = [r if k % 2 == 0 else 2 * r for k in range(adapters)]  # r, 2r, r, 2r, ...
        scalings = []
        for k in range(adapters):
            s = _block_scaling(alpha, ranks[k], rslora)
            A, B = _adapter(rng, d_out, d_in, ranks[k], W, s)  # (r_k, d_in), (d_out, r_k)
            t[f"A.{k}"], t[f"B.{k}"] = rounded(A), rounded(B)
            scalings.append(s)
        index = rng.integers(-1, adapters, lead)
        if index.size >= adapters + 1:  # every adapter and the base layer present
            index.flat[rng.choice(index.size, adapters + 1, replace=False)] = \
                np.arange(-1, adapters)
        t["adapter_index"] = index.astype(np.int64)
        if bias:
            t["bias"] = rounded(0.1 * rng.standard_normal(d_out))
        if dropout > 0:
            t["dropout_mask"] = _mask(rng, rounded, t["x"].shape, dropout)
        t["dy"] = rounded(rng.standard_normal((*lead, d_out)))
        return t, tuple(scalings)

    def evaluate(self, case, backend):
        t = case.tensors
        y, cache = self.forward(
            t["x"], t["W"], indexed(t, "A"), indexed(t, "B"), t["adapter_index"],
            scaling=list(case.scaling), bias=t.get("bias"), dropout_mask=t.get("dropout_mask"),
            fan_in_fan_out=case.fan_in_fan_out, backend=backend)
        g = self.backward(t["dy"], cache, need_dx=True, need_dW=True,
                          need_dbias="bias" in t)
        out = {"y": y, "dx": g.dx, **{f"dA.{k}": a for k, a in enumerate(g.dA)},
               **{f"dB.{k}": b for k, b in enumerate(g.dB)}, "dW": g.dW}
        if "bias" in t:
            out["dbias"] = g.dbias
        return out

    def magnitudes(self, case):
        """The reference on absolute values; K the longest sums (the largest rank's)."""
        t = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
             for k, v in case.tensors.items()}
        absolute = case.with_tensors({k: np.abs(v) if v.dtype.kind == "f" else v
                                      for k, v in t.items()})
        mags = self.evaluate(absolute.with_scaling([abs(s) for s in case.scaling]), "numpy")
        n, N = self.count(t), math.prod(t["x"].shape[:-1])
        r_max = max(t[f"A.{k}"].shape[0] for k in range(n))
        d_in, d_out = t["x"].shape[-1], t["dy"].shape[-1]
        K = {"y": d_in + r_max + 4, "dx": d_out + r_max + 3, "dW": N, "dbias": N}
        K |= {f"dA.{k}": d_out + N + 2 for k in range(n)}
        K |= {f"dB.{k}": d_in + N + 2 for k in range(n)}
        return mags, K, None, 0

    def merged_updates(self, case, t):
        return {"W": [(s, t[f"B.{k}"], t[f"A.{k}"]) for k, s in enumerate(case.scaling)]}

    def fn_inputs(self, case):
        t = case.tensors
        W = t["W"].T if case.fan_in_fan_out else t["W"]  # (d_out, d_in)
        return super().fn_inputs(case) | {
            "W": _float64(W), "bias": _float64(t.get("bias")),
            "dropout_mask": _float64(t.get("dropout_mask")),
            "adapter_index": np.ascontiguousarray(t["adapter_index"]),
            "dys": [_float64(t["dy"])]}

    def call(self, fn, args, index, kwargs):
        """``fn(x, W, A, B, adapter_index, **kwargs)``."""
        return fn(*args, index, **kwargs)

    def named_outputs(self, case, ys, grads):
        out = super().named_outputs(case, ys, grads)
        for name in ("W", "bias"):
            if grads.get(name) is not None:
                out["d" + name] = grads[name]
        return out


LINEAR, QKV, MLP, MULTI = Linear(), Qkv(), Mlp(), Multi()
KINDS = {kind.name: kind for kind in (LINEAR, QKV, MLP, MULTI)}


def of_block(block):
    """The kind a Case's ``block`` names (None: a single layer); ValueError for another."""
    if block is None:
        return LINEAR
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    return KINDS[block]


def of_names(names):
    """The kind a case's tensor names describe."""
    if "adapter_index" in names:
        return MULTI
    if "dy.0" in names:
        return QKV
    return MLP if "W.0" in names else LINEAR
