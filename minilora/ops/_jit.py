"""Numba options, in one place.

Every kernel in minilora is compiled with ``jit`` below. Set ``NUMBA_DISABLE_JIT=1`` to run the
kernels as plain Python (slow, but a debugger can step through them). Compiled code is cached on
disk (``cache=True``), so only the first run on a machine pays for compilation.

fastmath: ``reassoc`` lets LLVM vectorise the dot products inside the kernels (a different
summation order from NumPy's, equally accurate), ``contract`` allows fused multiply-adds, and
``nsz`` lets it ignore the sign of zero (x + 0.0 may be folded to x, so a −0.0 can come out as
+0.0; the two compare equal and no gradient depends on it). NaN and infinity semantics are kept
(no ``nnan``/``ninf``), so a NaN or infinity reaches the same outputs as in the NumPy reference.
The kernels are single-threaded on purpose: the threads belong to BLAS, which does the large
products between kernel calls (``lora_numba``'s docstring says why). So Numba's and BLAS's
thread pools never compete for the cores, and a kernel's summation order depends on the shapes
alone: results are bit-for-bit reproducible. The gated MLP's kernels ran on two Numba threads
for a while (issue 20); measured on this 2-core machine, alternating BLAS products with them
(the MLP's forward and backward, N = 2048, hidden 1408) took 129 ms with two threads against
100 ms with one, and the LLaMA training step 3.7 s against 2.3 s: after each call both pools
keep spinning for the cores the other one needs (OpenMP's and OpenBLAS's wait policies).
"""

import numba

FASTMATH = {"reassoc", "contract", "nsz"}

OPTIONS = dict(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy",
               boundscheck=False)


def jit(fn):
    """``numba.njit`` with minilora's options (single-threaded: see above)."""
    return numba.njit(**OPTIONS)(fn)
