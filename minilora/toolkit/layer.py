"""``LoRALinear``: a small stateful layer over the functional forward/backward pair.

The layer owns its arrays (frozen W and bias, trainable A and B, and m for DoRA), samples the
dropout mask from its own seeded generator in training mode, keeps the cache of the last forward
pass for ``backward``, and accumulates gradients in ``layer.grads``. There is no merge state:
``merged_weight()`` returns a new array and the layer keeps computing the unmerged way.
"""

import numpy as np

from minilora.ops._checks import FLOAT_DTYPES, check_positive_int, check_scaling
from minilora.ops.dora import inverse_norms, row_norms
from minilora.ops.functional import (
    dora_backward,
    dora_forward,
    lora_backward,
    lora_forward,
    lora_scaling,
)
from minilora.toolkit.init import init_lora, kaiming_uniform, linear_bias
from minilora.toolkit.modules import Module


class LoRALinear(Module):
    """A linear layer with a frozen weight W and a trainable low-rank update s·B A.

    y = x Wᵀ + bias + s · (dropout(x) Aᵀ) Bᵀ, with s = alpha/r (alpha/√r for rsLoRA).

    Parameters
    ----------
    in_features, out_features : int, d_in and d_out
    r : int, rank of the update
    alpha : float, the LoRA alpha; the scaling is alpha/r, or alpha/√r with ``use_rslora``
    dropout : float in [0, 1], dropout probability on the LoRA branch's input (training mode only)
    use_rslora : bool
    use_dora : bool, weight-decomposed LoRA (DoRA); adds the trainable magnitude m (d_out,)
    fan_in_fan_out : bool, W is stored as (d_in, d_out) (GPT-2 Conv1D layout)
    bias : bool, whether the layer has a (frozen) bias
    init : "default" | "gaussian" | "pissa" | "olora" (see ``minilora.toolkit.init``)
    weight : array (d_out, d_in) (or (d_in, d_out) with fan_in_fan_out), the pretrained W; copied.
        When None, W is drawn like ``nn.Linear``'s.
    bias_value : array (d_out,), the pretrained bias; copied. When None, drawn like ``nn.Linear``'s.
    dtype : numpy.float32 or numpy.float64
    seed : int or None, seeds the generator used for init and dropout masks
    backend : "numpy", "numba" or None (see ``minilora.ops.backends``)
    check_unchanged : bool, checksum x and the layer's arrays in ``forward`` and raise
        RuntimeError in ``backward`` if any was changed in place in between (as PyTorch's
        version counters do). Costs two passes over the bytes of x and W per step; turn it off
        for speed once a training loop is known to be right.

    Attributes
    ----------
    W, bias : frozen arrays;  A (r, d_in), B (d_out, r), m (d_out,) : trainable arrays
    grads : dict of accumulated gradients, keys "A", "B" (and "m")
    scaling : float
    training : bool
    """

    def __init__(self, in_features, out_features, *, r=8, alpha=8, dropout=0.0, use_rslora=False,
                 use_dora=False, fan_in_fan_out=False, bias=True, init="default", weight=None,
                 bias_value=None, dtype=np.float32, seed=None, backend=None,
                 check_unchanged=True):
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        self.dropout = check_scaling(dropout, "dropout")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout}")
        self.r, self.alpha = r, alpha
        self.use_rslora, self.use_dora = bool(use_rslora), bool(use_dora)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.scaling = lora_scaling(alpha, r, use_rslora=use_rslora)
        self.dtype, self.backend = dtype, backend
        self.check_unchanged = bool(check_unchanged)
        self.rng = np.random.default_rng(seed)
        self.training = True
        self._cache = None

        W = self._base_weight(weight)  # (d_out, d_in)
        self.bias = self._base_bias(bias, bias_value)  # (d_out,) or None
        self.A, self.B, W = init_lora(init, W, r, self.scaling, self.rng)  # (r, d_in), (d_out, r)
        self.W = np.ascontiguousarray(W.T) if self.fan_in_fan_out else W  # stored layout
        self.m = None
        if self.use_dora:  # m = ‖W + s·B A‖ per row, so that c = m/n = 1 at the start
            self.m = row_norms(self.W, self.A, self.B, self.scaling, self.fan_in_fan_out)[0]
        self.grads = {name: np.zeros_like(p) for name, p in self.parameters().items()}

    def _base_weight(self, weight):
        """The pretrained W as a new (d_out, d_in) array of the layer's dtype."""
        d_in, d_out = self.in_features, self.out_features
        if weight is None:
            return kaiming_uniform(self.rng, (d_out, d_in), self.dtype)
        weight = np.asarray(weight)
        expected = (d_in, d_out) if self.fan_in_fan_out else (d_out, d_in)
        if weight.shape != expected:
            raise ValueError(f"weight must have shape {expected}, got {weight.shape}")
        if not np.issubdtype(weight.dtype, np.number) or np.iscomplexobj(weight):
            raise TypeError(f"weight must be a real numeric array, got dtype {weight.dtype}")
        W = weight.T if self.fan_in_fan_out else weight
        return np.array(W, dtype=self.dtype, order="C")  # always a copy

    def _base_bias(self, bias, bias_value):
        """The frozen bias as a new (d_out,) array, or None."""
        if not bias:
            if bias_value is not None:
                raise ValueError("bias_value was given but bias=False")
            return None
        if bias_value is None:
            return linear_bias(self.rng, self.in_features, self.out_features, self.dtype)
        bias_value = np.asarray(bias_value)
        if bias_value.shape != (self.out_features,):
            raise ValueError(f"bias_value must have shape ({self.out_features},), "
                             f"got {bias_value.shape}")
        return np.array(bias_value, dtype=self.dtype)

    # -- parameters (zero_grad, train, eval and num_parameters come from Module) ----------------

    @property
    def params(self):
        """The trainable arrays by name (the layer's own arrays: update them in place)."""
        params = {"A": self.A, "B": self.B}
        if self.m is not None:
            params["m"] = self.m
        return params

    @property
    def frozen(self):
        return {"W": self.W} if self.bias is None else {"W": self.W, "bias": self.bias}

    # -- forward and backward -------------------------------------------------------------------

    def dropout_mask(self, shape):
        """An inverted-dropout mask of the given shape: 0 with probability p, else 1/(1−p)."""
        p = self.dropout
        if p == 1.0:
            return np.zeros(shape, self.dtype)
        keep = self.rng.random(shape) >= p  # (..., d_in) bool
        return keep.astype(self.dtype) / self.dtype.type(1.0 - p)

    def forward(self, x):
        """y = layer(x): x (..., d_in) -> y (..., d_out); keeps the cache for ``backward``."""
        mask = None
        if self.training and self.dropout > 0.0 and isinstance(x, np.ndarray):
            mask = self.dropout_mask(x.shape)  # (..., d_in)
        common = dict(scaling=self.scaling, bias=self.bias, dropout_mask=mask,
                      fan_in_fan_out=self.fan_in_fan_out, backend=self.backend,
                      check_unchanged=self.check_unchanged)
        if self.use_dora:
            y, self._cache = dora_forward(x, self.W, self.A, self.B, self.m, **common)
        else:
            y, self._cache = lora_forward(x, self.W, self.A, self.B, **common)
        return y

    def backward(self, dy):
        """Backpropagate dy (..., d_out) through the last forward pass; returns dx (..., d_in).

        Adds dA, dB (and dm) into ``self.grads``. Each forward pass can be backpropagated once.
        RuntimeError if x, W, A or B was changed in place since the forward pass (with
        ``check_unchanged``): the gradients would be those of the new values.
        """
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first (each forward is used once)")
        backward = dora_backward if self.use_dora else lora_backward
        grads = backward(dy, self._cache, need_dx=True)
        self._cache = None
        self.grads["A"] += grads.dA
        self.grads["B"] += grads.dB
        if self.use_dora:
            self.grads["m"] += grads.dm
        return grads.dx

    def merged_weight(self):
        """The weight of the equivalent plain linear layer, in W's stored layout, as a new array.

        LoRA: W + s·B A.  DoRA: diag(m/n) (W + s·B A), n the row norms of W + s·B A.
        y = x W_mergedᵀ + bias (with ``fan_in_fan_out``, (d_in, d_out) and y = x W_merged + bias),
        equal to the layer's output in eval mode.
        """
        delta = self.scaling * (self.B @ self.A)  # (d_out, d_in)
        merged = self.W + (delta.T if self.fan_in_fan_out else delta)  # W's layout
        if self.use_dora:
            n = row_norms(self.W, self.A, self.B, self.scaling, self.fan_in_fan_out)[0]
            c = self.m * inverse_norms(n)  # (d_out,)
            merged *= c if self.fan_in_fan_out else c[:, None]
        return merged
