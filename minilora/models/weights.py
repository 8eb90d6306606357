"""A transformers model folder's weights, read strictly: every tensor the config implies, no other.

The folder holds ``model.safetensors``, or ``model.safetensors.index.json`` whose
``weight_map`` names each tensor's shard (transformers reads the single file when both exist,
and so does this). Everything is checked before a tensor's data is read: the index (shards
plain file names inside the folder, each tensor in the shard the map names and in no other),
every shard's header and layout (``minilora.formats.safetensors``, as strict as the package's
reader),
each tensor the model needs present with its shape and a float dtype, nothing unexpected, and
the bytes the weights take in the compute dtype against the memory the machine has free. Only
then are the tensors read, one at a time by offset, widened or rounded to the compute dtype
(BF16 exactly, as the high half of a float32), and returned read-only. A failure raises
``WeightsError`` naming the file and the tensor, and returns nothing.
"""

import os
from pathlib import Path

import numpy as np

from minilora.formats import safetensors
from minilora.formats._json import read_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Tensors older checkpoints carry that the computation does not read (rotary tables it
# recomputes from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """A model folder whose weights cannot be read as the config's model."""


def expected_shapes(config):
    """{transformers' tensor name: shape} of every tensor the config's model has."""
    d, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    qd, kvd = config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (qd, d), "self_attn.k_proj.weight": (kvd, d),
                 "self_attn.v_proj.weight": (kvd, d), "self_attn.o_proj.weight": (d, qd),
                 "mlp.gate_proj.weight": (F, d), "mlp.up_proj.weight": (F, d),
                 "mlp.down_proj.weight": (d, F)}
        if config.qkv_bias:
            layer.update({"self_attn.q_proj.bias": (qd,), "self_attn.k_proj.bias": (kvd,),
                          "self_attn.v_proj.bias": (kvd,)})
        if config.o_bias:
            layer["self_attn.o_proj.bias"] = (d,)
        if config.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (F,), "mlp.up_proj.bias": (F,),
                          "mlp.down_proj.bias": (d,)})
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes


def _shard_files(folder):
    """{shard path: the tensor names the index assigns it, or None for "all"}."""
    if (folder / SINGLE).is_file():
        if (folder / SINGLE).resolve().parent != folder.resolve():
            raise WeightsError(f"{folder / SINGLE}: a link to a file outside {folder}")
        return {folder / SINGLE: None}
    index_path = folder / INDEX
    if not index_path.is_file():
        raise WeightsError(f"{folder}: neither {SINGLE} nor {INDEX} is there")
    index = read_json(index_path, WeightsError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index_path}: weight_map must be a non-empty object of "
                           f"tensor name -> shard file")
    root = folder.resolve()
    shards = {}
    for tensor, shard in weight_map.items():
        if (not isinstance(shard, str) or not shard or shard != os.path.basename(shard)
                or shard in (".", "..") or "\x00" in shard):
            raise WeightsError(f"{index_path}: weight_map[{tensor!r}] must be a file name in "
                               f"the folder, got {shard!r}")
        path = folder / shard
        try:  # a name too long, a link looping or pointing out: no file of this folder
            inside = path.resolve().parent == root and path.is_file()
        except (OSError, RuntimeError):
            inside = False
        if not inside:
            raise WeightsError(f"{index_path}: weight_map[{tensor!r}] names {shard!r}, which "
                               f"is not a file in {folder}")
        shards.setdefault(path, set()).add(tensor)
    return shards


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: no figure to check against
        pass
    return None


def _open(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None


def _compute_dtype(dtype):
    try:
        kind = np.dtype(dtype)
    except TypeError:
        kind = None
    if kind not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return kind


def load_weights(folder, config, *, dtype=np.float32):
    """The weights of the model folder ``folder`` as ``config`` describes them.

    Returns ``{name: array}`` with transformers' names (``expected_shapes``), each array
    C-contiguous, of ``dtype`` (float32 or float64) and read-only.
    """
    dtype = _compute_dtype(dtype)
    folder = Path(folder)
    needed = expected_shapes(config)
    tied_head = "lm_head.weight" if config.tie_word_embeddings else None
    located = {}  # name -> (path, entry, data_start)
    for path, assigned in _shard_files(folder).items():
        with _open(path) as f:
            entries, _, start = safetensors.read_header(f, str(path))
        if assigned is not None:
            for name in assigned - set(entries):
                raise WeightsError(f"{path}: the index puts {name!r} here, but the file does "
                                   f"not hold it")
        for name, entry in entries.items():
            if assigned is not None and name not in assigned:
                raise WeightsError(f"{path}: holds {name!r}, which the index does not assign "
                                   f"to this file")
            if name in located:
                raise WeightsError(f"{path}: {name!r} is also in {located[name][0]}")
            located[name] = (path, entry, start)
    for name, shape in needed.items():
        if name not in located:
            raise WeightsError(f"{folder}: the tensor {name!r} {shape} that the config's "
                               f"model needs is in no weights file")
    for name, (path, (kind, shape, _), _) in located.items():
        if name not in needed and name != tied_head and not name.endswith(IGNORED_SUFFIXES):
            raise WeightsError(f"{path}: {name!r} is not a tensor of the config's model "
                               f"({config.architecture}, {config.num_hidden_layers} layers)")
        want = needed.get(name, needed["model.embed_tokens.weight"] if name == tied_head
                          else None)
        if want is not None and tuple(shape) != want:
            raise WeightsError(f"{path}: {name!r} has shape {tuple(shape)}, the config says "
                               f"{want}")
        if want is not None and kind not in FLOAT_DTYPES:
            raise WeightsError(f"{path}: {name!r} has dtype {kind}; weights must be one of "
                               f"{FLOAT_DTYPES}")
    total = sum(int(np.prod(s)) for s in needed.values()) * dtype.itemsize
    free = _available_bytes()
    if free is not None and total > free:
        raise WeightsError(f"{folder}: the weights take {total} bytes "
                           f"({total / 2**30:.2f} GiB) as {dtype}, more than the {free} bytes "
                           f"({free / 2**30:.2f} GiB) of memory available")
    names = list(needed) + ([tied_head] if tied_head in located else [])
    weights = {}
    for name in names:
        path, entry, start = located[name]
        with _open(path) as f:
            a = np.ascontiguousarray(safetensors.read_tensor(f, entry, start), dtype=dtype)
        a.flags.writeable = False
        weights[name] = a
    if tied_head is not None and tied_head in weights:
        if not np.array_equal(weights.pop(tied_head), weights["model.embed_tokens.weight"]):
            raise WeightsError(f"{located[tied_head][0]}: {tied_head!r} differs from "
                               f"model.embed_tokens.weight, but tie_word_embeddings is true "
                               f"(transformers would use the embedding and drop it)")
    return weights
