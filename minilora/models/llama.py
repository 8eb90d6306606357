"""The LLaMA-family decoder (LLaMA, Qwen2, Mistral) with LoRA / DoRA adapters, every gradient by
hand from minilora's forward/backward pairs.

    h₀ = E[ids]                                                    (B, T, d)
    per layer:  a = RMSNorm(h);  q, k, v = a W_qᵀ, a W_kᵀ, a W_vᵀ (+ LoRA);  q, k = RoPE(q, k)
                h ← h + o_proj(attention(q, k, v))
                a = RMSNorm(h);  h ← h + down(act(gate(a)) ⊙ up(a))
    logits = RMSNorm(h) W_lmᵀ  (W_lm = E when the embeddings are tied)   (B, T, V)

The base weights are frozen (read-only, never written); only the adapters' A, B (and DoRA's m)
receive gradients. ``train_base=True`` is the other regime (pretraining, full fine-tuning): the
model holds its own writable copy of every base weight and trains all of them, without adapters:
dW = dyᵀ x and dbias = Σ dy for each projection, dw = Σ dy ⊙ x̂ for each RMSNorm, the LM head's
dlogitsᵀ h and the embedding's scattered rows (docs/math.md). Adapters are keyed by PEFT's
module names (``model.layers.{i}.self_attn.q_proj``).
"""

from typing import NamedTuple

import numpy as np

from minilora.formats import peft
from minilora.models.attention import attention_backward, attention_forward
from minilora.models.config import ModelConfig
from minilora.models.embedding import check_ids, embedding_backward, embedding_forward
from minilora.models.lm_loss import causal_lm_loss, lm_head_loss
from minilora.models.rmsnorm import rmsnorm_backward, rmsnorm_forward
from minilora.models.rope import rope_backward, rope_forward, rope_tables
from minilora.models.weights import expected_shapes
from minilora.ops.backends import resolve_backend
from minilora.ops.blocks import (
    ACTIVATIONS,
    gated_backward,
    gated_product,
    lora_mlp_backward,
    lora_mlp_forward,
    lora_qkv_backward,
    lora_qkv_forward,
)
from minilora.ops.functional import dora_backward, dora_forward, lora_backward, lora_forward
from minilora.toolkit.init import kaiming_uniform

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP


def module_name(layer, projection):
    """PEFT's module name of a projection: ``model.layers.{i}.self_attn.q_proj`` etc."""
    part = "self_attn" if projection in ATTENTION else "mlp"
    return f"model.layers.{layer}.{part}.{projection}"


class ModelCache(NamedTuple):
    """What ``LlamaModel.backward`` needs, and the KV cache for the next decode step."""

    layers: tuple  # per layer a dict of the ops' caches
    final_norm: object  # RMSNormCache of the final norm
    h_final: np.ndarray  # (B, T, d), the final norm's output
    past: tuple  # per layer (k, v), each (B, Hkv, S, D) after RoPE: pass as forward(past=...)
    masks: dict  # {module name: dropout mask} used by this pass
    q_offset: int  # the past length this pass started at
    dtype: np.dtype
    embedding: object  # EmbeddingCache (the ids), for the embedding's gradient (train_base)


class LlamaModel:
    """A LLaMA / Qwen2 / Mistral decoder with LoRA adapters (API.md "Models")."""

    def __init__(self, config, weights, *, backend=None, train_base=False):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if not isinstance(weights, dict):
            raise TypeError(f"weights must be a dict of arrays, got {type(weights).__name__}")
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"config.hidden_act {config.hidden_act!r} is not one of "
                             f"{ACTIVATIONS}")
        c = config
        shapes = expected_shapes(c)  # {transformers name: shape}, as the loader reads them
        missing = sorted(set(shapes) - set(weights))
        extra = sorted(set(weights) - set(shapes))
        if missing or extra:
            raise ValueError(f"weights do not match the config: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        dtype = np.asarray(weights["model.embed_tokens.weight"]).dtype
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"weights must be float32 or float64, got {dtype}")
        frozen = {}
        for key, shape in shapes.items():
            w = weights[key]
            if not isinstance(w, np.ndarray) or w.shape != shape or w.dtype != dtype:
                raise ValueError(f"weight {key!r} must be a {dtype} array of shape {shape}, got "
                                 f"{getattr(w, 'dtype', type(w).__name__)} "
                                 f"{getattr(w, 'shape', '')}")
            if train_base:  # our own trainable copy: the caller's arrays stay as they are
                w = np.array(w, order="C")
            elif w.flags.writeable or not w.flags.c_contiguous:
                w = np.ascontiguousarray(w).copy()  # our own frozen copy; the caller's untouched
                w.flags.writeable = False
            frozen[key] = w
        self.config, self.weights, self.dtype = config, frozen, dtype
        self.backend = resolve_backend(backend)
        self.shapes = {p: shapes[f"{module_name(0, p)}.weight"] for p in TARGETS}  # (out, in)
        self.base_model_name_or_path = None
        self.adapters = {}  # {module name: minilora.formats.peft.Adapter}
        self.dropout = 0.0
        self._rng = np.random.default_rng(0)
        self._fixed_norms = None  # {module: (d_out,)}: DoRA's n held fixed (gradchecks only)
        # train_base: every base weight trains (pretraining, full fine-tuning), no adapters
        self.train_base = bool(train_base)
        self.grads = {}
        self.zero_grad()

    # -- adapters ----------------------------------------------------------------------------------

    def add_lora(self, *, r=8, alpha=16, target_modules=("q_proj", "v_proj"), use_rslora=False,
                 use_dora=False, dropout=0.0, seed=0):
        """Fresh adapters on every layer's ``target_modules`` (PEFT's names), PEFT's default init:
        A Kaiming-uniform (a = √5), B = 0; DoRA's m = ‖W‖ per row (so the output is the base's)."""
        if self.train_base:
            raise ValueError("this model trains its base weights (train_base=True): build it "
                             "with train_base=False to add adapters")
        if isinstance(target_modules, str):
            target_modules = (target_modules,)
        target_modules = tuple(target_modules)
        bad = [t for t in target_modules if t not in TARGETS]
        if bad or not target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {TARGETS}, got "
                             f"unknown {bad}")
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"r must be an integer ≥ 1, got {r!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        rng = np.random.default_rng(seed)
        adapters = {}
        for i in range(self.config.num_hidden_layers):
            for p in TARGETS:
                if p not in target_modules:
                    continue
                d_out, d_in = self.shapes[p]
                A = kaiming_uniform(rng, (int(r), d_in), self.dtype)  # (r, d_in)
                B = np.zeros((d_out, int(r)), self.dtype)  # (d_out, r)
                m = None
                if use_dora:
                    W = self.weights[f"{module_name(i, p)}.weight"]
                    m = np.linalg.norm(W, axis=1).astype(self.dtype)  # (d_out,)
                adapters[module_name(i, p)] = peft.Adapter(A, B, float(alpha), bool(use_rslora),
                                                           False, bool(use_dora), m)
        peft.lora_scaling(float(alpha), int(r), use_rslora=bool(use_rslora))
        self.adapters = adapters
        self.dropout = float(dropout)
        self._rng = np.random.default_rng(seed)
        self.zero_grad()

    def load_adapter(self, folder):
        """Load a PEFT LoRA / DoRA adapter folder; ValueError naming unknown modules or wrong
        shapes."""
        loaded = peft.load_adapter(folder)
        known = {module_name(i, p): p for i in range(self.config.num_hidden_layers)
                 for p in TARGETS}
        unknown = sorted(set(loaded) - set(known))
        if unknown:
            raise ValueError(f"{folder}: adapter modules {unknown} are not modules of this "
                             f"model (model.layers.{{i}}.self_attn.q_proj, ...)")
        adapters = {}
        for name, a in loaded.items():
            d_out, d_in = self.shapes[known[name]]
            if a.fan_in_fan_out:
                raise ValueError(f"{folder}: module {name!r} has fan_in_fan_out: true, but the "
                                 f"model's projections are (d_out, d_in)")
            if a.A.shape[1] != d_in or a.B.shape[0] != d_out:
                raise ValueError(f"{folder}: module {name!r}: lora_A {a.A.shape} and lora_B "
                                 f"{a.B.shape} do not fit the projection (d_out, d_in) = "
                                 f"({d_out}, {d_in})")
            m = None if a.m is None else np.array(a.m, self.dtype)  # (d_out,)
            adapters[name] = peft.Adapter(np.array(a.A, self.dtype), np.array(a.B, self.dtype),
                                          a.alpha, a.use_rslora, False, a.use_dora, m)
        self.adapters = adapters
        self.zero_grad()

    def save_adapter(self, folder):
        """Write the adapters as a PEFT adapter folder (``PeftModel.from_pretrained`` loads it)."""
        if not self.adapters:
            raise ValueError("the model has no adapters to save: call add_lora or load_adapter")
        peft.save_adapter(folder, self.adapters,
                          base_model_name_or_path=self.base_model_name_or_path,
                          task_type="CAUSAL_LM")

    def _param_items(self):
        for name, a in self.adapters.items():
            yield name, "A", "lora_A.weight", a.A
            yield name, "B", "lora_B.weight", a.B
            if a.use_dora:
                yield name, "m", "lora_magnitude_vector", a.m

    def parameters(self):
        """{``<module>.A`` / ``.B`` / ``.m``: the live trainable array} (what AdamW updates);
        with ``train_base``, every base weight under transformers' name."""
        if self.train_base:
            return dict(self.weights)
        return {f"{n}.{s}": p for n, s, _, p in self._param_items()}

    def zero_grad(self):
        """Zero every trainable gradient (``grads`` keyed as ``parameters()``)."""
        self.grads = {k: np.zeros_like(p) for k, p in self.parameters().items()}

    def lora_parameters(self):
        """{PEFT saved key: copy of the array}."""
        return {f"{peft.PREFIX}{n}.{k}": p.copy() for n, _, k, p in self._param_items()}

    def lora_grads(self):
        """{PEFT saved key: copy of the accumulated gradient}."""
        return {f"{peft.PREFIX}{n}.{k}": self.grads[f"{n}.{s}"].copy()
                for n, s, k, _ in self._param_items()}

    # -- one projection ---------------------------------------------------------------------------

    def _project(self, x, name, mask):
        """y = x Wᵀ + bias (+ the adapter's LoRA / DoRA term); x (B, T, d_in) -> (B, T, d_out)."""
        W = self.weights[f"{name}.weight"]  # (d_out, d_in)
        bias = self.weights.get(f"{name}.bias")  # (d_out,) or None
        a = self.adapters.get(name)
        if a is None:
            y = x @ W.T  # (B, T, d_out)
            if bias is not None:
                y = y + bias
            return y, ("plain", (W, x if self.train_base else None))
        if a.use_dora:
            norms = None if self._fixed_norms is None else self._fixed_norms[name]
            y, c = dora_forward(x, W, a.A, a.B, a.m, scaling=a.scaling, bias=bias,
                                dropout_mask=mask, backend=self.backend, norms=norms)
            return y, ("dora", c)
        y, c = lora_forward(x, W, a.A, a.B, scaling=a.scaling, bias=bias, dropout_mask=mask,
                            backend=self.backend)
        return y, ("lora", c)

    def _project_backward(self, dy, name, cache, need_dx=True):
        """dx (B, T, d_in), or None without ``need_dx``; the adapter's gradients accumulate into
        ``grads``."""
        kind, c = cache
        if kind == "plain":
            W, x = c
            if x is not None:  # train_base: dW = dyᵀ x, dbias = Σ dy
                d_out, d_in = W.shape
                self.grads[f"{name}.weight"] += dy.reshape(-1, d_out).T @ x.reshape(-1, d_in)
                if f"{name}.bias" in self.grads:
                    self.grads[f"{name}.bias"] += dy.reshape(-1, d_out).sum(axis=0)
            return dy @ W if need_dx else None  # (B, T, d_in)
        if kind == "dora":
            g = dora_backward(dy, c, need_dx=need_dx)
            self.grads[f"{name}.m"] += g.dm
        else:
            g = lora_backward(dy, c, need_dx=need_dx)
        self.grads[f"{name}.A"] += g.dA
        self.grads[f"{name}.B"] += g.dB
        return g.dx

    def _plain_lora(self, name):
        a = self.adapters.get(name)
        return a is not None and not a.use_dora

    def _mask(self, name, shape, masks, given, train):
        if name not in self.adapters:
            return None
        if given is not None and name in given:
            mask = np.asarray(given[name], self.dtype)
            if mask.shape != shape:
                raise ValueError(f"dropout_masks[{name!r}] must have shape {shape}, got "
                                 f"{mask.shape}")
        elif train and self.dropout > 0:
            keep = self._rng.random(shape) >= self.dropout  # (B, T, d_in)
            mask = (keep / (1.0 - self.dropout)).astype(self.dtype)  # 0 or 1/(1-p)
        else:
            return None
        masks[name] = mask
        return mask

    # -- the decoder ------------------------------------------------------------------------------

    def _check_ids(self, input_ids, past):
        ids = check_ids(input_ids, "input_ids", self.config.vocab_size)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, seq) with seq ≥ 1, got {ids.shape}")
        offset = 0
        if past is not None:
            if len(past) != self.config.num_hidden_layers:
                raise ValueError(f"past must hold one (k, v) per layer "
                                 f"({self.config.num_hidden_layers}), got {len(past)}")
            offset = past[0][0].shape[2]
            if past[0][0].shape[0] != ids.shape[0]:
                raise ValueError(f"past's batch {past[0][0].shape[0]} is not input_ids' "
                                 f"{ids.shape[0]}")
        self.config.check_sequence_length(offset + ids.shape[1])
        return ids, offset

    def forward(self, input_ids, *, past=None, train=False, dropout_masks=None):
        """Logits of every position.

        Parameters
        ----------
        input_ids : int (B, T) in [0, V)
        past : None or the previous call's ``cache.past`` (per layer (k, v), (B, Hkv, S₀, D))
        train : bool, draw inverted-dropout masks for the LoRA inputs (the model's dropout)
        dropout_masks : None or {module name: mask (B, T, d_in)}: explicit masks (parity tests)

        Returns
        -------
        logits : (B, T, V)
        cache : ModelCache for ``backward``; ``cache.past`` is the KV cache (S₀ + T keys)
        """
        h, cache = self._decode(input_ids, past, train, dropout_masks)  # (B, T, d)
        return h @ self._lm_head().T, cache  # (B, T, V)

    def _decode(self, input_ids, past, train, dropout_masks):
        """The decoder up to the final norm: h (B, T, d) and the ModelCache."""
        c = self.config
        ids, offset = self._check_ids(input_ids, past)
        if dropout_masks is not None:
            unknown = sorted(set(dropout_masks) - set(self.adapters))
            if unknown:
                raise ValueError(f"dropout_masks names modules without an adapter: {unknown}")
        Bsz, T = ids.shape
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        cos, sin = rope_tables(np.arange(offset, offset + T), D, theta=c.rope_theta,
                               scaling_factor=c.rope_scaling_factor, dtype=self.dtype)  # (T, D)
        x, embed = embedding_forward(ids, self.weights["model.embed_tokens.weight"])  # (B, T, d)
        masks, layers, present = {}, [], []
        for i in range(c.num_hidden_layers):
            L = {}
            names = {p: module_name(i, p) for p in TARGETS}
            a, L["norm1"] = rmsnorm_forward(
                x, self.weights[f"model.layers.{i}.input_layernorm.weight"],
                eps=c.rms_norm_eps, backend=self.backend,
                cache_output=True)  # (B, T, d)
            qkv_masks = {p: self._mask(names[p], a.shape, masks, dropout_masks, train)
                         for p in ("q_proj", "k_proj", "v_proj")}
            group = [p for p in ("q_proj", "k_proj", "v_proj") if self._plain_lora(names[p])]
            if len(group) < 2:
                group = []
            outs, L["proj"] = {}, {}
            if group:
                ads = [self.adapters[names[p]] for p in group]
                ys, L["qkv"] = lora_qkv_forward(
                    a, [self.weights[f"{names[p]}.weight"] for p in group],
                    [ad.A for ad in ads], [ad.B for ad in ads],
                    scaling=[ad.scaling for ad in ads],
                    bias=[self.weights.get(f"{names[p]}.bias") for p in group],
                    dropout_mask=[qkv_masks[p] for p in group], backend=self.backend)
                outs.update(zip(group, ys, strict=True))
            L["group"] = group
            for p in ("q_proj", "k_proj", "v_proj"):
                if p not in group:
                    outs[p], L["proj"][p] = self._project(a, names[p], qkv_masks[p])
            q = outs["q_proj"].reshape(Bsz, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
            k = outs["k_proj"].reshape(Bsz, T, Hkv, D).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
            v = outs["v_proj"].reshape(Bsz, T, Hkv, D).transpose(0, 2, 1, 3)  # (B, Hkv, T, D)
            q = rope_forward(q, cos, sin, backend=self.backend)  # (B, H, T, D)
            k = rope_forward(k, cos, sin, backend=self.backend)  # (B, Hkv, T, D)
            if past is not None:
                k = np.concatenate([past[i][0], k], axis=2)  # (B, Hkv, S, D)
                v = np.concatenate([past[i][1], v], axis=2)  # (B, Hkv, S, D)
            present.append((k, v))
            o, L["attn"] = attention_forward(q, k, v, q_offset=offset,
                                             backend=self.backend)  # (B, H, T, D)
            o = o.transpose(0, 2, 1, 3).reshape(Bsz, T, H * D)  # (B, T, H·D), a view
            o_mask = self._mask(names["o_proj"], o.shape, masks, dropout_masks, train)
            y, L["proj"]["o_proj"] = self._project(o, names["o_proj"], o_mask)  # (B, T, d)
            x += y  # (B, T, d), in place: the residual stream is this pass's own array
            a, L["norm2"] = rmsnorm_forward(
                x, self.weights[f"model.layers.{i}.post_attention_layernorm.weight"],
                eps=c.rms_norm_eps, backend=self.backend,
                cache_output=True)  # (B, T, d)
            y, L["mlp"] = self._mlp_forward(a, names, masks, dropout_masks, train)  # (B, T, d)
            x += y  # (B, T, d)
            layers.append(L)
        # cache_output: each norm's cache keeps its output a (which the projections keep as
        # their input, and nothing here changes), not a second (B, T, d) array x̂
        h, final = rmsnorm_forward(x, self.weights["model.norm.weight"], eps=c.rms_norm_eps,
                                   backend=self.backend, cache_output=True)  # (B, T, d)
        return h, ModelCache(tuple(layers), final, h, tuple(present), masks, offset,
                             self.dtype, embed)

    def _head_key(self):
        return "model.embed_tokens.weight" if self.config.tie_word_embeddings \
            else "lm_head.weight"

    def _lm_head(self):
        return self.weights[self._head_key()]  # (V, d)

    def _mlp_forward(self, a, names, masks, given, train):
        act = self.config.hidden_act
        F = self.config.intermediate_size
        gm = self._mask(names["gate_proj"], a.shape, masks, given, train)
        um = self._mask(names["up_proj"], a.shape, masks, given, train)
        dm = self._mask(names["down_proj"], a.shape[:-1] + (F,), masks, given, train)
        if all(self._plain_lora(names[p]) for p in MLP):
            ads = [self.adapters[names[p]] for p in MLP]
            y, cache = lora_mlp_forward(
                a, [self.weights[f"{names[p]}.weight"] for p in MLP], [ad.A for ad in ads],
                [ad.B for ad in ads], scaling=[ad.scaling for ad in ads], activation=act,
                bias=[self.weights.get(f"{names[p]}.bias") for p in MLP],
                dropout_mask=[gm, um, dm], backend=self.backend)  # (B, T, d)
            return y, ("block", cache)
        e, ce = self._project(a, names["gate_proj"], gm)  # (B, T, F)
        u, cu = self._project(a, names["up_proj"], um)  # (B, T, F)
        z = gated_product(e.reshape(-1, F), u.reshape(-1, F), act,
                          self.backend).reshape(e.shape)  # (B, T, F)
        y, cd = self._project(z, names["down_proj"], dm)  # (B, T, d)
        return y, ("split", (ce, cu, cd, e, u))

    def _mlp_backward(self, dy, names, cache):
        kind, c = cache
        if kind == "block":
            g = lora_mlp_backward(dy, c)
            for j, p in enumerate(MLP):
                self.grads[f"{names[p]}.A"] += g.dA[j]
                self.grads[f"{names[p]}.B"] += g.dB[j]
            return g.dx
        ce, cu, cd, e, u = c
        F = e.shape[-1]
        dz = self._project_backward(dy, names["down_proj"], cd)  # (B, T, F)
        de, du = gated_backward(dz.reshape(-1, F), e.reshape(-1, F),
                                u.reshape(-1, F), self.config.hidden_act, self.backend)
        dx = self._project_backward(de.reshape(e.shape), names["gate_proj"], ce)  # (B, T, d)
        return dx + self._project_backward(du.reshape(e.shape), names["up_proj"], cu)

    def backward(self, dlogits, cache):
        """Accumulate the adapters' gradients into ``grads``; returns dx of the embedding output
        (B, T, d).

        Notes
        -----
        Reverse of ``forward``: dh = dlogits W_lm; through the final norm; per layer (last
        first) the residuals pass dx through and add each sub-block's input gradient; the past
        keys (a decode step's KV cache) are constants.
        """
        if type(cache) is not ModelCache:
            raise TypeError(f"cache must be the ModelCache from forward, got "
                            f"{type(cache).__name__}")
        shape = cache.h_final.shape[:2] + (self.config.vocab_size,)
        dlogits = np.asarray(dlogits)
        if dlogits.shape != shape or dlogits.dtype != cache.dtype:
            raise ValueError(f"dlogits must be {cache.dtype} {shape}, got {dlogits.dtype} "
                             f"{dlogits.shape}")
        c = self.config
        dh = dlogits @ self._lm_head()  # (B, T, d)
        self._base_grad(self._head_key(), lambda: dlogits.reshape(-1, c.vocab_size).T
                        @ cache.h_final.reshape(-1, c.hidden_size))  # (V, d) = dlogitsᵀ h
        return self._decode_backward(dh, cache)

    def _decode_backward(self, dh, cache, need_dx=True):
        """From dh (B, T, d), the final norm's output gradient, down to the embedding: returns
        dx (B, T, d) of the embedding's output. Without ``need_dx`` (and without
        ``train_base``, which needs it for the embedding's gradient), the first layer's
        q, k, v input gradient and its norm's backward are skipped, and None comes back: the
        frozen embedding is the only thing they would reach."""
        need_dx = need_dx or self.train_base
        c = self.config
        Bsz, T = dh.shape[:2]
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        cos, sin = rope_tables(np.arange(cache.q_offset, cache.q_offset + T), D,
                               theta=c.rope_theta, scaling_factor=c.rope_scaling_factor,
                               dtype=self.dtype)  # (T, D)
        self._norm_grad("model.norm.weight", dh, cache.final_norm)
        dx = rmsnorm_backward(dh, cache.final_norm)  # (B, T, d)
        for i in reversed(range(c.num_hidden_layers)):
            L = cache.layers[i]
            names = {p: module_name(i, p) for p in TARGETS}
            da = self._mlp_backward(dx, names, L["mlp"])  # (B, T, d)
            self._norm_grad(f"model.layers.{i}.post_attention_layernorm.weight", da, L["norm2"])
            rmsnorm_backward(da, L["norm2"], add_to=dx)  # dx += (B, T, d), dx is ours
            do = self._project_backward(dx, names["o_proj"], L["proj"]["o_proj"])  # (B, T, H·D)
            do = do.reshape(Bsz, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D), a view
            dq, dk, dv = attention_backward(do, L["attn"])  # (B, H, T, D), (B, Hkv, S, D) x2
            dk, dv = dk[:, :, -T:], dv[:, :, -T:]  # (B, Hkv, T, D): the past is constant
            dq = rope_backward(dq, cos, sin, backend=self.backend)  # (B, H, T, D)
            dk = rope_backward(dk, cos, sin, backend=self.backend)  # (B, Hkv, T, D)
            # the ops' outputs are laid out (B, T, heads, D): these reshapes are views
            douts = {"q_proj": dq.transpose(0, 2, 1, 3).reshape(Bsz, T, H * D),
                     "k_proj": dk.transpose(0, 2, 1, 3).reshape(Bsz, T, Hkv * D),
                     "v_proj": dv.transpose(0, 2, 1, 3).reshape(Bsz, T, Hkv * D)}
            da = None
            group = L["group"]
            need_da = need_dx or i > 0
            if group:
                g = lora_qkv_backward([douts[p] for p in group], L["qkv"], need_dx=need_da)
                for j, p in enumerate(group):
                    self.grads[f"{names[p]}.A"] += g.dA[j]
                    self.grads[f"{names[p]}.B"] += g.dB[j]
                da = g.dx
            for p in ("q_proj", "k_proj", "v_proj"):
                if p not in group:
                    dp = self._project_backward(douts[p], names[p], L["proj"][p],
                                                need_da)  # (B, T, d) or None
                    da = dp if da is None else da + dp
            if not need_da:
                return None
            self._norm_grad(f"model.layers.{i}.input_layernorm.weight", da, L["norm1"])
            rmsnorm_backward(da, L["norm1"], add_to=dx)  # dx += (B, T, d)
        self._base_grad("model.embed_tokens.weight",
                        lambda: embedding_backward(dx, cache.embedding))  # (V, d)
        return dx

    def _base_grad(self, key, gradient):
        """With ``train_base``, add ``gradient()`` (computed only then) to the weight's grad."""
        if self.train_base:
            self.grads[key] += gradient()

    def _norm_grad(self, key, dy, cache):
        """RMSNorm's weight gradient: y = x̂ ⊙ w, so dw = Σ over tokens of dy ⊙ x̂."""
        self._base_grad(key, lambda: (dy * cache.normalized()).reshape(-1, dy.shape[-1])
                        .sum(axis=0))

    def loss(self, input_ids, *, train=False, dropout_masks=None):
        """Causal LM loss (transformers' with labels = input_ids).

        Returns
        -------
        loss : float
        logits : (B, T, V)
        cache : ModelCache for ``backward``
        loss_cache : for ``causal_lm_loss_backward(loss_cache)`` -> dlogits (B, T, V)
        (``train_step`` does the whole forward, loss and backward.)
        """
        logits, cache = self.forward(input_ids, train=train, dropout_masks=dropout_masks)
        value, loss_cache = causal_lm_loss(logits, input_ids)
        return value, logits, cache, loss_cache

    def train_step(self, input_ids, *, train=True, dropout_masks=None):
        """Forward, loss, backward (gradients accumulate); returns the loss.

        The same equations as ``loss`` and then ``backward`` of its dlogits, but the LM head
        and the loss run over blocks of tokens (``lm_head_loss``), so the (B, T, V) logits,
        their log-softmax and their gradient never exist.
        """
        h, cache = self._decode(input_ids, None, train, dropout_masks)  # (B, T, d)
        dhead = self.grads[self._head_key()] if self.train_base else None
        value, dh = lm_head_loss(h, self._lm_head(), input_ids, dhead=dhead)  # dh (B, T, d)
        self._decode_backward(dh, cache, need_dx=False)
        return value

    # -- generation -------------------------------------------------------------------------------

    def generate(self, input_ids, max_new_tokens=32, *, temperature=0.0, seed=0):
        """Greedy (temperature 0) or sampled continuation with a KV cache.

        Returns int64 (B, T + max_new_tokens): the prompt followed by the new tokens.
        """
        ids, _ = self._check_ids(input_ids, None)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer ≥ 0, got {max_new_tokens!r}")
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number ≥ 0, got {temperature!r}")
        self.config.check_sequence_length(ids.shape[1] + int(max_new_tokens))
        rng = np.random.default_rng(seed)
        out = ids.astype(np.int64)
        if max_new_tokens == 0:
            return out.copy()
        logits, cache = self.forward(out)
        for step in range(int(max_new_tokens)):
            last = logits[:, -1].astype(np.float64)  # (B, V)
            if temperature == 0:
                nxt = np.argmax(last, axis=-1)  # (B,)
            else:
                z = last / temperature
                p = np.exp(z - z.max(axis=-1, keepdims=True))  # (B, V)
                p /= p.sum(axis=-1, keepdims=True)
                nxt = np.array([rng.choice(p.shape[1], p=row) for row in p])  # (B,)
            out = np.concatenate([out, nxt[:, None].astype(np.int64)], axis=1)
            if step + 1 < max_new_tokens:
                logits, cache = self.forward(out[:, -1:], past=cache.past)
        return out
