"""minilora.oracle.kinds: each kind of case agrees with itself (its shapes with its reference,
its file scaling with its case, its harness wiring with its names) and states its block's
math (``compose``)."""

import numpy as np
import pytest

from minilora import oracle
from minilora.oracle import kinds

CASES = {"linear": [dict(), dict(dora=True, bias=True, dropout=0.2), dict(fan_in_fan_out=True)],
         "qkv": [dict(block="qkv"), dict(block="qkv", bias=True, dropout=0.2)],
         "mlp": [dict(block="mlp", hidden=5), dict(block="mlp", activation="gelu", bias=True)],
         "multi": [dict(block="multi", adapters=2), dict(block="multi", fan_in_fan_out=True,
                                                         bias=True, dropout=0.2)]}
ALL = [(name, kw) for name, options in CASES.items() for kw in options]


def make(kw, seed=0):
    return oracle.make_case(d_in=6, d_out=4, r=2, seq=3, seed=seed, **kw)


def test_a_case_names_its_kind_by_block_and_by_tensor_names():
    assert [k.name for k in kinds.KINDS.values()] == ["linear", "qkv", "mlp", "multi"]
    for name, kw in ALL:
        case = make(kw)
        assert case.kind is kinds.KINDS[name] is kinds.of_names(case.tensors)
        assert kinds.of_block(case.block) is case.kind
    with pytest.raises(ValueError, match="block must be one of"):
        kinds.of_block("linear")  # a single layer's block is None


@pytest.mark.parametrize("name, kw", ALL)
def test_shapes_name_every_output_of_the_reference(name, kw):
    case = make(kw)
    kind = case.kind
    ref = oracle.reference(case)
    shapes = kind.shapes(case)
    assert set(shapes) == set(ref)
    assert all(ref[k].shape == s for k, s in shapes.items())
    assert set(kind.required(case)) <= set(shapes)
    assert {"dx"} <= set(kind.required(case))
    assert kind.check_names(case.tensors) == []  # nothing missing, nothing unknown


@pytest.mark.parametrize("name, kw", ALL)
def test_the_scaling_survives_its_file_text_and_its_tuple_form(name, kw):
    case = make(kw)
    kind = case.kind
    text = kind.scaling_text(case.scaling)
    assert kind.read_scaling(text, kind.count(case.tensors)) == case.scaling
    assert kind.per_projection(kind.scalings(case.scaling)) == case.scaling
    assert len(kind.scalings(case.scaling)) == kind.count(case.tensors)
    with pytest.raises(ValueError, match="scaling"):
        kind.read_scaling("nan", kind.count(case.tensors))


@pytest.mark.parametrize("name, kw", ALL)
def test_the_harness_wiring_hands_fn_the_case_and_names_the_reference_back(name, kw):
    """fn_inputs' cotangents are the reference's upstream shapes, and named_outputs of the
    reference's own values (as fn's outputs and gradients) is the reference again."""
    case = make(kw)
    kind, ref = case.kind, oracle.reference(case)
    given = kind.fn_inputs(case)
    ys = [ref[k] for k in ref if k.split(".")[0] == "y"]
    assert [d.shape for d in given["dys"]] == [y.shape for y in ys]

    def grad(name):  # ref's name, or its name.j as a list; None where it has neither
        if name in ref:
            return ref[name]
        return [ref[k] for k in ref if k.startswith(name + ".")] or None

    grads = {"x": ref["dx"], "A": grad("dA"), "B": grad("dB"), "m": grad("dm"),
             "W": grad("dW"), "bias": grad("dbias")}
    if case.fan_in_fan_out:  # fn works on W as (d_out, d_in); named_outputs keeps the layout
        grads["W"] = grads["W"].T
    out = kind.named_outputs(case, ys, grads)
    if case.fan_in_fan_out:
        out["dW"] = out["dW"].T
    assert set(out) == set(ref)
    assert all(np.array_equal(out[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name, kw", [(n, kw) for n, kw in ALL if n != "multi"
                                      and not kw.get("fan_in_fan_out")])
def test_named_inputs_undo_fn_inputs(name, kw):
    """A case rebuilt from fn's arguments (as check_model builds one from a model's modules)
    is the case."""
    case = make(kw)
    kind, given = case.kind, case.kind.fn_inputs(case)

    def listed(key):  # one entry per projection
        value = given.get(key)
        return value if isinstance(value, list) else [value] * len(kind.scalings(case.scaling))

    t = kind.named_inputs(given["x"], given["dys"], listed("W"), listed("A"), listed("B"),
                          listed("bias"), listed("m"), listed("dropout_mask"))
    assert set(t) == set(case.tensors)
    assert all(np.array_equal(t[k], case.tensors[k]) for k in t)


def test_call_passes_multi_its_adapter_index_and_split_gives_qkv_its_outputs():
    def fn(*args, **kwargs):
        return args, kwargs

    for kind in kinds.KINDS.values():
        args, kwargs = kind.call(fn, ("x", "W", "A", "B"), "index", {"scaling": 2.0})
        expected = ("x", "W", "A", "B") + (("index",) if kind is kinds.MULTI else ())
        assert args == expected and kwargs == {"scaling": 2.0}
    assert kinds.QKV.split(("q", "k", "v")) == ["q", "k", "v"]
    assert kinds.MLP.split(("a tuple",)) == [("a tuple",)]


def lora(W, A, B, s):
    """One LoRA projection, v -> v Wᵀ + s·(v Aᵀ) Bᵀ."""
    return lambda v: v @ W.T + s * (v @ A.T) @ B.T


@pytest.mark.parametrize("block", ["qkv", "mlp"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_compose_is_the_block_its_kind_evaluates(block, activation):
    """The block from its projections (what bench builds PEFT's modules into): each kind's
    ``compose`` of single LoRA layers gives its fused op's y."""
    from scipy.special import erf

    act = {"silu": lambda e: e / (1 + np.exp(-e)),
           "gelu": lambda e: 0.5 * e * (1 + erf(e / np.sqrt(2))),
           "gelu_tanh": lambda e: 0.5 * e * (1 + np.tanh(np.sqrt(2 / np.pi)
                                                          * (e + 0.044715 * e**3)))}[activation]
    case = oracle.make_case(d_in=6, d_out=4, r=2, seed=1, dtype="fp64", block=block, hidden=5,
                            activation=activation)
    t, kind = case.tensors, case.kind
    projections = [lora(t[f"W.{j}"], t[f"A.{j}"], t[f"B.{j}"], s)
                   for j, s in enumerate(case.scaling)]
    ys = kind.split(kind.compose(projections, t["x"], act))
    ref = kind.evaluate(case, "numpy")
    assert len(ys) == len([k for k in ref if k[0] == "y"])
    assert np.allclose(np.concatenate([y.ravel() for y in ys]),
                       np.concatenate([ref[k].ravel() for k in ref if k[0] == "y"]),
                       rtol=1e-12, atol=1e-12)
