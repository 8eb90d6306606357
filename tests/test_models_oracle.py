"""LlamaModel in float32, judged layer by layer by the gradient oracle (issue 18's float32 parity).

The model runs a causal-LM forward and backward in float32. Every LoRA'd unit is captured as the
model ran it: the fused ``lora_qkv`` block, the fused ``lora_mlp`` block, or a single
``lora_forward`` / ``dora_forward`` projection, with its input x, frozen W, A, B (m), scaling, bias,
dropout mask and upstream gradient dy, and its float32 outputs y, dx (but for the first layer's q,
k, v, whose dx train_step does not compute) and the model's accumulated dA, dB (dm). Each capture
becomes an oracle case (float32 inputs, read exactly) and ``ml.oracle.compare(case, outputs,
dtype="fp32")`` judges the outputs against the float64 reference with the oracle's derived
tolerances. The capture is done from outside the model: the op pairs are replaced, in
``minilora.models.llama``'s namespace only, by recording wrappers that call the originals.

A planted bug (a dB scaled by 1.001, one entry of one block's dx moved, a dm scaled, one entry
of a projection's y moved) makes exactly the unit it is planted in fail, and only in the output
it is planted in: each unit is judged on its own captured inputs, so the error that flows on
into the other layers does not make them fail.
"""

import inspect
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest

import minilora as ml
import minilora.models.llama as llama
from minilora.models.config import ModelConfig
from minilora.models.weights import expected_shapes
from minilora.oracle import Case

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = 2
IDS = np.random.default_rng(7).integers(0, 32, (2, 6))  # (batch, seq)

# the op pairs llama.py imports by name, and the unit kind each forward makes
FORWARDS = {"lora_forward": "lora", "dora_forward": "dora", "lora_qkv_forward": "qkv",
            "lora_mlp_forward": "mlp"}
BACKWARDS = {"lora_backward": "lora", "dora_backward": "dora", "lora_qkv_backward": "qkv",
             "lora_mlp_backward": "mlp"}

# each variant: the model's biases, add_lora's arguments, train (draw dropout masks), and the
# units one layer must make, by kind
VARIANTS = {
    # q, k, v through lora_qkv (P = 3), o_proj alone, gate/up/down through lora_mlp
    "lora-all": dict(bias=True, train=True, units={"qkv": 1, "lora": 1, "mlp": 1},
                     lora=dict(r=4, alpha=6, target_modules=ALL, dropout=0.1)),
    # DoRA: every projection alone through dora_forward (the split MLP path)
    "dora-all": dict(bias=False, train=True, units={"dora": 7},
                     lora=dict(r=4, alpha=6, target_modules=ALL, use_dora=True, dropout=0.1)),
    # q and v only: lora_qkv with P = 2 (the model fuses any two or three of q, k, v), rsLoRA,
    # a scaling float32 cannot hold (5/√3)
    "q-v": dict(bias=False, train=False, units={"qkv": 1},
                lora=dict(r=3, alpha=5, target_modules=("q_proj", "v_proj"), use_rslora=True)),
    # single lora_forward projections: q alone in attention; gate and down without up (the
    # split MLP path), with biases and dropout
    "lora-single": dict(bias=True, train=True, units={"lora": 3},
                        lora=dict(r=4, alpha=6, target_modules=("q_proj", "gate_proj",
                                                                "down_proj"), dropout=0.1)),
}


def tiny_model(*, bias, backend=None, seed=0):
    """A 2-layer LLaMA in float32 with grouped-query attention (4 heads, 2 kv heads), random
    weights (norm weights near 1), frozen."""
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16,
                         intermediate_size=24, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=16,
                         tie_word_embeddings=False, qkv_bias=bias, o_bias=bias, mlp_bias=bias)
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in expected_shapes(config).items():
        w = 1.0 + 0.3 * rng.standard_normal(shape) if "norm" in key \
            else 0.4 * rng.standard_normal(shape)
        weights[key] = w.astype(np.float32)
    return llama.LlamaModel(config, weights, backend=backend)


def build(variant, backend=None, seed=1):
    """The variant's model with adapters whose every term matters: B ≠ 0 (with PEFT's B = 0,
    dA = 0 and the LoRA terms of y and dx vanish) and DoRA's m away from ‖W‖."""
    v = VARIANTS[variant]
    model = tiny_model(bias=v["bias"], backend=backend)
    model.add_lora(seed=0, **v["lora"])
    rng = np.random.default_rng(seed)
    for name, p in model.parameters().items():
        if name.endswith(".B"):
            p[...] = rng.normal(0, 0.3, p.shape)
        elif name.endswith(".m"):
            p *= rng.uniform(0.5, 1.5, p.shape).astype(np.float32)
    model.zero_grad()
    return model


# -- capture ----------------------------------------------------------------------------------


@dataclass
class Unit:
    """One LoRA'd unit as the model ran it."""

    kind: str  # "lora", "dora", "qkv" or "mlp"
    names: list  # the module names of its projections, in the op's order
    args: dict  # the forward's arguments by name (arrays copied at the call)
    cache: object  # the forward's cache: the backward call is matched to it by identity
    y: object = None  # the forward's output (a tuple for qkv)
    dy: object = None  # the upstream gradient (a tuple for qkv)
    grads: object = None  # the backward's result (its dx is judged)
    backward_calls: int = 0

    @property
    def label(self):
        if self.kind in ("lora", "dora"):
            return self.names[0]
        parent = self.names[0].rsplit(".", 1)[0]  # model.layers.i.self_attn or .mlp
        if self.kind == "mlp":
            return parent  # the MLP module, as check_model names the block
        return f"{parent}.{'+'.join(n.rsplit('.', 1)[1] for n in self.names)}"  # q_proj+k_proj...


def _copy(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, tuple) and hasattr(value, "_replace"):  # a named tuple (grads)
        return type(value)(*(_copy(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


@dataclass
class Recorder:
    """Replaces the op pairs in ``minilora.models.llama`` by wrappers that record each call and
    call the original; ``plant`` = (unit's first module name, "forward" | "backward", edit) edits
    that unit's y or grads in place before the model sees them (a planted bug)."""

    model: object
    monkeypatch: object
    plant: tuple = None
    units: list = field(default_factory=list)

    def __post_init__(self):
        self.module_of = {id(a.A): n for n, a in self.model.adapters.items()}
        for fname, kind in FORWARDS.items():
            self.monkeypatch.setattr(llama, fname, self._forward(getattr(llama, fname), kind))
        for fname, kind in BACKWARDS.items():
            self.monkeypatch.setattr(llama, fname, self._backward(getattr(llama, fname), kind))

    def _names(self, A):
        As = [A] if isinstance(A, np.ndarray) else list(A)
        return [self.module_of[id(a)] for a in As]  # KeyError: an A that is no adapter's

    def _planted(self, unit, stage, value):
        if self.plant is not None and self.plant[0] == unit.names[0] and self.plant[1] == stage:
            self.plant[2](value)

    def _forward(self, original, kind):
        signature = inspect.signature(original)

        def recording(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = {k: _copy(v) for k, v in bound.arguments.items()}
            y, cache = original(*args, **kwargs)
            unit = Unit(kind, self._names(bound.arguments["A"]), arguments, cache)
            self._planted(unit, "forward", y)
            unit.y = _copy(y)
            self.units.append(unit)
            return y, cache

        return recording

    def _backward(self, original, kind):
        def recording(dy, cache, **kwargs):
            unit = next(u for u in self.units if u.cache is cache)  # StopIteration: unknown
            assert unit.kind == kind
            g = original(dy, cache, **kwargs)
            self._planted(unit, "backward", g)
            unit.dy, unit.grads = _copy(dy), _copy(g)
            unit.backward_calls += 1
            return g

        return recording


def run(model, variant, plant=None, *, monkeypatch):
    """Forward, causal LM loss and backward in float32, every unit recorded."""
    recorder = Recorder(model, monkeypatch, plant)
    loss = model.train_step(IDS, train=VARIANTS[variant]["train"])
    assert np.isfinite(loss)
    monkeypatch.undo()
    return recorder.units


# -- a unit as an oracle case -----------------------------------------------------------------


def _f32(a):
    assert a.dtype == np.float32, a.dtype  # the model really ran in float32
    return a


def oracle_case(unit):
    """The unit's problem as the oracle's Case: its inputs as the model passed them."""
    a = unit.args
    if unit.kind in ("lora", "dora"):
        assert not a.get("fan_in_fan_out", False)
        t = {"x": a["x"], "W": a["W"], "A": a["A"], "B": a["B"], "dy": unit.dy}
        if unit.kind == "dora":
            assert a.get("norms") is None  # n = ‖W + s·B A‖, as the oracle computes it
            t["m"] = a["m"]
        for k in ("bias", "dropout_mask"):
            if a[k] is not None:
                t[k] = a[k]
        return Case({k: _f32(v) for k, v in t.items()}, float(a["scaling"]), False,
                     a.get("detach_norm", True), "fp32")
    P = len(a["A"])
    s = a["scaling"]
    s = tuple(map(float, s)) if isinstance(s, (list, tuple)) else (float(s),) * P
    t = {"x": a["x"]}
    for j in range(P):
        t |= {f"W.{j}": a["W"][j], f"A.{j}": a["A"][j], f"B.{j}": a["B"][j]}
        if a["bias"] is not None and a["bias"][j] is not None:
            t[f"bias.{j}"] = a["bias"][j]
    masks = a["dropout_mask"]
    if masks is not None and any(mk is not None for mk in masks):
        for j, mk in enumerate(masks):  # a projection without one: the mask of ones
            inner = a["x"].shape[:-1] + (a["W"][j].shape[1],)
            t[f"dropout_mask.{j}"] = np.ones(inner, np.float32) if mk is None else mk
    if unit.kind == "qkv":
        t |= {f"dy.{j}": d for j, d in enumerate(unit.dy)}
        extra = {}
    else:
        t["dy"] = unit.dy
        extra = {"activation": a["activation"]}
    return Case({k: _f32(v) for k, v in t.items()}, s, False, True, "fp32", block=unit.kind,
                **extra)


def candidate(unit, grads):
    """minilora's float32 outputs: y and dx as the ops returned them to the model, dA, dB (dm)
    as the model accumulated them into ``grads`` (one pass from zero_grad: exactly the ops').
    The first layer's q, k, v have no dx: train_step does not compute the gradient the frozen
    embedding would receive (``first_layer_input``)."""
    if unit.kind in ("lora", "dora"):
        n = unit.names[0]
        out = {"y": unit.y, "dx": unit.grads.dx, "dA": grads[f"{n}.A"], "dB": grads[f"{n}.B"]}
        if unit.kind == "dora":
            out["dm"] = grads[f"{n}.m"]
    else:
        ys = unit.y if unit.kind == "qkv" else (unit.y,)
        out = {f"y.{j}": y for j, y in enumerate(ys)} if unit.kind == "qkv" else {"y": unit.y}
        out["dx"] = unit.grads.dx
        for j, n in enumerate(unit.names):
            out |= {f"dA.{j}": grads[f"{n}.A"], f"dB.{j}": grads[f"{n}.B"]}
    assert (out["dx"] is None) == first_layer_input(unit), unit.label
    return {k: _f32(v) for k, v in out.items() if v is not None}


def first_layer_input(unit):
    """Whether the unit reads the embedding's output: the first layer's q, k, v."""
    return all(n.startswith("model.layers.0.self_attn.") and not n.endswith("o_proj")
               for n in unit.names)


def judge(model, units):
    """{unit label: (unit, the oracle's Report at fp32)}, after checking that the units cover
    every adapter of the model exactly once, each forward matched by one backward."""
    assert units, "no LoRA op ran"
    assert all(u.backward_calls == 1 for u in units), [(u.label, u.backward_calls)
                                                        for u in units]
    covered = Counter(n for u in units for n in u.names)
    assert set(covered) == set(model.adapters), set(model.adapters) ^ set(covered)
    assert all(c == 1 for c in covered.values()), covered
    reports = {}
    for u in units:
        assert u.label not in reports
        outputs = candidate(u, model.grads)
        reports[u.label] = (u, ml.oracle.compare(oracle_case(u), outputs, dtype="fp32",
                                                 outputs=list(outputs)))
    return reports


def worst(report):
    """(margin, tensor, rule) of the tensor closest to failing: margin is the deciding rule's
    share of its limit (above 1 fails)."""
    v = max(report.tensors, key=lambda t: t.margin)
    return v.margin, v.name, v.decided_by


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_unit_is_within_the_oracles_fp32_tolerances(variant, backend, monkeypatch):
    model = build(variant, backend)
    assert model.backend == backend
    reports = judge(model, run(model, variant, monkeypatch=monkeypatch))
    kinds = Counter(u.kind for u, _ in reports.values())
    assert kinds == Counter({k: LAYERS * n for k, n in VARIANTS[variant]["units"].items()})
    if VARIANTS[variant]["train"]:  # the dropout masks were drawn, and every case holds them
        assert all(any(k.startswith("dropout_mask") for k in oracle_case(u).tensors)
                   for u, _ in reports.values())
    for label, (u, report) in reports.items():
        judged = {t.name for t in report.tensors}
        assert judged >= set(candidate(u, model.grads)), label
        assert ("dx" in report.not_judged) == first_layer_input(u), label
        assert report.passed, f"{label}\n{report}"
        # float32 rounding, not a float64 computation in disguise: some error is there
        assert max(t.max_abs_err for t in report.tensors) > 0, label
    for label, (u, report) in reports.items():
        print(f"{backend:5s} {variant:11s} {u.kind:4s} {label:45s} worst %.3g (%s, %s)"
              % worst(report))


def _scaled(field_name, j, factor):
    """Multiply grads.<field>[j] (or grads.<field> for j None) by factor, in place."""
    def edit(g):
        a = getattr(g, field_name)
        (a if j is None else a[j])[...] *= np.float32(factor)
    return edit


def _moved_entry(field_name, rel):
    """Add rel·max|a| to the largest entry of a = grads.<field> (or of y: field None)."""
    def edit(value):
        a = value if field_name is None else getattr(value, field_name)
        i = np.unravel_index(np.argmax(np.abs(a)), a.shape)
        a[i] += np.float32(rel * np.abs(a).max())
    return edit


PLANTS = {  # variant, the unit's first module, stage, edit, its label, the outputs that fail
    "qkv dB.1 x1.001": ("lora-all", "model.layers.1.self_attn.q_proj", "backward",
                        _scaled("dB", 1, 1.001),
                        "model.layers.1.self_attn.q_proj+k_proj+v_proj", ["dB.1"]),
    "mlp dx one entry": ("lora-all", "model.layers.0.mlp.gate_proj", "backward",
                         _moved_entry("dx", 1e-3), "model.layers.0.mlp", ["dx"]),
    "dora dm x1.001": ("dora-all", "model.layers.1.mlp.down_proj", "backward",
                       _scaled("dm", None, 1.001), "model.layers.1.mlp.down_proj", ["dm"]),
    "lora y one entry": ("lora-single", "model.layers.0.self_attn.q_proj", "forward",
                         _moved_entry(None, 1e-3), "model.layers.0.self_attn.q_proj", ["y"]),
}


@pytest.mark.parametrize("plant", PLANTS)
def test_a_planted_bug_fails_exactly_its_unit(plant, monkeypatch):
    variant, first, stage, edit, label, outputs = PLANTS[plant]
    model = build(variant)
    reports = judge(model, run(model, variant, (first, stage, edit), monkeypatch=monkeypatch))
    failed = [name for name, (_, report) in reports.items() if not report.passed]
    assert failed == [label], "\n\n".join(f"{n}\n{reports[n][1]}" for n in failed)
    report = reports[label][1]
    assert [t.name for t in report.tensors if not t.passed] == outputs, str(report)
    if outputs in (["y"], ["dx"]):  # the error flowed on: other units ran on other inputs (and
        clean = build(variant)  # were judged on them, and passed)
        before = {u.label: u for u in run(clean, variant, monkeypatch=monkeypatch)}
        moved = [n for n, (u, _) in reports.items() if n != label and not all(
            np.array_equal(a, b) for a, b in zip(_inputs(u), _inputs(before[n]), strict=True))]
        assert moved, "the planted error reached no other unit"


def _inputs(unit):
    dy = unit.dy if isinstance(unit.dy, tuple) else (unit.dy,)
    return (unit.args["x"], *dy)
