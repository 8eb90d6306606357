"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

    adapters = ml.peft.load_adapter("path/to/adapter")     # {"q_proj": Adapter, ...}
    ml.peft.save_adapter("out/", adapters)                  # a folder PEFT's from_pretrained loads

LoRA, rsLoRA and DoRA adapters of linear (and Conv1D) layers. Tensor names follow PEFT:
``base_model.model.<module>.lora_A.weight`` (r, d_in), ``...lora_B.weight`` (d_out, r) and, for
DoRA, ``...lora_magnitude_vector`` (d_out,). Per-module ranks and alphas go through PEFT's
``rank_pattern`` and ``alpha_pattern``. The safetensors file is read and written with NumPy
(``minilora.formats.safetensors``), so no extra package is needed.
"""

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from minilora.formats import safetensors
from minilora.formats._io import write_folder_atomic
from minilora.formats._json import nesting_depth, no_constant
from minilora.ops.functional import lora_scaling

try:  # the regex parser: re._parser from Python 3.11 on
    from re import _parser as _re_parser
except ImportError:  # pragma: no cover
    import sre_parse as _re_parser

PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                  r"lora_magnitude_vector)$")
CONFIG_DEPTH = 100  # nesting of adapter_config.json beyond which it is refused
MAX_PATTERN = 256  # characters of a rank_pattern/alpha_pattern/target_modules regex
MAX_MODULE_NAME = 512  # characters of a module name matched against those patterns
MAX_UNBOUNDED_REPEATS = 3  # per pattern: with PEFT's own .* they bound matching to O(n⁴)

# Config keys whose non-default value changes what the adapter computes in ways minilora does not
# represent: refused rather than ignored.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")  # PEFT's TaskType values (task_type may also be null)

UNSUPPORTED = {"lora_bias": False, "layer_replication": None, "target_parameters": None,
               "trainable_token_indices": None, "alora_invocation_tokens": None,
               "use_qalora": False, "layers_to_transform": None}


class AdapterError(ValueError):
    """An adapter folder that cannot be read as a PEFT LoRA/DoRA adapter."""


@dataclass
class Adapter:
    """One module's adapter. y = x Wᵀ + s·(x Aᵀ) Bᵀ (DoRA: rescaled rows, see ``dora_forward``)."""

    A: np.ndarray  # (r, d_in)
    B: np.ndarray  # (d_out, r)
    alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False
    m: np.ndarray | None = None  # (d_out,), DoRA's magnitude

    @property
    def r(self):
        return self.A.shape[0]

    @property
    def scaling(self):
        return lora_scaling(self.alpha, self.r, use_rslora=self.use_rslora)

    @classmethod
    def from_layer(cls, layer):
        """The adapter of a ``LoRALinear`` (copies of its A, B and m)."""
        return cls(layer.A.copy(), layer.B.copy(), float(layer.alpha), layer.use_rslora,
                   layer.fan_in_fan_out, layer.use_dora,
                   None if layer.m is None else layer.m.copy())


def _check_pattern(pattern, where):
    """Refuse a regex that could take exponential (or large polynomial) time to match: a
    quantifier over something that itself repeats or alternates, a backreference, more than
    ``MAX_UNBOUNDED_REPEATS`` unbounded quantifiers. Real PEFT keys (``q_proj``,
    ``model\\.layers\\.\\d+\\.mlp``) pass."""
    if not isinstance(pattern, str):
        raise AdapterError(f"{where}: {pattern!r} is not a string")
    if len(pattern) > MAX_PATTERN:
        raise AdapterError(f"{where}: pattern longer than {MAX_PATTERN} characters")
    try:
        parsed = _re_parser.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterError(f"{where}: {pattern!r} is not a valid regular expression ({e})") \
            from None
    repeats = [0]

    def walk(items, inside_repeat):
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                _, hi, sub = arg
                if hi > 1:
                    if inside_repeat:
                        raise AdapterError(f"{where}: {pattern!r} nests quantifiers, which can "
                                           f"take exponential time to match")
                    repeats[0] += hi == _re_parser.MAXREPEAT
                walk(sub, inside_repeat or hi > 1)
            elif name == "BRANCH":
                if inside_repeat:
                    raise AdapterError(f"{where}: {pattern!r} repeats an alternation, which can "
                                       f"take exponential time to match")
                for branch in arg[1]:
                    walk(branch, inside_repeat)
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                raise AdapterError(f"{where}: {pattern!r} uses a backreference")
            elif name in ("SUBPATTERN", "ATOMIC_GROUP", "ASSERT", "ASSERT_NOT"):
                walk(arg[-1], inside_repeat)

    walk(parsed, False)
    if repeats[0] > MAX_UNBOUNDED_REPEATS:
        raise AdapterError(f"{where}: {pattern!r} has more than {MAX_UNBOUNDED_REPEATS} "
                           f"unbounded quantifiers")
    return pattern


def _pattern_value(patterns, module, default):
    """PEFT's rank_pattern/alpha_pattern lookup (``peft.utils.other.get_pattern_key``): the first
    key that matches a suffix of the module name, ``(.*\\.)?(key)$``; patterns checked first."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targeted(target_modules, exclude_modules, module):
    """Whether PEFT puts a LoRA layer on ``module`` (``check_target_module_exists``)."""
    if isinstance(exclude_modules, str):
        if re.fullmatch(exclude_modules, module):
            return False
    elif exclude_modules and (module in exclude_modules or any(
            module.endswith(f".{k}") for k in exclude_modules)):
        return False
    if target_modules is None:
        return True  # no list to check against (PEFT filled in its defaults when saving)
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return module in target_modules or any(module.endswith(f".{k}") for k in target_modules)


def _read_config(config_path):
    """adapter_config.json as a dict, every value minilora uses checked for its JSON type."""
    try:
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise AdapterError(f"{config_path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise AdapterError(f"{config_path}: not UTF-8 ({e})") from None
    if nesting_depth(text) > CONFIG_DEPTH:
        raise AdapterError(f"{config_path}: nests deeper than {CONFIG_DEPTH} levels")
    try:
        config = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{config_path}: not valid JSON ({e})") from None
    return _check_config(config, config_path)


def _check_config(config, config_path):
    """The config's values that minilora uses, each checked for its JSON type and value (the
    one check of a config, for ``load_adapter`` and ``save_adapter`` alike)."""
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: must hold a JSON object, got {type(config).__name__}")

    def get(key, kinds, default, describe):
        value = config.get(key, default)
        if value is None and default is None:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise AdapterError(f"{config_path}: {key} must be {describe}, got {value!r}")
        return value

    if get("peft_type", (str,), "LORA", "a string") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config['peft_type']!r} is not LORA")
    out = {"r": get("r", (int,), 8, "a positive integer"),
           "alpha": get("lora_alpha", (int, float), 8, "a finite number")}
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        out[flag] = get(flag, (bool,), False, "true or false")
    if out["r"] < 1:
        raise AdapterError(f"{config_path}: r must be a positive integer, got {out['r']}")
    if not math.isfinite(out["alpha"]):
        raise AdapterError(f"{config_path}: lora_alpha must be finite, got {out['alpha']}")
    task_type = get("task_type", (str,), None, f"null or one of {TASK_TYPES}")
    if task_type is not None and task_type not in TASK_TYPES:
        raise AdapterError(f"{config_path}: task_type must be null or one of {TASK_TYPES}, "
                           f"got {task_type!r}")
    out["task_type"] = task_type
    bias = get("bias", (str,), "none", 'a string ("none")')
    if bias != "none":
        raise AdapterError(f"{config_path}: bias={bias!r} trains the base layers' biases, "
                           f"which minilora's adapters do not hold (only 'none' is read)")
    if get("modules_to_save", (list,), None, "a list or null"):
        raise AdapterError(f"{config_path}: modules_to_save {config['modules_to_save']!r}: "
                           f"whole trained modules are not LoRA adapters; minilora cannot "
                           f"represent them")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, [], {}, False):
            raise AdapterError(f"{config_path}: {key}={config[key]!r} is not supported")
    for key, kinds, describe in (("rank_pattern", (int,), "positive integers"),
                                 ("alpha_pattern", (int, float), "finite numbers")):
        patterns = get(key, (dict,), None, "an object") or {}
        for pattern, value in patterns.items():
            _check_pattern(pattern, f"{config_path}: {key}")
            if isinstance(value, bool) or not isinstance(value, kinds) or \
                    not math.isfinite(value) or (key == "rank_pattern" and value < 1):
                raise AdapterError(f"{config_path}: {key}[{pattern!r}] must be {describe}, "
                                   f"got {value!r}")
        out[key] = patterns
    for key in ("target_modules", "exclude_modules"):
        targets = get(key, (str, list), None, "a regex string or a list of names")
        if isinstance(targets, str):
            _check_pattern(targets, f"{config_path}: {key}")
        elif targets is not None and not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"{config_path}: {key} must list strings, got {targets!r}")
        out[key] = targets
    return out


def load_adapter(path):
    """Read a PEFT adapter folder into ``{module_name: Adapter}``; AdapterError if unusable.

    Reads what PEFT writes for LoRA, rsLoRA and DoRA on linear and Conv1D layers, and refuses
    (naming the key) what minilora cannot represent or PEFT would read differently: a LoRA
    bias (``lora_B.bias``), trained base biases (``bias`` other than "none"),
    ``modules_to_save``, tensors of a module that ``target_modules`` does not target, a
    magnitude vector without ``use_dora``, non-float or non-finite tensors, config values of
    the wrong JSON type ("false" is not false), and patterns that could take exponential time.
    """
    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    config = _read_config(config_path)
    try:
        tensors, _ = safetensors.load(weights_path)
    except safetensors.SafetensorsError as e:
        raise AdapterError(str(e)) from None
    return _check_tensors(config, tensors, weights_path)


def _check_tensors(config, tensors, weights_path):
    """``{module_name: Adapter}`` from a checked config and ``{key: array}`` named as PEFT
    names them; AdapterError naming the key for anything PEFT would read differently or
    minilora cannot represent (the one check of the tensors, for loading and saving)."""
    parts = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            what = ("a LoRA bias (lora_bias=True), which minilora does not represent"
                    if key.endswith("lora_B.bias") else
                    "not a LoRA/DoRA weight as PEFT saves them "
                    "(base_model.model.<module>.lora_A.weight, .lora_B.weight, "
                    ".lora_magnitude_vector)")
            raise AdapterError(f"{weights_path}: tensor {key!r} is {what}")
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise AdapterError(f"{weights_path}: tensor {key!r} has dtype "
                               f"{getattr(value, 'dtype', type(value).__name__)}, not a float")
        if not np.all(np.isfinite(value)):
            raise AdapterError(f"{weights_path}: tensor {key!r} holds NaN or infinity")
        parts.setdefault(match["module"], {})[match["part"].split(".")[0]] = value
    if not parts:
        raise AdapterError(f"{weights_path}: holds no LoRA weights")
    adapters = {}
    for module, p in parts.items():
        if len(module) > MAX_MODULE_NAME:
            raise AdapterError(f"{weights_path}: module name longer than {MAX_MODULE_NAME} "
                               f"characters: {module[:40]!r}...")
        if not _targeted(config["target_modules"], config["exclude_modules"], module):
            raise AdapterError(f"{weights_path}: module {module!r} is not among target_modules "
                               f"{config['target_modules']!r}: PEFT would not load its weights")
        if "lora_A" not in p or "lora_B" not in p:
            raise AdapterError(f"{weights_path}: module {module!r} lacks lora_A or lora_B")
        A, B = p["lora_A"], p["lora_B"]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise AdapterError(f"{weights_path}: module {module!r}: lora_A {A.shape} and "
                               f"lora_B {B.shape} are not (r, d_in) and (d_out, r)")
        m = p.get("lora_magnitude_vector")
        if config["use_dora"] and (m is None or m.shape != (B.shape[0],)):
            raise AdapterError(f"{weights_path}: DoRA module {module!r} needs a "
                               f"lora_magnitude_vector of shape ({B.shape[0]},)")
        if m is not None and not config["use_dora"]:
            raise AdapterError(f"{weights_path}: module {module!r} has a "
                               f"lora_magnitude_vector but the config says use_dora: false")
        r = _pattern_value(config["rank_pattern"], module, config["r"])
        if r != A.shape[0]:
            raise AdapterError(f"{weights_path}: module {module!r} has rank {A.shape[0]}, "
                               f"the config says {r}")
        alpha = _pattern_value(config["alpha_pattern"], module, config["alpha"])
        adapters[module] = Adapter(A, B, float(alpha), config["use_rslora"],
                                   config["fan_in_fan_out"], config["use_dora"], m)
    return adapters


def _check_round_trip(config, adapters):
    """Each module loads with its own r and alpha: PEFT reads rank_pattern and alpha_pattern
    keys as regular expressions matched against module-name suffixes, so a name with regex
    metacharacters, or one that is another's suffix, could load as a different adapter."""
    r, alpha = config["r"], config["lora_alpha"]
    for name, a in adapters.items():
        got = (_pattern_value(config["rank_pattern"], name, r),
               float(_pattern_value(config["alpha_pattern"], name, alpha)))
        if got != (a.r, float(a.alpha)):
            raise AdapterError(
                f"module {name!r} would load with r={got[0]}, alpha={got[1]} instead of "
                f"r={a.r}, alpha={float(a.alpha)}: PEFT reads rank_pattern and alpha_pattern "
                f"keys as regular expressions matched against module-name suffixes; rename it")


def save_adapter(path, adapters, *, base_model_name_or_path=None, task_type=None):
    """Write ``{module_name: Adapter or LoRALinear}`` as a PEFT adapter folder.

    ``task_type`` is written to the config: None, or one of PEFT's task types ``TASK_TYPES``
    (``"CAUSAL_LM"``, ...).

    All adapters must agree on use_rslora, use_dora and fan_in_fan_out (PEFT keeps one value per
    config); ranks and alphas may differ (written as rank_pattern and alpha_pattern). Everything
    is validated and serialized before anything is written: the config and the tensors go
    through the checks ``load_adapter`` makes (AdapterError, naming the key, for a folder it
    would refuse: a module name that is not a valid pattern, ranks that the written
    rank_pattern would give another module, a non-finite weight, ...), so that what is saved
    loads back equal. Then the folder's two files are replaced in one step
    (``minilora.formats._io.write_folder_atomic``): a failure at any point leaves the old
    adapter whole.
    """
    if not adapters:
        raise ValueError("no adapters to save")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a string, got "
                        f"{type(base_model_name_or_path).__name__}")
    adapters = {name: a if isinstance(a, Adapter) else Adapter.from_layer(a)
                for name, a in adapters.items()}
    first = next(iter(adapters.values()))
    for name, a in adapters.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"module names must be non-empty strings, got {name!r}")
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
            if getattr(a, flag) != getattr(first, flag):
                raise ValueError(f"adapters disagree on {flag}: {name!r} has "
                                 f"{getattr(a, flag)}, another {getattr(first, flag)}")
        lora_scaling(a.alpha, a.r, use_rslora=a.use_rslora)  # alpha a finite number, r >= 1
        if a.use_dora and (a.m is None or np.shape(a.m) != (a.B.shape[0],)):
            raise ValueError(f"DoRA adapter {name!r} needs m of shape ({a.B.shape[0]},)")
    r, alpha = first.r, float(first.alpha)
    tensors = {}
    for name, a in adapters.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = a.B
        if a.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = a.m
    config = {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(adapters), "use_rslora": bool(first.use_rslora),
        "use_dora": bool(first.use_dora), "fan_in_fan_out": bool(first.fan_in_fan_out),
        "rank_pattern": {n: a.r for n, a in adapters.items() if a.r != r},
        "alpha_pattern": {n: float(a.alpha) for n, a in adapters.items()
                          if float(a.alpha) != alpha},
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    config_text = json.dumps(config, indent=2, allow_nan=False)
    path_text = os.fspath(path)
    _check_tensors(_check_config(json.loads(config_text), os.path.join(
        path_text, "adapter_config.json")), tensors, os.path.join(
        path_text, "adapter_model.safetensors"))  # what load_adapter checks, on what it reads
    _check_round_trip(config, adapters)
    files = {"adapter_model.safetensors": safetensors.dumps(tensors, {"format": "pt"}),
             "adapter_config.json": config_text.encode()}
    write_folder_atomic(path, files)
