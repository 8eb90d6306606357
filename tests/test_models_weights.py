"""load_weights (minilora.models.weights) on folders minilora writes itself, then mutated: every
tensor the config implies is returned, exact, C-contiguous, of the compute dtype and read-only;
every malformed folder is one ValueError naming the file and the tensor, and nothing else."""

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora.formats import safetensors
from minilora.models import weights as weights_module
from minilora.models.config import ModelConfig
from minilora.models.weights import INDEX, SINGLE, expected_shapes, load_weights

CONFIG = ModelConfig("LlamaForCausalLM", vocab_size=11, hidden_size=8, intermediate_size=12,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=2, rms_norm_eps=1e-6, rope_theta=1e4, qkv_bias=True, o_bias=True,
                     mlp_bias=True)
TIED = ModelConfig("Qwen2ForCausalLM", 11, 8, 12, 1, 2, 1, 4, 1e-6, 1e4,
                   tie_word_embeddings=True, qkv_bias=True)


def _tensors(config, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in expected_shapes(config).items()}


def _write_raw(path, entries):
    """A safetensors file from {name: (dtype string, shape, raw bytes)}, any dtype string."""
    header, offset, chunks = {}, 0, []
    for name, (dtype, shape, raw) in sorted(entries.items()):
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(chunks))


def _single(folder, tensors):
    folder.mkdir(exist_ok=True)
    safetensors.save(folder / SINGLE, tensors)
    return folder


def _sharded(folder, tensors, n=3, weight_map=None):
    """tensors split over n shards, round robin, with its index."""
    folder.mkdir(exist_ok=True)
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shards = {f: {} for f in files}
    for i, name in enumerate(names):
        shards[files[i % n]][name] = tensors[name]
    for f, part in shards.items():
        safetensors.save(folder / f, part)
    if weight_map is None:
        weight_map = {name: files[i % n] for i, name in enumerate(names)}
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 0},
                                            "weight_map": weight_map}))
    return folder, files, weight_map


def _refused(folder, config=CONFIG, *words, dtype=np.float32):
    before = sorted(os.listdir(folder))
    with pytest.raises(ValueError) as e:
        load_weights(folder, config, dtype=dtype)
    message = str(e.value)
    assert str(folder) in message, message
    for w in words:
        assert w in message, (w, message)
    assert sorted(os.listdir(folder)) == before  # nothing left behind
    return message


def _check_equal(loaded, tensors, dtype):
    assert set(loaded) == set(tensors)
    for name, a in loaded.items():
        assert a.dtype == dtype and a.flags.c_contiguous and not a.flags.writeable, name
        assert a.shape == tensors[name].shape
        np.testing.assert_array_equal(a, tensors[name].astype(dtype), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_valid_folder_loads_exactly(tmp_path, dtype, layout):
    tensors = _tensors(CONFIG)
    folder = _single(tmp_path / "m", tensors) if layout == "single" else \
        _sharded(tmp_path / "m", tensors)[0]
    loaded = load_weights(folder, CONFIG, dtype=dtype)
    _check_equal(loaded, tensors, dtype)
    assert len(loaded) == 3 + 9 * 2 + 7 * 2  # embed, norm, head; 9 weights, 7 biases a layer


def test_compute_dtype_is_float32_or_float64(tmp_path):
    folder = _single(tmp_path / "m", _tensors(CONFIG))
    for bad in (np.float16, np.int64, "bfloat16"):
        with pytest.raises(TypeError, match="float32 or float64"):
            load_weights(folder, CONFIG, dtype=bad)


def test_stored_dtypes_are_widened_exactly(tmp_path):
    tensors = _tensors(CONFIG)
    rng = np.random.default_rng(1)
    bf16 = rng.integers(0, 2**16, size=expected_shapes(CONFIG)["lm_head.weight"],
                        dtype=np.uint16)
    bf16[(bf16 & 0x7F80) == 0x7F80] = 0x3F80  # no NaN/inf bit patterns: 1.0 instead
    entries = {n: ("F32", a.shape, a.tobytes()) for n, a in tensors.items()}
    f16 = tensors["model.embed_tokens.weight"].astype(np.float16)
    f64 = tensors["model.norm.weight"].astype(np.float64) / 3
    entries["model.embed_tokens.weight"] = ("F16", f16.shape, f16.tobytes())
    entries["model.norm.weight"] = ("F64", f64.shape, f64.tobytes())
    entries["lm_head.weight"] = ("BF16", bf16.shape, bf16.tobytes())
    (tmp_path / "m").mkdir()
    _write_raw(tmp_path / "m" / SINGLE, entries)
    widened = (bf16.astype(np.uint32) << 16).view(np.float32)  # bf16 is a float32's high half
    for dtype in (np.float32, np.float64):
        loaded = load_weights(tmp_path / "m", CONFIG, dtype=dtype)
        np.testing.assert_array_equal(loaded["lm_head.weight"], widened.astype(dtype))
        np.testing.assert_array_equal(loaded["model.embed_tokens.weight"], f16.astype(dtype))
        np.testing.assert_array_equal(loaded["model.norm.weight"], f64.astype(dtype))
    assert loaded["model.norm.weight"].dtype == np.float64
    assert np.array_equal(loaded["model.norm.weight"], f64)  # float64 kept exactly


@given(name=st.sampled_from(sorted(expected_shapes(CONFIG))), sharded=st.booleans())
@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_missing_tensor_is_named(tmp_path_factory, name, sharded):
    tensors = _tensors(CONFIG)
    del tensors[name]
    folder = tmp_path_factory.mktemp("m")
    if sharded:
        _sharded(folder, tensors)
    else:
        _single(folder, tensors)
    _refused(folder, CONFIG, name, "needs")


@given(name=st.sampled_from(sorted(expected_shapes(CONFIG))),
       change=st.sampled_from(["transpose", "grow", "scalar", "int32", "uint8", "bool"]))
@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_wrong_shape_or_dtype_is_named(tmp_path_factory, name, change):
    tensors = _tensors(CONFIG)
    a = tensors[name]
    if change == "transpose" and a.ndim == 2:
        tensors[name] = np.ascontiguousarray(a.T)
    elif change in ("grow", "transpose"):
        tensors[name] = np.zeros((a.shape[0] + 1,) + a.shape[1:], np.float32)
    elif change == "scalar":
        tensors[name] = np.float32(1.0)
    else:
        tensors[name] = a.astype(change)
    folder = _single(tmp_path_factory.mktemp("m"), tensors)
    if change == "transpose" and a.ndim == 2 and a.shape[0] == a.shape[1]:
        load_weights(folder, CONFIG)  # a square transpose has the right shape
        return
    _refused(folder, CONFIG, name, "shape" if change in ("transpose", "grow", "scalar")
             else "dtype")


def test_unexpected_tensors(tmp_path):
    for extra in ("model.layers.2.mlp.up_proj.weight", "lm_head.bias", "model.extra",
                  "model.layers.0.self_attn.q_norm.weight"):
        folder = _single(tmp_path / extra, {**_tensors(CONFIG), extra: np.ones(3, np.float32)})
        _refused(folder, CONFIG, extra, "not a tensor")
    # rotary tables older checkpoints carry: recomputed from the config, accepted and dropped
    folder = _single(tmp_path / "rot", {**_tensors(CONFIG), "model.layers.0.self_attn."
                                        "rotary_emb.inv_freq": np.ones(1, np.float32)})
    _check_equal(load_weights(folder, CONFIG), _tensors(CONFIG), np.float32)


def test_tied_head(tmp_path):
    tensors = _tensors(TIED)
    assert "lm_head.weight" not in tensors  # save_pretrained writes no head when tied
    _check_equal(load_weights(_single(tmp_path / "a", tensors), TIED), tensors, np.float32)
    same = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].copy()}
    _check_equal(load_weights(_single(tmp_path / "b", same), TIED), tensors, np.float32)
    differ = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1}
    _refused(_single(tmp_path / "c", differ), TIED, "lm_head.weight", "differs")
    untied = {k: v for k, v in _tensors(CONFIG).items() if k != "lm_head.weight"}
    _refused(_single(tmp_path / "d", untied), CONFIG, "lm_head.weight")


def test_index_refusals(tmp_path):
    tensors = _tensors(CONFIG)
    names = sorted(tensors)
    outside = tmp_path / "outside.safetensors"
    safetensors.save(outside, {names[0]: tensors[names[0]]})

    def case(label, edit):
        folder, files, weight_map = _sharded(tmp_path / label, tensors)
        words = edit(folder, files, dict(weight_map))
        return _refused(folder, CONFIG, *words)

    def set_map(folder, weight_map):
        (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))

    def missing_file(folder, files, wm):
        os.remove(folder / files[1])
        return [files[1]]

    def renamed(folder, files, wm):
        os.rename(folder / files[1], folder / "renamed.safetensors")
        return [files[1]]

    def traversal(folder, files, wm):
        set_map(folder, {**wm, names[0]: "../outside.safetensors"})
        return [names[0], "../outside.safetensors"]

    def absolute(folder, files, wm):
        set_map(folder, {**wm, names[0]: str(outside)})
        return [names[0]]

    def symlink_out(folder, files, wm):
        os.symlink(outside, folder / "link.safetensors")
        set_map(folder, {**wm, names[0]: "link.safetensors"})
        return [names[0], "link.safetensors"]

    def not_in_map(folder, files, wm):
        del wm[names[0]]
        set_map(folder, wm)
        return [names[0], "does not assign"]

    def wrong_shard(folder, files, wm):
        wm[names[0]] = files[1] if wm[names[0]] != files[1] else files[2]
        set_map(folder, wm)
        return [names[0]]

    def in_two_shards(folder, files, wm):
        shard = folder / wm[names[1]]
        part = safetensors.load(shard)[0]
        safetensors.save(shard, {**part, names[0]: tensors[names[0]]})
        return [names[0]]

    def empty_map(folder, files, wm):
        set_map(folder, {})
        return ["weight_map"]

    def no_map(folder, files, wm):
        (folder / INDEX).write_text(json.dumps({"metadata": {}}))
        return ["weight_map"]

    def not_a_string(folder, files, wm):
        set_map(folder, {**wm, names[0]: 3})
        return [names[0]]


    def no_files(folder, files, wm):
        os.remove(folder / INDEX)
        return [SINGLE, INDEX]

    def nul_in_name(folder, files, wm):  # Path.resolve raises a bare ValueError on it
        set_map(folder, {**wm, names[0]: "model\x00.safetensors"})
        return [names[0], "file name"]

    def name_too_long(folder, files, wm):  # Path.resolve raises OSError ENAMETOOLONG
        set_map(folder, {**wm, names[0]: "x" * 300})
        return [names[0], "not a file"]

    def symlink_loop(folder, files, wm):  # Path.resolve raises RuntimeError
        os.symlink("loop.safetensors", folder / "loop.safetensors")
        set_map(folder, {**wm, names[0]: "loop.safetensors"})
        return [names[0], "loop.safetensors", "not a file"]

    def directory(folder, files, wm):
        os.mkdir(folder / "dir.safetensors")
        set_map(folder, {**wm, names[0]: "dir.safetensors"})
        return [names[0], "not a file"]

    def index_is_a_fifo(folder, files, wm):  # open() would block forever
        os.remove(folder / INDEX)
        os.mkfifo(folder / INDEX)
        return [INDEX, "is there"]  # refused without opening it

    for edit in (missing_file, renamed, traversal, absolute, symlink_out, not_in_map,
                 wrong_shard, in_two_shards, empty_map, no_map, not_a_string,
                 no_files, nul_in_name, name_too_long, symlink_loop, directory, index_is_a_fifo):
        case(edit.__name__, edit)


def test_single_file_symlinked_out_is_refused(tmp_path):
    safetensors.save(tmp_path / "elsewhere.safetensors", _tensors(CONFIG))
    (tmp_path / "m").mkdir()
    os.symlink(tmp_path / "elsewhere.safetensors", tmp_path / "m" / SINGLE)
    _refused(tmp_path / "m", CONFIG, SINGLE)


@given(data=st.data())
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_shard_is_refused_or_exact(tmp_path_factory, data):
    """A shard truncated, extended, or with a header byte changed: either one ValueError naming
    the shard, or (the change kept the file valid) every tensor with its right shape."""
    tensors = _tensors(CONFIG)
    folder, files, _ = _sharded(tmp_path_factory.mktemp("m"), tensors)
    shard = folder / data.draw(st.sampled_from(files))
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    kind = data.draw(st.sampled_from(["cut", "append", "header", "length"]))
    if kind == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        raw += b"\0" * data.draw(st.integers(1, 9))
    elif kind == "header":
        raw[data.draw(st.integers(8, 8 + n - 1))] = data.draw(st.integers(0, 255))
    else:
        raw[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, n - 8, n + 8, 2**63])))
    shard.write_bytes(bytes(raw))
    try:
        loaded = load_weights(folder, CONFIG)
    except ValueError as e:
        assert str(shard) in str(e), str(e)  # the shard itself, not only the folder
        return
    assert {k: a.shape for k, a in loaded.items()} == {k: a.shape for k, a in tensors.items()}


def test_memory_is_checked_before_reading(tmp_path, monkeypatch):
    folder = _single(tmp_path / "m", _tensors(CONFIG))
    reads = []
    real_read = safetensors.read_tensor
    monkeypatch.setattr(safetensors, "read_tensor", lambda *a: reads.append(a))
    for dtype, size in ((np.float32, 4), (np.float64, 8)):
        total = sum(int(np.prod(s)) for s in expected_shapes(CONFIG).values()) * size
        monkeypatch.setattr(weights_module, "_available_bytes", lambda t=total: t - 1)
        message = _refused(folder, CONFIG, "memory", dtype=dtype)
        assert f"take {total} bytes" in message and f"the {total - 1} bytes" in message
        assert reads == []  # no tensor read before the refusal
        monkeypatch.setattr(weights_module, "_available_bytes", lambda t=total: t)  # enough
        monkeypatch.setattr(safetensors, "read_tensor", real_read)
        assert len(load_weights(folder, CONFIG, dtype=dtype)) == len(expected_shapes(CONFIG))
        monkeypatch.setattr(safetensors, "read_tensor", lambda *a: reads.append(a))
    # and the same before any shard's data is read in a sharded folder
    sharded, _, _ = _sharded(tmp_path / "s", _tensors(CONFIG))
    monkeypatch.setattr(weights_module, "_available_bytes", lambda: 1000)
    _refused(sharded, CONFIG, "memory", "the 1000 bytes")
    assert reads == []


def test_inputs_unchanged_and_outputs_independent(tmp_path):
    tensors = _tensors(CONFIG)
    folder = _single(tmp_path / "m", tensors)
    before = (folder / SINGLE).read_bytes()
    a = load_weights(folder, CONFIG)
    b = load_weights(folder, CONFIG)
    assert (folder / SINGLE).read_bytes() == before
    for name in a:
        assert not np.shares_memory(a[name], b[name])
        with pytest.raises(ValueError):
            a[name][...] = 0


def test_from_pretrained_checks_everything_before_building(tmp_path):
    from minilora.models.pretrained import from_pretrained

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 11}))
    with pytest.raises(ValueError, match="hidden_size"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 11, "hidden_size": 8,
        "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 2, "attention_bias": True, "mlp_bias": True}))
    with pytest.raises(ValueError, match="neither"):
        from_pretrained(tmp_path)
    safetensors.save(tmp_path / SINGLE, _tensors(CONFIG))
    with pytest.raises(TypeError, match="float32 or float64"):
        from_pretrained(tmp_path, dtype=np.float16)


def test_unreadable_shard_is_named(tmp_path, monkeypatch):
    folder = _single(tmp_path / "m", _tensors(CONFIG))
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path).endswith(SINGLE):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    _refused(folder, CONFIG, SINGLE, "cannot read")


@given(data=st.data())
@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_index_mutation_is_refused_or_exact(tmp_path_factory, data):
    """The index's weight_map with entries dropped, added, or pointed anywhere: one ValueError
    naming the folder, or (the map still right) the exact tensors."""
    tensors = _tensors(CONFIG)
    folder, files, weight_map = _sharded(tmp_path_factory.mktemp("m"), tensors)
    targets = st.sampled_from(files + ["", ".", "..", "../x", "/etc/passwd", "sub/f",
                                       INDEX, "nope.safetensors"]) | st.integers() | st.none()
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(weight_map) + ["extra.weight"]))
        if data.draw(st.booleans()):
            weight_map.pop(name, None)
        else:
            weight_map[name] = data.draw(targets)
    (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    try:
        loaded = load_weights(folder, CONFIG)
    except ValueError as e:
        assert str(folder) in str(e)
        return
    _check_equal(loaded, tensors, np.float32)
