"""Numba options, in one place.

Every kernel in minilora is compiled with ``jit`` below. Set ``NUMBA_DISABLE_JIT=1`` to run the
kernels as plain Python (slow, but a debugger can step through them). Compiled code is cached on
disk (``cache=True``), so only the first run on a machine pays for compilation.

fastmath: ``reassoc`` lets LLVM vectorise the dot products inside the kernels (a different
summation order from NumPy's, equally accurate), ``contract`` allows fused multiply-adds. NaN and
infinity semantics are kept (no ``nnan``/``ninf``), so a NaN in the input still reaches the output.
The summation order depends only on the shapes, never on the thread count, so results are
bit-for-bit reproducible (see ``lora_numba`` for how the batch reductions are split).
"""

import numba

FASTMATH = {"reassoc", "contract", "nsz"}

OPTIONS = dict(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy",
               boundscheck=False)


def jit(fn=None, *, parallel=False):
    """``numba.njit`` with minilora's options; ``parallel=True`` enables ``prange``."""
    if fn is None:
        return lambda f: jit(f, parallel=parallel)
    return numba.njit(parallel=parallel, **OPTIONS)(fn)


prange = numba.prange


def row_chunks(n_rows):
    """How many chunks the batch reductions split N rows into.

    It depends on N only (at most 16 chunks of at least 64 rows), never on the number of threads,
    so every reduction adds the same numbers in the same order on any machine configuration.
    """
    return max(1, min(16, n_rows // 64))
