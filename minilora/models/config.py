"""A transformers ``config.json`` read strictly into the model minilora builds.

Three architectures share one decoder (``minilora.models.llama``): LLaMA, Qwen2 (bias on q, k
and v) and Mistral. Every key that changes what the model computes is read and checked; a value
minilora cannot compute exactly (a rope scaling other than none or linear, mixture-of-experts
keys, partial rotary, dropout in attention) is a ValueError naming the file and the key, never a
silently different model. Keys that do not change the computation (token ids, torch_dtype,
use_cache, transformers_version, initializer_range ...) are ignored.

Sliding-window attention (Mistral's ``sliding_window``, used whenever it is not null; Qwen2's
only when ``use_sliding_window``, on the layers ``layer_types`` marks ``sliding_attention``, else
those from ``max_window_layers`` on, as Qwen2Config decides): transformers 5 masks key s for
query t unless ``s > t − w`` (masking_utils.sliding_window_overlay), so a query sees the keys at
most w − 1 positions back. For sequences of at most w tokens that is plain causal attention,
so the window is kept as ``sliding_window`` and the model must refuse longer sequences
(``max_sequence_length`` = min(max_position_embeddings, w)) rather than compute something else.
A window no smaller than max_position_embeddings therefore changes nothing.

``pretraining_tp`` is type-checked and ignored: transformers 5's LLaMA no longer reads it (it
only ever split the same matrix products). ``attention_dropout`` other than 0 is refused: it is
used in training, where minilora trains (LoRA's own dropout is the adapter's).
"""

import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

from minilora.formats._json import read_json

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "MistralForCausalLM": "mistral"}
# transformers' activation names -> minilora.ops.blocks.ACTIVATIONS
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}
MAX_SIZE = 2**20  # hidden_size, intermediate_size, head_dim, number of heads
MAX_VOCAB = 2**22
MAX_LAYERS = 4096
MAX_POSITIONS = 2**24
MAX_PARAMETERS = 2**40  # a model beyond this is no model this code will hold
# transformers' class defaults of max_position_embeddings
DEFAULT_POSITIONS = {"llama": 2048, "qwen2": 32768, "mistral": 4096 * 32}
# Keys whose presence means a computation the decoder does not have.
MOE_KEYS = ("num_experts", "num_local_experts", "num_experts_per_tok", "n_routed_experts",
            "moe_intermediate_size")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's sizes and options. d = hidden_size, H = num_attention_heads,
    Hkv = num_key_value_heads, D = head_dim, F = intermediate_size, V = vocab_size."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float = 1.0  # 1.0: none; else linear: positions divided by it
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # one of minilora.ops.blocks.ACTIVATIONS
    sliding_window: int | None = None  # a window in use bounds the sequence length

    def __post_init__(self):
        _check(self, "ModelConfig")

    @property
    def max_sequence_length(self):
        """The longest sequence (past + new tokens) the model computes exactly."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    def check_sequence_length(self, length):
        """ValueError unless ``length`` positions (past + new tokens) are computed exactly: at
        most max_position_embeddings, and at most sliding_window when a window is in use (beyond
        it transformers' mask hides the oldest keys, which this decoder does not)."""
        if length > self.max_sequence_length:
            key = ("sliding_window" if self.sliding_window is not None
                   and self.sliding_window < self.max_position_embeddings
                   else "max_position_embeddings")
            raise ValueError(f"a sequence of {length} positions is longer than the model's "
                             f"{key} = {getattr(self, key)}: not computed here")

    @property
    def num_parameters(self):
        """The base model's parameter count."""
        return _parameter_count(self)

    @classmethod
    def from_dict(cls, d, *, where="config.json"):
        """A ModelConfig from a transformers config dict; ValueError naming ``where`` and the
        key for anything it cannot represent."""
        values = _read(d, where)
        defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        _check(SimpleNamespace(**{**defaults, **values}), where)  # naming the file
        return cls(**values)


def read_config(path):
    """``config.json`` (a path to it, or the model folder holding it) as a ModelConfig."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    return ModelConfig.from_dict(read_json(path), where=str(path))


def _parameter_count(c):
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads
                                              + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    head = 1 if c.tie_word_embeddings else 2
    return (head * c.vocab_size * c.hidden_size + c.hidden_size
            + c.num_hidden_layers * (attention + mlp + 2 * c.hidden_size))


def _check(c, where):
    """The checks a ModelConfig's values must pass, however it was made."""
    def fail(key, message):
        raise ValueError(f"{where}: {key} {message}")

    if c.architecture not in ARCHITECTURES:
        fail("architecture", f"must be one of {sorted(ARCHITECTURES)}, got {c.architecture!r}")
    for key, bound in (("vocab_size", MAX_VOCAB), ("hidden_size", MAX_SIZE),
                       ("intermediate_size", MAX_SIZE), ("num_hidden_layers", MAX_LAYERS),
                       ("num_attention_heads", MAX_SIZE), ("num_key_value_heads", MAX_SIZE),
                       ("head_dim", MAX_SIZE), ("max_position_embeddings", MAX_POSITIONS)):
        value = getattr(c, key)
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, f"must be an integer, got {type(value).__name__} {value!r}")
        if not 1 <= value <= bound:
            fail(key, f"must be in [1, {bound}], got {value}")
    if c.num_attention_heads % c.num_key_value_heads:
        fail("num_key_value_heads", f"must divide num_attention_heads = "
             f"{c.num_attention_heads}, got {c.num_key_value_heads}")
    if c.head_dim % 2:
        fail("head_dim", f"must be even (rotary embedding rotates pairs), got {c.head_dim}")
    for key, low in (("rms_norm_eps", 0.0), ("rope_theta", 1.0), ("rope_scaling_factor", 0.0)):
        value = getattr(c, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, f"must be a number, got {type(value).__name__} {value!r}")
        if not (math.isfinite(value) and value > low):
            fail(key, f"must be a finite number above {low}, got {value}")
    for key in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
        if not isinstance(getattr(c, key), bool):
            fail(key, f"must be true or false, got {getattr(c, key)!r}")
    if c.hidden_act not in ACTIVATIONS.values():
        fail("hidden_act", f"must be one of {sorted(set(ACTIVATIONS.values()))}, "
             f"got {c.hidden_act!r}")
    w = c.sliding_window
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
        fail("sliding_window", f"must be null or a positive integer, got {w!r}")
    if _parameter_count(c) > MAX_PARAMETERS:
        fail("(sizes)", f"describe {_parameter_count(c):.3g} parameters, more than "
             f"{MAX_PARAMETERS:.3g}")


def _read(d, where):
    """The ModelConfig keyword arguments in a transformers config dict."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must hold a JSON object, got {type(d).__name__}")

    def fail(key, message):
        raise ValueError(f"{where}: {key} {message}")

    def get(key, kinds, describe, default=..., null=True):
        """d[key] of one of ``kinds``; missing: ``default`` (required if none); null: the
        default too where transformers' config class reads null so (``null``), else refused
        as transformers' strict fields refuse it."""
        if key not in d or (d[key] is None and null and default is not ...):
            if default is ...:
                fail(key, "is missing")
            return default
        value = d[key]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            fail(key, f"must be {describe}, got {type(value).__name__} {value!r}")
        return value

    architecture = _architecture(d, where, get)
    model_type = ARCHITECTURES[architecture]
    for key in MOE_KEYS:
        if d.get(key) not in (None, 0):
            fail(key, "is set: mixture-of-experts models are not this decoder")
    integer, number, flag = (int,), (int, float), (bool,)
    hidden = get("hidden_size", integer, "an integer")
    heads = get("num_attention_heads", integer, "an integer")
    if model_type == "llama" and isinstance(heads, int) and heads > 0 and hidden % heads:
        # LlamaConfig.validate_architecture refuses it even with head_dim given; Qwen2 and
        # Mistral build head_dim (given, else hidden_size // num_attention_heads) heads anyway
        fail("hidden_size", f"{hidden} is not a multiple of num_attention_heads {heads}")
    out = {
        "architecture": architecture,
        "vocab_size": get("vocab_size", integer, "an integer"),
        "hidden_size": hidden,
        "intermediate_size": get("intermediate_size", integer, "an integer"),
        "num_hidden_layers": get("num_hidden_layers", integer, "an integer"),
        "num_attention_heads": heads,
        # missing: the class default (Qwen2Config 32, MistralConfig 8); null: heads (post_init)
        "num_key_value_heads": get("num_key_value_heads", integer, "an integer", heads,
                                   null=model_type != "mistral")  # MistralConfig: int only
        if "num_key_value_heads" in d or model_type == "llama"
        else {"qwen2": 32, "mistral": 8}[model_type],
        "head_dim": get("head_dim", integer, "an integer",
                        hidden // heads if isinstance(heads, int) and heads > 0 else 0),
        # a float, as transformers' strict field (an integer such as 1 is refused there)
        "rms_norm_eps": get("rms_norm_eps", (float,), "a float", 1e-6, null=False),
        "max_position_embeddings": get("max_position_embeddings", integer, "an integer",
                                       DEFAULT_POSITIONS[model_type], null=False),
        "tie_word_embeddings": get("tie_word_embeddings", flag, "true or false", False,
                                   null=False),
    }
    act = get("hidden_act", (str,), "a string", "silu", null=False)
    if act not in ACTIVATIONS:
        fail("hidden_act", f"must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    out["hidden_act"] = ACTIVATIONS[act]
    out["rope_theta"], out["rope_scaling_factor"] = _rope(d, where, get)
    if model_type == "qwen2":  # q, k and v carry a bias, o does not (Qwen2Attention)
        out["qkv_bias"], out["o_bias"] = True, False
    elif model_type == "llama":
        bias = get("attention_bias", flag, "true or false", False, null=False)
        out["qkv_bias"] = out["o_bias"] = bias
        out["mlp_bias"] = get("mlp_bias", flag, "true or false", False, null=False)
        get("pretraining_tp", integer, "an integer", 1)  # a sliced matmul: the same products
    dropout = get("attention_dropout", number, "a number", 0.0,
                  null=model_type == "llama")  # null: LlamaConfig only (and no dropout)
    if dropout != 0:
        fail("attention_dropout", f"is {dropout}: dropout on attention probabilities is not "
             f"computed here (LoRA's own dropout is the adapter's)")
    out["sliding_window"] = _sliding_window(d, where, get, model_type, out["num_hidden_layers"])
    return out


def _architecture(d, where, get):
    archs = get("architectures", (list,), "a list of one architecture name", None)
    model_type = get("model_type", (str,), "a string", None)
    if archs == []:  # transformers reads the class from model_type then
        archs = None
    if archs is not None:
        if len(archs) != 1 or not isinstance(archs[0], str):
            raise ValueError(f"{where}: architectures must list one name, got {archs!r}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"{where}: architectures names {arch!r}; minilora builds "
                             f"{sorted(ARCHITECTURES)}")
        if model_type is not None and model_type != ARCHITECTURES[arch]:
            raise ValueError(f"{where}: model_type {model_type!r} disagrees with "
                             f"architectures {arch!r}")
        return arch
    by_type = {t: a for a, t in ARCHITECTURES.items()}
    if model_type not in by_type:
        raise ValueError(f"{where}: model_type must be one of {sorted(by_type)} (or "
                         f"architectures given), got {model_type!r}")
    return by_type[model_type]


def _rope(d, where, get):
    """(rope_theta, linear scaling factor) from transformers 5's ``rope_parameters`` or the
    older ``rope_scaling``, read with transformers' priorities
    (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict): a non-empty ``rope_scaling`` over
    ``rope_parameters``, the dict's ``rope_theta`` over the top-level one, then 10000."""
    params = get("rope_parameters", (dict,), "an object", None)
    scaling = get("rope_scaling", (dict,), "an object", None)
    key = "rope_scaling" if scaling else "rope_parameters"
    spec = dict(scaling or params or {})
    for name, value in spec.items():
        if isinstance(value, dict):  # per-layer-type parameters (nested): not this decoder's
            raise ValueError(f"{where}: {key}.{name} is an object: per-layer rope parameters "
                             f"are not computed here")
    theta = spec.pop("rope_theta", None)
    if theta is None:
        theta = get("rope_theta", (int, float), "a number", 10000.0)
    elif isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"{where}: {key}.rope_theta must be a number, got {theta!r}")
    kind = spec.pop("rope_type", spec.pop("type", "default"))
    factor = 1.0
    if kind == "linear":
        factor = spec.pop("factor", None)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ValueError(f"{where}: {key}.factor must be a number for linear rope, "
                             f"got {factor!r}")
    elif kind != "default":
        raise ValueError(f"{where}: {key}.rope_type {kind!r} is not computed here (none or "
                         f"linear only)")
    partial = spec.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor {partial!r}: only full rotary "
                         f"embedding is computed here")
    return float(theta), float(factor)


def _sliding_window(d, where, get, model_type, layers):
    """The window in use, or None (see the module docstring)."""
    if d.get("layer_types") is not None:  # PreTrainedConfig checks it for every architecture
        _layer_types(d["layer_types"], where, layers)
    if model_type == "llama":
        return None
    # missing: the class default 4096 (MistralConfig, Qwen2Config); null: no window
    window = 4096 if "sliding_window" not in d else \
        get("sliding_window", (int,), "null or an integer", None)
    if model_type == "mistral":
        return window
    # Qwen2, as Qwen2Config.__post_init__: the window is dropped unless use_sliding_window;
    # layer_types, when absent, marks sliding_attention the layers from max_window_layers on
    # if a window is left. Every one of these keys is checked as Qwen2Config checks it (types;
    # layer_types one known name per layer), whether the window is used or not.
    use = get("use_sliding_window", (bool,), "true or false", False, null=False)
    first = get("max_window_layers", (int,), "an integer", 28, null=False)  # the class default
    if not use:
        window = None
    kinds = d.get("layer_types")
    if kinds is None:
        kinds = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(layers)]
    if window is None and "sliding_attention" in kinds:
        # transformers builds this model but cannot run it (its sliding mask needs a window)
        raise ValueError(f"{where}: layer_types marks sliding_attention layers but no window "
                         f"is in use (use_sliding_window {use}, sliding_window "
                         f"{d.get('sliding_window')!r}): transformers' Qwen2 cannot compute it")
    return window if "sliding_attention" in kinds else None


def _layer_types(kinds, where, layers):
    """transformers' check of ``layer_types`` (PreTrainedConfig.validate_layer_type), narrowed
    to the two kinds of attention these architectures have."""
    if (not isinstance(kinds, list)
            or any(k not in ("full_attention", "sliding_attention") for k in kinds)):
        raise ValueError(f"{where}: layer_types must list full_attention / sliding_attention, "
                         f"got {kinds!r}")
    if len(kinds) != layers:
        raise ValueError(f"{where}: layer_types lists {len(kinds)} layers, num_hidden_layers "
                         f"is {layers}")


FIELDS = tuple(f.name for f in fields(ModelConfig))
