"""Oracle cases: inputs and a cotangent for one LoRA or DoRA layer, their files, and the float64
reference outputs and gradients.

A case file (``.npz``, read with ``allow_pickle=False``, or ``.safetensors``) holds the tensors
``x W A B dy`` and, as the case needs them, ``bias m dropout_mask``; its metadata (a JSON string,
the ``__metadata__`` entry of either format) holds ``scaling``, ``fan_in_fan_out``,
``detach_norm`` and the precision the inputs were rounded to. A file of outputs holds any of
``y dx dA dB dm dbias dW``.
"""

import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from minilora import safetensors
from minilora._io import write_atomic
from minilora.functional import dora_backward, dora_forward, lora_backward, lora_forward
from minilora.oracle.precision import precision

INPUTS = ("x", "W", "A", "B", "bias", "m", "dropout_mask", "dy")
OUTPUTS = ("y", "dx", "dA", "dB", "dm", "dbias", "dW")


class OracleInputError(ValueError):
    """A case or candidate cannot be used: unreadable, missing tensors, wrong shapes or values."""


@dataclass
class Case:
    """One problem: input tensors (float32 or float64) and the layer's options."""

    tensors: dict
    scaling: float
    fan_in_fan_out: bool = False
    detach_norm: bool = True
    dtype: str = "fp32"  # the precision the inputs are exactly representable in
    meta: dict = field(default_factory=dict)

    @property
    def dora(self):
        return "m" in self.tensors

    def metadata(self):
        return {"format": "minilora-oracle-case/1", "op": "dora" if self.dora else "lora",
                "scaling": repr(self.scaling), "fan_in_fan_out": self.fan_in_fan_out,
                "detach_norm": self.detach_norm, "dtype": self.dtype, **self.meta}


def make_case(*, d_in, d_out, r, batch=4, seq=None, alpha=None, rslora=False, dora=False,
              dropout=0.0, bias=False, fan_in_fan_out=False, detach_norm=True, dtype="fp32",
              seed=0):
    """Draw a case. Values are rounded to ``dtype`` (bf16, fp16, tf32, fp32 or fp64) so that a
    candidate computing in that format reads them exactly; they are stored as float32 (float64
    for fp64). B is drawn non-zero (with B = 0, dA = 0 and a wrong dA would pass).

    W ~ N(0, 1/d_in) (W's rows as (d_out, d_in), stored (d_in, d_out) with fan_in_fan_out),
    A Kaiming-uniform, B ~ N(0, 0.1²), x and dy ~ N(0, 1), bias ~ N(0, 0.1²), m the row norms of
    W + s·B A times factors in [0.5, 2], the dropout mask 0 or 1/(1−p).
    """
    for name, v in (("d_in", d_in), ("d_out", d_out), ("r", r), ("batch", batch)):
        if not isinstance(v, int) or v < (0 if name == "batch" else 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    prec = precision(dtype)
    rng = np.random.default_rng(seed)
    alpha = float(2 * r if alpha is None else alpha)
    scaling = alpha / (np.sqrt(r) if rslora else r)
    lead = (batch,) if seq is None else (batch, seq)

    def draw(a):
        return prec.round(a)

    W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    t = {"x": draw(rng.standard_normal((*lead, d_in))),
         "W": draw(W.T.copy() if fan_in_fan_out else W),
         "A": draw(rng.uniform(-1, 1, (r, d_in)) / np.sqrt(d_in)),
         "B": draw(0.1 * rng.standard_normal((d_out, r))),
         "dy": draw(rng.standard_normal((*lead, d_out)))}
    if bias:
        t["bias"] = draw(0.1 * rng.standard_normal(d_out))
    if dropout > 0:
        keep = rng.random((*lead, d_in)) >= dropout
        t["dropout_mask"] = draw(keep / (1.0 - dropout))
    if dora:
        from minilora.dora import row_norms

        n = row_norms(t["W"].astype(np.float64), t["A"].astype(np.float64),
                      t["B"].astype(np.float64), scaling, fan_in_fan_out)[0]
        t["m"] = draw(n * rng.uniform(0.5, 2.0, d_out))
    return Case(t, float(scaling), bool(fan_in_fan_out), bool(detach_norm), dtype)


def reference(case):
    """The float64 outputs and gradients of a case: y, dx, dA, dB, dW (and dm, dbias)."""
    widened = {k: v.astype(np.float64) for k, v in case.tensors.items()}
    return evaluate(Case(widened, case.scaling, case.fan_in_fan_out, case.detach_norm,
                         case.dtype))


def evaluate(case, backend="numpy"):
    """Every output and gradient of a case, computed in the dtype of the case's tensors (the
    oracle's baseline runs it on rounded float32 tensors)."""
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


# -- files ---------------------------------------------------------------------------------------

def read_tensors(path):
    """``(tensors, metadata)`` from an .npz or .safetensors file; OracleInputError if unusable."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            return safetensors.load(path)
        except safetensors.SafetensorsError as e:
            raise OracleInputError(str(e)) from None
    if not path.endswith(".npz"):
        raise OracleInputError(f"{path}: expected a .npz or .safetensors file")
    try:
        with np.load(path, allow_pickle=False) as z:
            tensors = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise OracleInputError(f"{path}: no such file") from None
    except Exception as e:  # zipfile, pickle refusal, truncated data: all "unusable input"
        raise OracleInputError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") \
            from None
    meta = tensors.pop("__metadata__", None)
    if meta is None:
        return tensors, {}
    try:
        metadata = json.loads(str(meta))
    except json.JSONDecodeError:
        raise OracleInputError(f"{path}: __metadata__ is not JSON") from None
    return tensors, {k: str(v) for k, v in metadata.items()}


def write_tensors(path, tensors, metadata):
    """Write an .npz or .safetensors file atomically (never a half-written file)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        safetensors.save(path, tensors, metadata)
    elif path.endswith(".npz"):
        buffer = io.BytesIO()
        np.savez(buffer, __metadata__=np.array(json.dumps(metadata)), **tensors)
        write_atomic(path, buffer.getvalue())
    else:
        raise OracleInputError(f"{path}: the file name must end in .npz or .safetensors")


def save_case(path, case):
    write_tensors(path, case.tensors, case.metadata())


def load_case(path):
    """Read and validate a case file; OracleInputError names what is wrong."""
    tensors, meta = read_tensors(path)
    unknown = sorted(set(tensors) - set(INPUTS))
    if unknown:
        raise OracleInputError(f"{path}: unknown tensors {unknown}; a case holds {INPUTS}")
    missing = [k for k in ("x", "W", "A", "B", "dy") if k not in tensors]
    if missing:
        raise OracleInputError(f"{path}: missing tensors {missing}")
    try:
        scaling = float(meta.get("scaling", "nan"))
    except ValueError:
        scaling = float("nan")
    if not np.isfinite(scaling):
        raise OracleInputError(f"{path}: metadata lacks a finite 'scaling'")
    flags = {}
    for key, default in (("fan_in_fan_out", "False"), ("detach_norm", "True")):
        value = str(meta.get(key, default))
        if value not in ("True", "False", "true", "false"):
            raise OracleInputError(f"{path}: metadata {key}={value!r} is not a boolean")
        flags[key] = value.lower() == "true"
    for name, a in tensors.items():
        if a.dtype.kind != "f":
            raise OracleInputError(f"{path}: tensor {name} has dtype {a.dtype}, not a float")
        if not np.all(np.isfinite(a)):
            raise OracleInputError(f"{path}: tensor {name} holds non-finite values")
    dtype = str(meta.get("dtype", "fp32"))
    try:
        precision(dtype)
    except ValueError as e:
        raise OracleInputError(f"{path}: {e}") from None
    common = np.float64 if any(a.dtype == np.float64 for a in tensors.values()) else np.float32
    tensors = {k: v.astype(common) for k, v in tensors.items()}
    case = Case(tensors, scaling, flags["fan_in_fan_out"], flags["detach_norm"], dtype)
    try:
        reference_shapes(case)
    except (ValueError, TypeError) as e:
        raise OracleInputError(f"{path}: {e}") from None
    return case


def reference_shapes(case):
    """The shape of every output, checking the case's shapes on the way (ValueError if wrong)."""
    from minilora._checks import check_dy, check_layer_shapes

    t = case.tensors
    _, d_out, _ = check_layer_shapes(t["x"], t["W"], t["A"], t["B"],
                                        fan_in_fan_out=case.fan_in_fan_out, bias=t.get("bias"),
                                        dropout_mask=t.get("dropout_mask"), m=t.get("m"))
    check_dy(t["dy"], t["x"].shape[:-1] + (d_out,), t["dy"].dtype)
    shapes = {"y": t["dy"].shape, "dx": t["x"].shape, "dA": t["A"].shape, "dB": t["B"].shape,
              "dW": t["W"].shape}
    if "m" in t:
        shapes["dm"] = t["m"].shape
    if "bias" in t:
        shapes["dbias"] = t["bias"].shape
    return shapes


def save_outputs(path, outputs, metadata=None):
    write_tensors(path, outputs, {"format": "minilora-oracle-outputs/1", **(metadata or {})})


def load_outputs(path, case):
    """Read a file of outputs for ``case``: known names, right shapes, float dtype."""
    tensors, _ = read_tensors(path)
    shapes = reference_shapes(case)
    unknown = sorted(set(tensors) - set(OUTPUTS))
    if unknown:
        raise OracleInputError(f"{path}: unknown tensors {unknown}; outputs are {OUTPUTS}")
    if not tensors:
        raise OracleInputError(f"{path}: holds none of the outputs {OUTPUTS}")
    for name, a in tensors.items():
        if name not in shapes:
            raise OracleInputError(f"{path}: {name} given but this case has no {name[1:]}")
        if a.shape != shapes[name]:
            raise OracleInputError(
                f"{path}: {name} has shape {a.shape}, the case's {name} is {shapes[name]}")
        if a.dtype.kind != "f":
            raise OracleInputError(f"{path}: {name} has dtype {a.dtype}, not a float")
    return {k: v.astype(np.float64) for k, v in tensors.items()}
