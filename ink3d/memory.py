"""The process's memory: freed memory kept for the next arrays instead of handed back to the system."""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def reuse_freed_memory() -> None:
    """Keep memory that arrays free within the process for the next ones (glibc's allocator).

    By default glibc maps every allocation above 32 MB afresh and hands it back to the system when it is
    freed, and the system zeroes each page at its first touch: a model's activations of a few hundred MB,
    allocated and freed for every batch, or a tile's arrays when voxelizing labels, then cost more time in
    the kernel than in the arithmetic. Here every allocation comes from the heap and freed memory is never
    trimmed: the peak stays resident, and a long run touches fresh memory only while it grows. Elsewhere
    (not glibc) the defaults stay.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(M_MMAP_MAX, 0)  # nothing mapped on its own...
    mallopt(M_TRIM_THRESHOLD, -1)  # ... and the heap never trimmed (the threshold read as the largest size)
