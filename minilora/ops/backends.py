"""Which implementation runs an op: the NumPy reference or the Numba kernels.

``backend=None`` means the environment variable ``MINILORA_BACKEND``, else ``"numba"``. The
choice is made per call: setting the variable takes effect at once. Numba is a required
dependency, so both backends are always there (``minilora.ops.functional.BACKEND_MODULES``).
"""

import os

BACKENDS = ("numpy", "numba")


def resolve_backend(backend=None):
    """Return ``"numpy"`` or ``"numba"`` for a ``backend`` argument (see the module docstring)."""
    if backend is None:
        backend = os.environ.get("MINILORA_BACKEND") or "numba"
        source = "MINILORA_BACKEND"
    else:
        source = "backend"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend
