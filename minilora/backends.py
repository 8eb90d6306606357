"""Which implementation runs an op: the NumPy reference or the Numba kernels.

``backend=None`` means the environment variable ``MINILORA_BACKEND``, else ``"numba"`` when Numba
imports, else ``"numpy"``. The choice is made per call: setting the variable takes effect at once.
"""

import functools
import os

BACKENDS = ("numpy", "numba")


@functools.cache
def numba_available():
    """True when Numba imports (checked once per process)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend=None):
    """Return ``"numpy"`` or ``"numba"`` for a ``backend`` argument (see the module docstring)."""
    if backend is None:
        backend = os.environ.get("MINILORA_BACKEND") or ("numba" if numba_available() else "numpy")
        source = "MINILORA_BACKEND"
    else:
        source = "backend"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "numba" and not numba_available():
        raise ValueError("backend 'numba' was asked for but numba does not import")
    return backend
