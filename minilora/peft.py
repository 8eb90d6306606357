"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

    adapters = ml.peft.load_adapter("path/to/adapter")     # {"q_proj": Adapter, ...}
    ml.peft.save_adapter("out/", adapters)                  # a folder PEFT's from_pretrained loads

LoRA, rsLoRA and DoRA adapters of linear (and Conv1D) layers. Tensor names follow PEFT:
``base_model.model.<module>.lora_A.weight`` (r, d_in), ``...lora_B.weight`` (d_out, r) and, for
DoRA, ``...lora_magnitude_vector`` (d_out,). Per-module ranks and alphas go through PEFT's
``rank_pattern`` and ``alpha_pattern``. The safetensors file is read and written with NumPy
(``minilora.safetensors``), so no extra package is needed.
"""

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from minilora import safetensors
from minilora._io import write_atomic
from minilora.functional import lora_scaling

PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|"
                  r"lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")


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


def _pattern_value(patterns, module, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name's suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(path):
    """Read a PEFT adapter folder into ``{module_name: Adapter}``; AdapterError if unusable."""
    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except OSError as e:
        raise AdapterError(f"{config_path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_path}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    try:
        tensors, _ = safetensors.load(weights_path)
    except safetensors.SafetensorsError as e:
        raise AdapterError(str(e)) from None
    parts = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{weights_path}: tensor {key!r} is not a LoRA/DoRA weight")
        parts.setdefault(match["module"], {})[match["part"]] = value
    adapters = {}
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise AdapterError(f"{weights_path}: module {module!r} lacks lora_A or lora_B")
        A, B = p["lora_A"], p["lora_B"]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise AdapterError(f"{weights_path}: module {module!r}: lora_A {A.shape} and "
                               f"lora_B {B.shape} are not (r, d_in) and (d_out, r)")
        use_dora = bool(config.get("use_dora", False))
        m = p.get("lora_magnitude_vector")
        if use_dora and (m is None or m.shape != (B.shape[0],)):
            raise AdapterError(f"{weights_path}: DoRA module {module!r} needs a "
                               f"lora_magnitude_vector of shape ({B.shape[0]},)")
        r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", A.shape[0]))
        if r != A.shape[0]:
            raise AdapterError(f"{weights_path}: module {module!r} has rank {A.shape[0]}, "
                               f"the config says {r}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module,
                               config.get("lora_alpha", 8))
        adapters[module] = Adapter(A, B, float(alpha), bool(config.get("use_rslora", False)),
                                   bool(config.get("fan_in_fan_out", False)), use_dora,
                                   m if use_dora else None)
    return adapters


def save_adapter(path, adapters, *, base_model_name_or_path=None):
    """Write ``{module_name: Adapter or LoRALinear}`` as a PEFT adapter folder.

    All adapters must agree on use_rslora, use_dora and fan_in_fan_out (PEFT keeps one value per
    config); ranks and alphas may differ (written as rank_pattern and alpha_pattern). Both files
    are written atomically.
    """
    if not adapters:
        raise ValueError("no adapters to save")
    adapters = {name: a if isinstance(a, Adapter) else Adapter.from_layer(a)
                for name, a in adapters.items()}
    first = next(iter(adapters.values()))
    for name, a in adapters.items():
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
            if getattr(a, flag) != getattr(first, flag):
                raise ValueError(f"adapters disagree on {flag}: {name!r} has "
                                 f"{getattr(a, flag)}, another {getattr(first, flag)}")
    r, alpha = first.r, first.alpha
    tensors = {}
    for name, a in adapters.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = a.B
        if a.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = a.m
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(adapters), "use_rslora": first.use_rslora,
        "use_dora": first.use_dora, "fan_in_fan_out": first.fan_in_fan_out,
        "rank_pattern": {n: a.r for n, a in adapters.items() if a.r != r},
        "alpha_pattern": {n: a.alpha for n, a in adapters.items() if a.alpha != alpha},
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    os.makedirs(path, exist_ok=True)
    safetensors.save(os.path.join(path, "adapter_model.safetensors"), tensors,
                     {"format": "pt"})
    write_atomic(os.path.join(path, "adapter_config.json"),
                 json.dumps(config, indent=2).encode())
