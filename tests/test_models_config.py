"""config.json read strictly (minilora.models.config): what transformers 5 writes for LLaMA,
Qwen2 and Mistral is read as the model it describes; every value minilora cannot compute
exactly, and every malformed value, is a ValueError naming the file and the key."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora.models.config import ModelConfig, read_config

# What transformers 5.24 save_pretrained writes for small models (copied from its output).
LLAMA = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2, "head_dim": 4,
         "hidden_act": "silu", "hidden_size": 16, "initializer_range": 0.02,
         "intermediate_size": 24, "max_position_embeddings": 2048, "mlp_bias": False,
         "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
         "num_key_value_heads": 2, "pad_token_id": None, "pretraining_tp": 1,
         "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
         "tie_word_embeddings": True, "transformers_version": "5.24.0", "use_cache": True,
         "vocab_size": 64}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": None,
         "dtype": "float32", "eos_token_id": None, "hidden_act": "silu", "hidden_size": 16,
         "initializer_range": 0.02, "intermediate_size": 24,
         "layer_types": ["full_attention", "full_attention"], "max_position_embeddings": 32768,
         "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 4,
         "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": None,
         "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
         "sliding_window": None, "tie_word_embeddings": True, "transformers_version": "5.24.0",
         "use_cache": True, "use_sliding_window": False, "vocab_size": 64}
MISTRAL = {"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
           "dtype": "float32", "eos_token_id": 2, "head_dim": 4, "hidden_act": "silu",
           "hidden_size": 16, "initializer_range": 0.02, "intermediate_size": 24,
           "max_position_embeddings": 131072, "model_type": "mistral", "num_attention_heads": 4,
           "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": None,
           "rms_norm_eps": 1e-06,
           "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
           "sliding_window": 4096, "tie_word_embeddings": True,
           "transformers_version": "5.24.0", "use_cache": True, "vocab_size": 64}
CONFIGS = {"llama": LLAMA, "qwen2": QWEN2, "mistral": MISTRAL}


def _write(tmp_path, d):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d) if not isinstance(d, str) else d)
    return path


def _refused(tmp_path, d, *words):
    """read_config refuses d with a ValueError naming the file and each of ``words``."""
    path = _write(tmp_path, d)
    with pytest.raises(ValueError) as e:
        read_config(tmp_path)
    message = str(e.value)
    assert str(path) in message
    for w in words:
        assert w in message, (w, message)
    return message


def test_transformers_configs_read_as_their_models(tmp_path):
    c = read_config(_write(tmp_path, LLAMA))
    assert c == ModelConfig("LlamaForCausalLM", 64, 16, 24, 2, 4, 2, 4, 1e-6, 10000.0,
                            max_position_embeddings=2048, tie_word_embeddings=True)
    assert read_config(tmp_path) == c  # the folder or the file
    q = ModelConfig.from_dict(QWEN2)
    assert (q.architecture, q.qkv_bias, q.o_bias, q.mlp_bias, q.sliding_window) == \
        ("Qwen2ForCausalLM", True, False, False, None)
    assert q.head_dim == 4  # implicit: hidden_size // num_attention_heads
    m = ModelConfig.from_dict(MISTRAL)
    assert (m.architecture, m.sliding_window, m.max_sequence_length) == \
        ("MistralForCausalLM", 4096, 4096)
    assert m.max_position_embeddings == 131072
    biased = ModelConfig.from_dict({**LLAMA, "attention_bias": True, "mlp_bias": True})
    assert (biased.qkv_bias, biased.o_bias, biased.mlp_bias) == (True, True, True)
    for act, ours in (("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("silu", "silu")):
        assert ModelConfig.from_dict({**LLAMA, "hidden_act": act}).hidden_act == ours


def test_rope_forms(tmp_path):
    old = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}
    assert ModelConfig.from_dict(old).rope_theta == 10000.0  # transformers' default
    assert ModelConfig.from_dict({**old, "rope_theta": 5e5}).rope_theta == 5e5
    lin = ModelConfig.from_dict({**old, "rope_theta": 100.0,
                                 "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    assert (lin.rope_theta, lin.rope_scaling_factor) == (100.0, 4.0)
    lin5 = ModelConfig.from_dict({**LLAMA, "rope_parameters": {
        "rope_theta": 7.0, "rope_type": "linear", "factor": 2}})
    assert (lin5.rope_theta, lin5.rope_scaling_factor) == (7.0, 2.0)
    for kind in ("dynamic", "yarn", "llama3", "longrope", "ntk"):
        _refused(tmp_path, {**LLAMA, "rope_parameters": {"rope_theta": 1e4, "rope_type": kind,
                                                         "factor": 2.0}}, "rope_type", kind)
        _refused(tmp_path, {**old, "rope_scaling": {"type": kind, "factor": 2.0}},
                 "rope_scaling", kind)
    _refused(tmp_path, {**LLAMA, "rope_parameters": {"rope_type": "linear"}}, "factor")
    _refused(tmp_path, {**LLAMA, "rope_parameters": {"rope_type": "linear", "factor": -1.0}},
             "rope_scaling_factor")
    _refused(tmp_path, {**LLAMA, "partial_rotary_factor": 0.5}, "partial_rotary_factor")


def test_sliding_window_in_use_bounds_the_sequence(tmp_path):
    # Mistral: always in use when set; Qwen2: only on the layers transformers marks sliding.
    assert ModelConfig.from_dict({**MISTRAL, "sliding_window": None}).sliding_window is None
    short = ModelConfig.from_dict({**MISTRAL, "sliding_window": 8})
    assert short.max_sequence_length == 8
    assert ModelConfig.from_dict({**QWEN2, "sliding_window": 8}).sliding_window is None
    on = {**QWEN2, "sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1}
    del on["layer_types"]
    assert ModelConfig.from_dict(on).max_sequence_length == 8
    assert ModelConfig.from_dict({**on, "max_window_layers": 2}).sliding_window is None
    marked = {**QWEN2, "sliding_window": 8, "use_sliding_window": True,
              "layer_types": ["full_attention", "sliding_attention"]}
    assert ModelConfig.from_dict(marked).sliding_window == 8
    # transformers drops the window unless use_sliding_window; layers still marked sliding
    # then crash its forward (no window for the mask): refused, naming the keys
    _refused(tmp_path, {**marked, "use_sliding_window": False}, "layer_types",
             "use_sliding_window False")
    _refused(tmp_path, {**marked, "sliding_window": None}, "layer_types", "sliding_window None")
    # without layer_types, marks are derived only where a window is left (Qwen2Config)
    derived = {k: v for k, v in on.items() if k != "use_sliding_window"}
    assert ModelConfig.from_dict({**derived, "max_window_layers": 0}).sliding_window is None
    _refused(tmp_path, {**marked, "layer_types": ["full_attention", "x"]}, "layer_types")
    _refused(tmp_path, {**marked, "use_sliding_window": 1}, "use_sliding_window")
    _refused(tmp_path, {**MISTRAL, "sliding_window": 0}, "sliding_window")
    _refused(tmp_path, {**MISTRAL, "sliding_window": "8"}, "sliding_window")


REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size")
INTEGERS = REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings")


@pytest.mark.parametrize("key", REQUIRED)
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_missing_required_key(tmp_path, arch, key):
    d = {k: v for k, v in CONFIGS[arch].items() if k != key}
    _refused(tmp_path, d, key)


@given(key=st.sampled_from(INTEGERS), arch=st.sampled_from(sorted(CONFIGS)),
       bad=st.sampled_from([True, False, 4.0, "4", [4], {"v": 4}, 0, -4, 2**40, 10**30]))
def test_integer_keys_refuse_wrong_types_and_sizes(tmp_path_factory, key, arch, bad):
    d = {**CONFIGS[arch], key: bad}
    _refused(tmp_path_factory.mktemp("c"), d, key)


@given(key=st.sampled_from(["rms_norm_eps", "rope_theta"]),
       bad=st.sampled_from([True, "1e-6", -1.0, 0.0, None, [1.0]]))
def test_number_keys_refuse_wrong_values(tmp_path_factory, key, bad):
    d = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}
    d[key] = bad
    if bad is None and key == "rope_theta":  # null means transformers' default: read
        assert ModelConfig.from_dict(d).rope_theta == 10000.0
        return
    _refused(tmp_path_factory.mktemp("c"), d, key)  # eps null: transformers refuses it too


@pytest.mark.parametrize("text,word", [
    ('{"rms_norm_eps": NaN}', "NaN"), ('{"rope_theta": Infinity}', "Infinity"),
    ("[" * 1000 + "]" * 1000, "nests"),
    ("{", "not valid JSON"), ("\xff", "not valid JSON")])
def test_malformed_json(tmp_path, text, word):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8") if text != "\xff" else b'{"a": "\xff"}')
    with pytest.raises(ValueError) as e:
        read_config(path)
    assert str(path) in str(e.value)
    if text != "\xff":
        assert word in str(e.value)


def test_nan_eps_from_a_dict_and_in_rope():
    for value in (math.nan, math.inf, -1e-6):
        with pytest.raises(ValueError, match="rms_norm_eps"):
            ModelConfig.from_dict({**LLAMA, "rms_norm_eps": value})
        with pytest.raises(ValueError, match="rope_theta"):
            ModelConfig.from_dict({**LLAMA, "rope_parameters": {"rope_theta": value}})


@pytest.mark.parametrize("mutation,words", [
    ({"architectures": ["GPT2LMHeadModel"]}, ["architectures", "GPT2LMHeadModel"]),
    ({"architectures": ["LlamaForCausalLM", "LlamaForCausalLM"]}, ["architectures"]),
    ({"architectures": "LlamaForCausalLM"}, ["architectures"]),
    ({"model_type": "qwen2"}, ["model_type", "disagrees"]),
    ({"architectures": None, "model_type": "gpt2"}, ["model_type"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads"]),
    ({"head_dim": 5}, ["head_dim", "even"]),
    ({"hidden_act": "relu"}, ["hidden_act"]),
    ({"hidden_act": 1}, ["hidden_act"]),
    ({"attention_dropout": 0.1}, ["attention_dropout"]),
    ({"attention_bias": 1}, ["attention_bias"]),
    ({"mlp_bias": "false"}, ["mlp_bias"]),
    ({"tie_word_embeddings": 0}, ["tie_word_embeddings"]),
    ({"num_experts": 8}, ["num_experts"]),
    ({"num_local_experts": 8}, ["num_local_experts"]),
    ({"rope_parameters": [1]}, ["rope_parameters"]),
    ({"vocab_size": 2**22, "hidden_size": 2**20, "head_dim": 2, "intermediate_size": 2**20,
      "num_hidden_layers": 4096}, ["parameters"]),
])
def test_refusals_name_the_key(tmp_path, mutation, words):
    _refused(tmp_path, {**LLAMA, **mutation}, *words)


def test_head_dim_implicit_must_divide(tmp_path):
    d = {k: v for k, v in LLAMA.items() if k != "head_dim"}
    assert ModelConfig.from_dict(d).head_dim == 4
    _refused(tmp_path, {**d, "num_attention_heads": 3, "num_key_value_heads": 3},
             "hidden_size", "num_attention_heads")  # LLaMA: see the test below
    assert ModelConfig.from_dict({**LLAMA, "head_dim": None}).head_dim == 4  # null: implicit


def test_empty_architectures_fall_back_to_model_type(tmp_path):
    for arch in sorted(CONFIGS):
        assert ModelConfig.from_dict({**CONFIGS[arch], "architectures": []}) == \
            ModelConfig.from_dict(CONFIGS[arch])
    _refused(tmp_path, {**LLAMA, "architectures": [], "model_type": "gpt2"}, "model_type")
    _refused(tmp_path, {**LLAMA, "architectures": [], "model_type": None}, "model_type")


def test_unknown_harmless_keys_are_ignored():
    extra = {**LLAMA, "torch_dtype": "bfloat16", "bos_token_id": 7, "unknown_key": [1, 2],
             "transformers_version": "4.0"}
    assert ModelConfig.from_dict(extra) == ModelConfig.from_dict(LLAMA)


def test_direct_construction_is_checked():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig("LlamaForCausalLM", 64, 16, 24, 2, 4, 3, 4, 1e-6, 1e4)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig("LlamaForCausalLM", 64, True, 24, 2, 4, 2, 4, 1e-6, 1e4)


def test_activation_names_map_into_blocks():
    from minilora.models.config import ACTIVATIONS
    from minilora.ops.blocks import ACTIVATIONS as OURS

    assert set(ACTIVATIONS.values()) <= set(OURS)


def test_rope_priorities_are_transformers(tmp_path):
    """transformers 5: a non-empty rope_scaling wins over rope_parameters; the dict's
    rope_theta over the top-level one."""
    both = {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 50.0}
    c = ModelConfig.from_dict(both)
    assert (c.rope_theta, c.rope_scaling_factor) == (50.0, 2.0)
    assert ModelConfig.from_dict({**LLAMA, "rope_scaling": {}}).rope_theta == 10000.0
    assert ModelConfig.from_dict({**LLAMA, "rope_theta": 3.0}).rope_theta == 10000.0
    _refused(tmp_path, {**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn")
    nested = {**QWEN2, "rope_parameters": {"full_attention": {"rope_theta": 5.0}}}
    _refused(tmp_path, nested, "rope_parameters.full_attention")


def test_missing_kv_heads_take_transformers_class_defaults():
    for base, missing in ((LLAMA, 4), (QWEN2, 32), (MISTRAL, 8)):
        d = {k: v for k, v in base.items() if k != "num_key_value_heads"}
        d["num_attention_heads"], d["head_dim"], d["hidden_size"] = 32, 2, 64
        assert ModelConfig.from_dict(d).num_key_value_heads == (32 if missing == 4 else missing)
        if base is not MISTRAL:  # MistralConfig refuses a null (tested below)
            null = ModelConfig.from_dict({**d, "num_key_value_heads": None})
            assert null.num_key_value_heads == 32
    assert ModelConfig.from_dict({**LLAMA, "attention_dropout": None}) == \
        ModelConfig.from_dict(LLAMA)  # LlamaConfig reads a null dropout as none
    d = {k: v for k, v in MISTRAL.items() if k != "num_key_value_heads"}  # 4 heads, 8 kv heads
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_dict(d)


def test_missing_window_and_positions_take_class_defaults():
    d = {k: v for k, v in MISTRAL.items() if k not in ("sliding_window",
                                                         "max_position_embeddings")}
    c = ModelConfig.from_dict(d)
    assert (c.sliding_window, c.max_position_embeddings) == (4096, 131072)
    q = {k: v for k, v in QWEN2.items() if k not in ("max_position_embeddings", "layer_types")}
    assert ModelConfig.from_dict(q).max_position_embeddings == 32768
    l_ = {k: v for k, v in LLAMA.items() if k != "max_position_embeddings"}
    assert ModelConfig.from_dict(l_).max_position_embeddings == 2048


def test_check_sequence_length_names_the_bound():
    m = ModelConfig.from_dict({**MISTRAL, "sliding_window": 8})
    m.check_sequence_length(8)
    with pytest.raises(ValueError, match="sliding_window = 8"):
        m.check_sequence_length(9)
    c = ModelConfig.from_dict(LLAMA)
    c.check_sequence_length(2048)
    with pytest.raises(ValueError, match="max_position_embeddings = 2048"):
        c.check_sequence_length(2049)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                                                                       allow_infinity=False)
    | st.text(max_size=4) | st.sampled_from(["linear", "default", "yarn", "full_attention"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["rope_type", "type", "factor", "rope_theta", "x"]), inner, max_size=3),
    max_leaves=6)


@given(arch=st.sampled_from(sorted(CONFIGS)), data=st.data())
def test_any_mutation_is_a_config_or_one_named_error(tmp_path_factory, arch, data):
    """Keys dropped or given any JSON value: a valid ModelConfig or a ValueError naming the
    file, never another exception."""
    d = dict(CONFIGS[arch])
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(d) + ["rope_scaling", "num_experts"]))
        if data.draw(st.booleans()):
            d.pop(key, None)
        else:
            d[key] = data.draw(JSON_VALUES)
    path = _write(tmp_path_factory.mktemp("c"), d)
    try:
        c = read_config(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert isinstance(c, ModelConfig)
    assert c.num_attention_heads % c.num_key_value_heads == 0 and c.head_dim % 2 == 0


# Keys transformers 5's strict config fields refuse as null (tests/test_models_loading_hf.py
# checks that transformers does refuse each): null is not the default for them here either.
NOT_NULL = {"llama": ("rms_norm_eps", "attention_bias", "mlp_bias", "hidden_act",
                      "max_position_embeddings", "tie_word_embeddings"),
            "qwen2": ("use_sliding_window", "max_window_layers", "rms_norm_eps", "hidden_act",
                      "max_position_embeddings", "tie_word_embeddings", "attention_dropout"),
            "mistral": ("rms_norm_eps", "hidden_act", "max_position_embeddings",
                        "tie_word_embeddings", "num_key_value_heads", "attention_dropout")}


@pytest.mark.parametrize("arch,key", [(a, k) for a in sorted(NOT_NULL) for k in NOT_NULL[a]]
                         + [(a, k) for a in sorted(CONFIGS) for k in REQUIRED])
def test_null_is_refused_where_transformers_refuses_it(tmp_path, arch, key):
    _refused(tmp_path, {**CONFIGS[arch], key: None}, key, "NoneType")


def test_heads_must_divide_hidden_in_llama_only(tmp_path):
    """LlamaConfig refuses hidden_size % num_attention_heads != 0 whatever head_dim says;
    Qwen2 and Mistral build the heads of head_dim, given or hidden_size // heads (floor)."""
    odd = {"num_attention_heads": 3, "num_key_value_heads": 1}
    _refused(tmp_path, {**LLAMA, **odd}, "hidden_size", "num_attention_heads")
    _refused(tmp_path, {**LLAMA, **odd, "head_dim": 4}, "hidden_size", "num_attention_heads")
    for arch in ("qwen2", "mistral"):
        d = {k: v for k, v in CONFIGS[arch].items() if k != "head_dim"}
        assert ModelConfig.from_dict({**d, **odd, "head_dim": 4}).head_dim == 4
        assert ModelConfig.from_dict({**d, **odd, "hidden_size": 18}).head_dim == 6
        _refused(tmp_path, {**d, **odd}, "head_dim", "even")  # 16 // 3 = 5


def test_eps_must_be_a_float(tmp_path):
    _refused(tmp_path, {**LLAMA, "rms_norm_eps": 1}, "rms_norm_eps", "int")
    assert ModelConfig.from_dict({**LLAMA, "rms_norm_eps": 1e-5}).rms_norm_eps == 1e-5


def test_qwen2_window_keys_are_checked_even_unused(tmp_path):
    """Qwen2Config checks layer_types (one known name per layer) and the types of
    use_sliding_window / max_window_layers whether the window is used or not."""
    for layer_types in (["full_attention"], ["full_attention"] * 3, ["full_attention", "x"],
                        "full_attention", [None, None]):
        for use in (False, True):
            _refused(tmp_path, {**QWEN2, "sliding_window": 8, "use_sliding_window": use,
                                "layer_types": layer_types}, "layer_types")
    _refused(tmp_path, {**QWEN2, "max_window_layers": 1.0}, "max_window_layers")
    _refused(tmp_path, {**QWEN2, "use_sliding_window": "no"}, "use_sliding_window")
    # null layer_types: derived from max_window_layers, as Qwen2Config derives them
    on = {**QWEN2, "sliding_window": 8, "use_sliding_window": True, "layer_types": None,
          "max_window_layers": 1}
    assert ModelConfig.from_dict(on).sliding_window == 8


@pytest.mark.parametrize("key", ["num_experts", "num_local_experts", "num_experts_per_tok",
                                 "n_routed_experts", "moe_intermediate_size"])
def test_moe_keys_are_refused(tmp_path, key):
    for arch in sorted(CONFIGS):
        _refused(tmp_path, {**CONFIGS[arch], key: 2}, key, "mixture-of-experts")
    assert ModelConfig.from_dict({**LLAMA, key: 0}) == ModelConfig.from_dict(LLAMA)


def test_partial_rotary_and_dropout_forms(tmp_path):
    for where in ("top", "rope_parameters"):
        d = dict(LLAMA)
        if where == "top":
            d["partial_rotary_factor"] = 0.25
        else:
            d["rope_parameters"] = {**LLAMA["rope_parameters"], "partial_rotary_factor": 0.5}
        _refused(tmp_path, d, "partial_rotary_factor")
    assert ModelConfig.from_dict({**LLAMA, "partial_rotary_factor": 1.0}) == \
        ModelConfig.from_dict(LLAMA)
    for arch in sorted(CONFIGS):
        _refused(tmp_path, {**CONFIGS[arch], "attention_dropout": 0.5}, "attention_dropout")
        _refused(tmp_path, {**CONFIGS[arch], "attention_dropout": "0"}, "attention_dropout")
        assert ModelConfig.from_dict({**CONFIGS[arch], "attention_dropout": 0}) == \
            ModelConfig.from_dict(CONFIGS[arch])


def test_files_that_are_no_config(tmp_path, monkeypatch):
    """Too large, not a regular file (a FIFO would block the reader forever), a byte-order
    mark, a NUL in the path: each a ValueError naming the file."""
    import os

    from minilora.formats._json import read_json

    path = _write(tmp_path, {**LLAMA, "padding": "x" * 1000})
    with pytest.raises(ValueError, match="larger than 1000 bytes") as e:
        read_json(path, max_bytes=1000)
    assert str(path) in str(e.value)
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({**LLAMA, "padding": "x" * 2**24}))
    _path = big / "config.json"
    with pytest.raises(ValueError, match="larger than") as e:
        read_config(big)
    assert str(_path) in str(e.value)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")
    with pytest.raises(ValueError, match="not a regular file") as e:
        read_config(fifo)
    assert str(fifo / "config.json") in str(e.value)
    bom = tmp_path / "bom"
    bom.mkdir()
    (bom / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(LLAMA).encode())
    with pytest.raises(ValueError, match="not valid JSON") as e:
        read_config(bom)
    assert str(bom / "config.json") in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        read_config(tmp_path / "a\x00b.json")
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "config.json").write_bytes(json.dumps(LLAMA).encode()[:-1] + b', "x": "\xe9"}')
    with pytest.raises(ValueError, match="not UTF-8") as e:
        read_config(latin)
    assert str(latin / "config.json") in str(e.value)


def test_a_key_given_twice_keeps_its_last_value(tmp_path):
    """As Python's json (transformers' reader) keeps it: the same config in both readers."""
    text = json.dumps(LLAMA)[:-1] + ', "vocab_size": 65}'
    path = tmp_path / "config.json"
    path.write_text(text)
    assert json.loads(text)["vocab_size"] == 65
    assert read_config(path).vocab_size == 65
