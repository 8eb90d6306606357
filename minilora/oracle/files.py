"""Case and output files: ``.npz`` (read with ``minilora.formats.npz``, never with pickle) or
``.safetensors`` (``minilora.formats.safetensors``).

Both formats carry the case's options as metadata: in safetensors the ``__metadata__`` header
entry (a map of strings), in npz a ``__metadata__`` member holding a JSON object (scalars only).
A file's declared shapes are checked against each other, and against the case for outputs,
before its data is read; every refusal is an ``OracleInputError`` naming the file.
"""

import io
import json
import math
import os

import numpy as np

from minilora.formats import npz, safetensors
from minilora.formats._io import refuse_overwrite, write_atomic
from minilora.ops.blocks import ACTIVATIONS
from minilora.oracle.cases import Case, OracleInputError, check_fits_memory, reference_shapes
from minilora.oracle.kinds import of_names
from minilora.oracle.precision import precision


def _placeholders(shapes):
    """Zero-byte arrays of the declared shapes and dtypes, to run shape checks on headers."""
    return {k: np.broadcast_to(np.zeros((), dtype), shape) for k, (shape, dtype) in
            shapes.items()}


def _npz_metadata(path, member):
    """The JSON object of an npz ``__metadata__`` member, values as strings."""
    if member.shape != () or member.dtype.kind != "U":
        raise OracleInputError(f"{path}: __metadata__ must be one JSON string")
    try:
        metadata = json.loads(str(member))
    except (ValueError, RecursionError):  # bad JSON, 200,000 nested brackets, huge integers
        raise OracleInputError(f"{path}: __metadata__ is not valid JSON") from None
    if not isinstance(metadata, dict) or not all(
            isinstance(v, str | bool | int | float) for v in metadata.values()):
        raise OracleInputError(f"{path}: __metadata__ must be a JSON object of strings, "
                               f"numbers and booleans")
    return {k: str(v) for k, v in metadata.items()}


def read_tensors(path, check=None):
    """``(tensors, metadata)`` from an .npz or .safetensors file; OracleInputError if unusable.

    ``check`` is called with ``{name: (shape, dtype)}`` of the tensors (metadata excluded) before
    their data is read, and raises OracleInputError or ValueError to refuse the file.
    """
    path = os.fspath(path)

    def checked(shapes):
        shapes = {k: v for k, v in shapes.items() if k != "__metadata__"}
        if check is not None:
            try:
                check(shapes)
            except (ValueError, TypeError) as e:
                raise OracleInputError(f"{path}: {e}") from None

    if path.endswith(".safetensors"):
        try:
            tensors, metadata = safetensors.load(path)
        except safetensors.SafetensorsError as e:
            raise OracleInputError(str(e)) from None
        checked({k: (v.shape, v.dtype) for k, v in tensors.items()})
        return tensors, metadata
    if not path.endswith(".npz"):
        raise OracleInputError(f"{path}: expected a .npz or .safetensors file")
    try:
        tensors = npz.load(path, check=checked)
    except npz.NpzError as e:
        raise OracleInputError(str(e)) from None
    meta = tensors.pop("__metadata__", None)
    return tensors, ({} if meta is None else _npz_metadata(path, meta))


def write_tensors(path, tensors, metadata, inputs=()):
    """Write an .npz or .safetensors file atomically (never a half-written file), refusing to
    write over any of ``inputs`` (the files the result was computed from)."""
    path = os.fspath(path)
    refuse_overwrite(path, inputs)
    if path.endswith(".safetensors"):
        data = safetensors.dumps(tensors, metadata)
    elif path.endswith(".npz"):
        buffer = io.BytesIO()
        np.savez(buffer, __metadata__=np.array(json.dumps(metadata)), **tensors)
        data = buffer.getvalue()
    else:
        raise OracleInputError(f"{path}: the file name must end in .npz or .safetensors")
    write_atomic(path, data)


def save_case(path, case):
    write_tensors(path, case.tensors, case.metadata())


def _check_case_shapes(shapes):
    kind = of_names(shapes)
    missing = kind.check_names(shapes)  # (refusing names the kind does not hold)
    if missing:
        raise OracleInputError(f"missing tensors {missing}")
    for name, (_, dtype) in shapes.items():
        if dtype.kind != "f" and not (name == "adapter_index" and dtype.kind in "iu"):
            raise OracleInputError(f"tensor {name} has dtype {dtype}, not a float")
    check_fits_memory(sum(math.prod(shape) for shape, _ in shapes.values()), "this case")
    arrays = _placeholders(shapes)
    scaling = kind.per_projection((1.0,) * kind.count(arrays))
    try:  # the layout of W is in the metadata, read with the data: either is fine here
        reference_shapes(Case(arrays, scaling, fan_in_fan_out=False, block=kind.block))
    except ValueError as first:
        if not kind.fan_in_fan_out:
            raise
        try:
            reference_shapes(Case(arrays, scaling, fan_in_fan_out=True, block=kind.block))
        except ValueError as second:  # the error about W's layout names the other layout
            raise (second if str(first).startswith("W must be") else first) from None


def load_case(path):
    """Read and validate a case file; OracleInputError names what is wrong."""
    tensors, meta = read_tensors(path, check=_check_case_shapes)
    kind = of_names(tensors)
    op = str(meta.get("op", kind.ops[0]))
    if op not in kind.ops:
        raise OracleInputError(f"{path}: metadata op={op!r} but the tensors are a "
                               f"{kind.label}'s")
    try:
        scaling = kind.read_scaling(meta.get("scaling", "nan"), kind.count(tensors))
    except ValueError as e:
        raise OracleInputError(f"{path}: {e}") from None
    activation = str(meta.get("activation", "silu"))
    if activation not in ACTIVATIONS:
        raise OracleInputError(f"{path}: metadata activation={activation!r} is not one of "
                               f"{ACTIVATIONS}")
    flags = {}
    for key, default in (("fan_in_fan_out", "False"), ("detach_norm", "True")):
        value = str(meta.get(key, default))
        if value not in ("True", "False", "true", "false"):
            raise OracleInputError(f"{path}: metadata {key}={value!r} is not a boolean")
        flags[key] = value.lower() == "true"
    for name, a in tensors.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise OracleInputError(f"{path}: tensor {name} holds non-finite values")
    try:
        input_precision = precision(str(meta.get("dtype", "fp32"))).name
    except ValueError as e:
        raise OracleInputError(f"{path}: {e}") from None
    common = np.float64 if any(a.dtype == np.float64 for a in tensors.values()) else np.float32
    tensors = {k: v.astype(common) if v.dtype.kind == "f" else v.astype(np.int64)
               for k, v in tensors.items()}
    case = Case(tensors, scaling, flags["fan_in_fan_out"], flags["detach_norm"],
                input_precision, _layer(path, meta.get("layer")), kind.block, activation)
    try:
        reference_shapes(case)
    except ValueError as e:
        raise OracleInputError(f"{path}: {e}") from None
    return case


def _layer(path, text):
    """The case's ``layer`` record (how it was drawn) from its metadata, or {}."""
    if text is None:
        return {}
    try:
        layer = json.loads(text) if len(text) <= 10_000 else None
    except (ValueError, RecursionError):
        layer = None
    if not isinstance(layer, dict) or not all(isinstance(k, str) for k in layer):
        raise OracleInputError(f"{path}: metadata 'layer' is not a JSON object")
    return layer


def save_outputs(path, outputs, metadata=None, inputs=()):
    write_tensors(path, outputs, {"format": "minilora-oracle-outputs/1", **(metadata or {})},
                  inputs)


def load_outputs(path, case):
    """Read a file of outputs for ``case``: known names, the case's shapes, a float dtype."""
    shapes = reference_shapes(case)

    def check(declared):
        known = case.kind.output_names(shapes)
        unknown = sorted(set(declared) - set(known))
        if unknown:
            raise OracleInputError(f"unknown tensors {unknown}; outputs are {known}")
        if not declared:
            raise OracleInputError(f"holds none of the outputs {tuple(shapes)}")
        for name, (shape, dtype) in declared.items():
            if name not in shapes:
                raise OracleInputError(f"{name} given but this case has no {name[1:]}")
            if tuple(shape) != shapes[name]:
                raise OracleInputError(
                    f"{name} has shape {tuple(shape)}, the case's {name} is {shapes[name]}")
            if dtype.kind != "f":
                raise OracleInputError(f"{name} has dtype {dtype}, not a float")

    tensors, _ = read_tensors(path, check=check)
    return tensors
