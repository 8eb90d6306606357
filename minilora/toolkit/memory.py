"""Keeping freed memory in the process between training steps (glibc's malloc).

A training step makes and frees the same arrays every time: the LLaMA benchmark step's caches
peak near 600 MiB and are freed layer by layer in the backward pass. glibc's malloc gives
memory back to the system as it is freed: blocks above its mmap threshold are unmapped at once,
and the top of the heap is trimmed whenever more than the trim threshold lies free there. The
next step then takes every page back with a page fault and a zeroed page (30,000–70,000 faults
a step on that model, up to a seventh of its time on this project's two-core host;
docs/performance.md, "A step alone in its process").

``retain_freed_memory()`` asks malloc to keep it: arrays up to ``mmap_threshold`` come from the
heap, and the heap is trimmed only when more than ``trim_threshold`` lies free at its top. The
process's resident set then stays at its peak between steps, as a GPU framework's caching
allocator keeps its device memory. It is a setting of the whole process (every library in it
allocates through the same malloc), so minilora never makes it behind a caller's back: its
training commands call it (``minilora demo``), and a user's script calls it once if it wants
the same.
"""

import ctypes
import numbers

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses a larger mmap threshold on 64-bit systems


def retain_freed_memory(*, mmap_threshold=MMAP_THRESHOLD_MAX, trim_threshold=1 << 30):
    """Ask glibc's malloc to keep freed memory for the next allocations (module docstring).

    Parameters
    ----------
    mmap_threshold : int, bytes, 0 < value ≤ 32 MiB: larger allocations are mapped and
        unmapped on their own; smaller ones come from the heap
    trim_threshold : int, bytes, > 0: the heap's free top is given back above this

    Returns
    -------
    bool : True if malloc took both settings; False where the C library has no ``mallopt``
        (macOS, Windows) or refused a setting (musl's is a stub that refuses all).
    """
    for name, value, top in (("mmap_threshold", mmap_threshold, MMAP_THRESHOLD_MAX),
                             ("trim_threshold", trim_threshold, 2**31 - 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                or not 0 < value <= top:
            raise ValueError(f"{name} must be an integer number of bytes in (0, {top}], got "
                             f"{value!r}")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # no such symbol, or no C library by name
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # the mmap threshold first: setting either one ends glibc's own adjustment of both
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and \
        bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
