"""Plain layers for small models around ``LoRALinear``: Linear, ReLU, GELU and Sequential.

Each module follows ``LoRALinear``'s protocol: ``y = module(x)`` keeps what the backward pass
needs, ``dx = module.backward(dy)`` adds into ``module.grads``; ``parameters()`` are the
trainable arrays by name (updated in place by the optimizers), ``num_parameters()`` returns
``(trainable, frozen)``. The math of each is a forward/backward pair of free functions with the
pattern of the whole library: ``op_forward(...) -> (y, cache)``, ``op_backward(dy, cache)``.
"""

import numpy as np

from minilora.toolkit.init import kaiming_uniform, linear_bias

# -- the pairs -----------------------------------------------------------------------------------


def linear_forward(x, W, b):
    """y = x Wᵀ + b.  x (N, d_in), W (d_out, d_in), b (d_out,) or None -> y (N, d_out), and the
    cache (x, W)."""
    y = x @ W.T  # (N, d_out)
    return (y if b is None else y + b), (x, W)


def linear_backward(dy, cache):
    """dx = dy W (N, d_in), dW = dyᵀ x (d_out, d_in), db = Σ_n dy (d_out,)."""
    x, W = cache
    return dy @ W, dy.T @ x, dy.sum(axis=0)


def relu_forward(x):
    """y = max(x, 0); the cache is x."""
    return np.maximum(x, 0), x


def relu_backward(dy, cache):
    """dx = dy ⊙ [x > 0] (the subgradient 0 at x = 0)."""
    return dy * (cache > 0)


GELU_C = np.sqrt(2 / np.pi)


def gelu_forward(x):
    """GELU, tanh approximation (GPT-2's): y = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³); the
    cache is x."""
    u = GELU_C * (x + 0.044715 * x**3)
    return 0.5 * x * (1 + np.tanh(u)), x


def gelu_backward(dy, cache):
    """dy/dx = ½(1 + tanh u) + ½x(1 − tanh² u)·√(2/π)(1 + 3·0.044715x²)."""
    x = cache
    t = np.tanh(GELU_C * (x + 0.044715 * x**3))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_C * (1 + 3 * 0.044715 * x * x))


# -- the modules ---------------------------------------------------------------------------------


class Module:
    """The shared protocol. Subclasses set ``params`` (trainable), ``frozen`` and ``grads``
    (dicts of arrays) and define ``forward`` and ``backward``."""

    training = True

    def parameters(self):
        return dict(self.params)

    def zero_grad(self):
        for g in self.grads.values():
            g.fill(0)

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def num_parameters(self):
        return (sum(p.size for p in self.params.values()),
                sum(p.size for p in self.frozen.values()))

    def __call__(self, x):
        return self.forward(x)


class Linear(Module):
    """y = x Wᵀ + b; trainable, or frozen (then backward still returns dx but keeps no grads).

    W (d_out, d_in) and b are drawn like ``nn.Linear``'s unless given (copied).
    """

    def __init__(self, in_features, out_features, *, bias=True, trainable=True, weight=None,
                 bias_value=None, dtype=np.float32, seed=None):
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)
        W = kaiming_uniform(rng, (out_features, in_features), dtype) if weight is None \
            else np.array(weight, dtype=dtype)
        if W.shape != (out_features, in_features):
            raise ValueError(f"weight must be ({out_features}, {in_features}), got {W.shape}")
        arrays = {"W": W}
        if bias:
            arrays["b"] = linear_bias(rng, in_features, out_features, dtype) \
                if bias_value is None else np.array(bias_value, dtype=dtype)
        self.trainable = bool(trainable)
        self.params = arrays if trainable else {}
        self.frozen = {} if trainable else arrays
        self.W, self.b = W, arrays.get("b")
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._cache = None

    def forward(self, x):
        y, self._cache = linear_forward(x, self.W, self.b)
        return y

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first")
        dx, dW, db = linear_backward(dy, self._cache)
        if self.trainable:
            self.grads["W"] += dW
            if self.b is not None:
                self.grads["b"] += db
        self._cache = None
        return dx


class _Activation(Module):
    params = frozen = grads = {}  # noqa: RUF012 (never mutated: an activation has no arrays)

    def __init__(self):
        self._cache = None

    def forward(self, x):
        y, self._cache = self._forward(x)
        return y

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first")
        dx, self._cache = self._backward(dy, self._cache), None
        return dx


class ReLU(_Activation):
    _forward, _backward = staticmethod(relu_forward), staticmethod(relu_backward)


class GELU(_Activation):
    _forward, _backward = staticmethod(gelu_forward), staticmethod(gelu_backward)


class Sequential(Module):
    """Modules applied in order; backward in reverse. Parameters are named "<index>.<name>"."""

    def __init__(self, *modules):
        self.modules = list(modules)

    @property
    def params(self):
        return {f"{i}.{k}": v for i, m in enumerate(self.modules)
                for k, v in m.parameters().items()}

    @property
    def grads(self):
        return {f"{i}.{k}": v for i, m in enumerate(self.modules) for k, v in m.grads.items()}

    def num_parameters(self):
        counts = [m.num_parameters() for m in self.modules]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def train(self, mode=True):
        for m in self.modules:
            m.train(mode)
        self.training = bool(mode)
        return self

    def forward(self, x):
        for m in self.modules:
            x = m(x)
        return x

    def backward(self, dy):
        for m in reversed(self.modules):
            dy = m.backward(dy)
        return dy


def summary(model):
    """PEFT's ``print_trainable_parameters`` line: trainable, all, and the trainable share."""
    trainable, frozen = model.num_parameters()
    total = trainable + frozen
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
