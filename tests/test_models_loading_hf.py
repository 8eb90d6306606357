"""Folders written by transformers' save_pretrained (random weights from a config, no hub):
read_config gives the model transformers built, and load_weights gives exactly its state_dict,
single file and sharded, float32, float16 and bfloat16 (widened exactly)."""

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from minilora.models.config import read_config  # noqa: E402
from minilora.models.weights import INDEX, SINGLE, load_weights  # noqa: E402

SIZES = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-bias-tied": ("LlamaConfig", "LlamaForCausalLM",
                        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama-head-dim": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral-gqa1": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1)),
}


def _save(folder, case, dtype=torch.float32, shard=None, seed=0):
    config_name, model_name, extra = CASES[case]
    config = getattr(transformers, config_name)(**{**SIZES, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype)
    with torch.no_grad():  # biases start at zero: make them visible
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.copy_(torch.randn_like(p))
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(folder, **kwargs)
    return model


def _expected(model, config):
    """The state_dict as float arrays, the tied head dropped (transformers does not save it)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        out[name] = t.detach().to(torch.float64).numpy()  # fp16/bf16/fp32 -> float64: exact
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_is_transformers_model(tmp_path, case):
    model = _save(tmp_path, case)
    c = read_config(tmp_path)
    tc = model.config
    assert c.architecture == type(model).__name__
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == \
        (tc.vocab_size, tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers)
    assert (c.num_attention_heads, c.num_key_value_heads) == \
        (tc.num_attention_heads, tc.num_key_value_heads)
    attn = model.model.layers[0].self_attn
    assert c.head_dim == attn.head_dim
    assert c.qkv_bias == (attn.q_proj.bias is not None) == (attn.v_proj.bias is not None)
    assert c.o_bias == (attn.o_proj.bias is not None)
    assert c.mlp_bias == (model.model.layers[0].mlp.up_proj.bias is not None)
    assert c.tie_word_embeddings == tc.tie_word_embeddings
    assert c.rms_norm_eps == tc.rms_norm_eps
    assert c.rope_theta == model.config.rope_parameters["rope_theta"]
    assert c.sliding_window == getattr(tc, "sliding_window", None)  # Mistral's default 4096
    assert c.hidden_act == tc.hidden_act  # "silu" both
    assert c.max_position_embeddings == tc.max_position_embeddings
    assert c.rope_scaling_factor == 1.0 and tc.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_weights_equal_state_dict(tmp_path, case, dtype):
    sharded = case in ("llama", "qwen2-tied", "mistral") or dtype == "bfloat16"
    model = _save(tmp_path, case, getattr(torch, dtype), "50KB" if sharded else None)
    assert (tmp_path / INDEX).is_file() == sharded and (tmp_path / SINGLE).is_file() != sharded
    if sharded:
        assert len(set(json.loads((tmp_path / INDEX).read_text())["weight_map"].values())) > 1
    config = read_config(tmp_path)
    expected = _expected(model, config)
    for compute in (np.float32, np.float64):
        loaded = load_weights(tmp_path, config, dtype=compute)
        assert set(loaded) == set(expected)
        for name, a in loaded.items():
            assert a.dtype == compute and a.flags.c_contiguous and not a.flags.writeable
            if dtype != "float32" or compute == np.float32:  # exact: no rounding on the way
                np.testing.assert_array_equal(a, expected[name], err_msg=name)
            else:
                np.testing.assert_array_equal(a, expected[name].astype(np.float32),
                                              err_msg=name)


def test_tied_head_is_not_saved(tmp_path):
    _save(tmp_path, "qwen2-tied")
    from safetensors import safe_open
    with safe_open(tmp_path / SINGLE, "np") as f:
        assert "lm_head.weight" not in f.keys()


def test_sliding_window_and_linear_rope_from_transformers(tmp_path):
    config = transformers.MistralConfig(**SIZES, sliding_window=16)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path / "m")
    c = read_config(tmp_path / "m")
    assert (c.sliding_window, c.max_sequence_length) == (16, 16)
    for use, first, window in ((True, 1, 16), (True, 2, None), (False, 0, None)):
        config = transformers.Qwen2Config(**SIZES, use_sliding_window=use, sliding_window=16,
                                          max_window_layers=first)
        folder = tmp_path / f"q{use}{first}"
        transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
        assert read_config(folder).sliding_window == window
    config = transformers.LlamaConfig(**SIZES, rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "l")
    c = read_config(tmp_path / "l")
    assert (c.rope_theta, c.rope_scaling_factor) == (500.0, 4.0)
    config = transformers.LlamaConfig(**SIZES, rope_parameters={
        "rope_type": "dynamic", "factor": 4.0, "rope_theta": 500.0})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="dynamic"):
        read_config(tmp_path / "d")


def test_activation_names_compute_transformers_functions():
    from transformers.activations import ACT2FN

    from minilora.models.config import ACTIVATIONS
    from minilora.ops.blocks import activation_forward

    e = np.linspace(-6, 6, 201)
    for name, ours in ACTIVATIONS.items():
        want = ACT2FN[name](torch.from_numpy(e)).numpy()
        np.testing.assert_allclose(activation_forward(e, ours), want, rtol=1e-12, atol=1e-14,
                                   err_msg=name)


@pytest.mark.parametrize("name", ["LlamaConfig", "Qwen2Config", "MistralConfig"])
def test_missing_keys_read_as_transformers_reads_them(tmp_path, name):
    """A config.json with only the required sizes: the defaults transformers fills in."""
    d = {"model_type": name[:-6].lower(), "vocab_size": 64, "hidden_size": 64,
         "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 32}
    (tmp_path / "config.json").write_text(json.dumps(d))
    tc = getattr(transformers, name).from_pretrained(tmp_path)
    c = read_config(tmp_path)
    assert (c.num_key_value_heads, c.head_dim, c.rms_norm_eps, c.tie_word_embeddings) == \
        (tc.num_key_value_heads, tc.head_dim if getattr(tc, "head_dim", None) else 2,
         tc.rms_norm_eps, tc.tie_word_embeddings)
    assert c.rope_theta == tc.rope_parameters["rope_theta"]
    assert c.hidden_act == tc.hidden_act
    assert c.max_position_embeddings == tc.max_position_embeddings
    windows = set(getattr(tc, "layer_types", None) or ["full_attention"])
    assert c.sliding_window == (tc.sliding_window if "sliding_attention" in windows
                                or name == "MistralConfig" else None)
    if name == "Qwen2Config":  # the window in use once switched on: class defaults 4096, 28
        d.update(use_sliding_window=True, num_hidden_layers=30)
        (tmp_path / "config.json").write_text(json.dumps(d))
        tc = transformers.Qwen2Config.from_pretrained(tmp_path)
        assert tc.layer_types[28] == "sliding_attention" and tc.sliding_window == 4096
        assert read_config(tmp_path).sliding_window == 4096


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_pretrained_end_to_end(tmp_path, case):
    """from_pretrained builds the decoder on exactly the loaded weights; its float64 logits are
    transformers' (to 1e-5 here: transformers computes its rotary tables in float32 even in a
    float64 model, so this checks the loading, not the decoder's last digits)."""
    from minilora.models.pretrained import from_pretrained

    reference = _save(tmp_path, case, torch.float64, "50KB")
    model = from_pretrained(tmp_path, dtype=np.float64)
    assert model.config == read_config(tmp_path)
    expected = _expected(reference, model.config)
    assert set(model.weights) == set(expected)
    for name, a in model.weights.items():
        np.testing.assert_array_equal(a, expected[name], err_msg=name)
    ids = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (2, 7))
    logits, _ = model.forward(ids)
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - want).max() <= 1e-5 * np.abs(want).max()


# (config class, edit of its saved config.json, the key our message names): transformers refuses
# each too, so refusing it here loses no model transformers would load.
BASE = dict(SIZES, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=64)
REFUSED_BY_BOTH = [
    *[(name, {key: None}, key) for name in ("LlamaConfig", "Qwen2Config", "MistralConfig")
      for key in ("rms_norm_eps", "hidden_act", "max_position_embeddings",
                  "tie_word_embeddings")],
    *[("LlamaConfig", {key: None}, key) for key in ("attention_bias", "mlp_bias")],
    *[("Qwen2Config", {key: None}, key) for key in ("use_sliding_window", "max_window_layers",
                                                     "attention_dropout")],
    *[("MistralConfig", {key: None}, key) for key in ("num_key_value_heads",
                                                       "attention_dropout")],
    ("LlamaConfig", {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 8},
     "num_attention_heads"),
    ("LlamaConfig", {"rms_norm_eps": 1}, "rms_norm_eps"),
    ("Qwen2Config", {"layer_types": ["full_attention"]}, "layer_types"),
    ("Qwen2Config", {"layer_types": ["full_attention", "x"]}, "layer_types"),
    ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8,
                     "layer_types": ["sliding_attention"] * 3}, "layer_types"),
]


@pytest.mark.parametrize("name,edit,key", REFUSED_BY_BOTH,
                         ids=[f"{n}-{k}-{i}" for i, (n, _, k) in enumerate(REFUSED_BY_BOTH)])
def test_refused_here_and_by_transformers(tmp_path, name, edit, key):
    d = {**getattr(transformers, name)(**BASE).to_dict(), **edit}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(Exception):  # noqa: B017 (transformers' own strict-dataclass errors)
        getattr(transformers, name).from_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        read_config(tmp_path)
    assert str(path) in str(e.value) and key in str(e.value), str(e.value)
    # and the unedited file reads in both
    path.write_text(json.dumps(getattr(transformers, name)(**BASE).to_dict()))
    getattr(transformers, name).from_pretrained(tmp_path)
    read_config(tmp_path)


@pytest.mark.parametrize("name", ["Qwen2Config", "MistralConfig"])
@pytest.mark.parametrize("head_dim", [None, 8])
def test_heads_not_dividing_hidden_read_as_transformers_builds_them(tmp_path, name, head_dim):
    """Qwen2 and Mistral accept hidden_size % heads != 0: head_dim given, else the floor."""
    sizes = {**SIZES, "hidden_size": 36, "num_attention_heads": 3, "num_key_value_heads": 1}
    extra = {} if head_dim is None else {"head_dim": head_dim}
    model = getattr(transformers, name[:-6] + "ForCausalLM")(
        getattr(transformers, name)(**sizes, **extra))
    model.save_pretrained(tmp_path)
    c = read_config(tmp_path)
    assert c.head_dim == model.model.layers[0].self_attn.head_dim == (head_dim or 12)
    loaded = load_weights(tmp_path, c, dtype=np.float64)
    expected = _expected(model, c)
    assert set(loaded) == set(expected)
    for key, a in loaded.items():
        np.testing.assert_array_equal(a, expected[key], err_msg=key)


def test_sliding_marks_without_a_window_crash_transformers_and_are_refused(tmp_path):
    """Qwen2 with layers marked sliding_attention but use_sliding_window false: transformers
    loads the config and builds the model, but its forward has no window for the mask."""
    config = transformers.Qwen2Config(**SIZES, use_sliding_window=False, sliding_window=4,
                                      layer_types=["sliding_attention"] * 2)
    model = transformers.Qwen2ForCausalLM(config)
    with pytest.raises(TypeError), torch.no_grad():
        model(torch.zeros((1, 3), dtype=torch.long))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="layer_types marks sliding_attention") as e:
        read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def _transformers_model(tc, name):
    """What transformers' config ``tc`` computes, in ModelConfig's terms."""
    rope = tc.rope_parameters
    out = dict(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
               intermediate_size=tc.intermediate_size, num_hidden_layers=tc.num_hidden_layers,
               num_attention_heads=tc.num_attention_heads,
               num_key_value_heads=tc.num_key_value_heads,
               head_dim=getattr(tc, "head_dim", None)
               or tc.hidden_size // tc.num_attention_heads,
               rms_norm_eps=tc.rms_norm_eps, rope_theta=rope["rope_theta"],
               rope_scaling_factor=rope["factor"] if rope["rope_type"] == "linear" else 1.0,
               tie_word_embeddings=tc.tie_word_embeddings,
               max_position_embeddings=tc.max_position_embeddings)
    if name == "LlamaConfig":
        out.update(qkv_bias=tc.attention_bias, o_bias=tc.attention_bias, mlp_bias=tc.mlp_bias)
    if name == "MistralConfig":
        out["sliding_window"] = tc.sliding_window
    if name == "Qwen2Config":
        out["sliding_window"] = (tc.sliding_window if "sliding_attention" in tc.layer_types
                                 else None)
    return out


POOL = st.sampled_from([None, True, False, 0, 1, 2, 3, 4, 6, 8, 16, 32, 1.0, 0.5, 1e-5, -1,
                        "silu", "gelu", "relu", "linear", "swish", "gelu_pytorch_tanh",
                        "gelu_new", "llama", "qwen2", "mistral", 2.0, "4", 1e9, 10000,
                        ["LlamaForCausalLM"], ["Qwen2ForCausalLM"], [], ["full_attention"] * 2,
                        ["sliding_attention", "full_attention"],
                        {"rope_type": "linear", "factor": 2.0},
                        {"rope_type": "default", "rope_theta": 100.0},
                        {"type": "linear", "factor": 3}, {"rope_type": "yarn", "factor": 2.0},
                        {"rope_type": "linear", "factor": 0.5, "rope_theta": 7},
                        {"factor": 2.0}, {}, {"rope_type": "dynamic", "factor": 2.0}])
KEYS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta", "tie_word_embeddings",
        "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
        "max_window_layers", "layer_types", "attention_dropout", "max_position_embeddings",
        "partial_rotary_factor", "num_hidden_layers", "vocab_size", "intermediate_size",
        "model_type", "architectures", "pretraining_tp", "num_experts"]


@given(name=st.sampled_from(["LlamaConfig", "Qwen2Config", "MistralConfig"]), data=st.data())
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_config_read_here_is_the_model_transformers_builds(tmp_path_factory, name, data):
    """Mutated config.json files: whenever read_config accepts one, transformers accepts it
    too and describes the same computation (sizes, heads, norms, rope, biases, window)."""
    d = getattr(transformers, name)(**BASE).to_dict()
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(KEYS))
        if data.draw(st.booleans()) and key in d:
            del d[key]
        else:
            d[key] = data.draw(POOL)
    folder = tmp_path_factory.mktemp("c")
    (folder / "config.json").write_text(json.dumps(d))
    try:
        c = read_config(folder)
    except ValueError as e:
        assert str(folder / "config.json") in str(e)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tc = getattr(transformers, name).from_pretrained(folder)  # must not refuse
    want = _transformers_model(tc, name)
    assert {k: getattr(c, k) for k in want} == want, d
