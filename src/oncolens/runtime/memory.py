"""Keep the server's resident memory from ratcheting up after large requests (glibc only).

Decoded images are large single allocations (Pillow allocates in 16 MB blocks). glibc raises its
mmap threshold after the first such block is freed, so later ones come from the heap arenas of the
worker threads and stay resident after the request. A fixed threshold makes every allocation of
1 MiB or more its own mapping, returned to the system when freed. Smaller blocks, freed, stay
inside the heaps until ``trim_heaps`` hands their pages back (the idle server calls it). No-ops elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def return_large_allocations() -> bool:
    """Set glibc's mmap threshold to 1 MiB (fixed); True when it took effect."""
    libc = _libc()
    try:
        return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except AttributeError:  # not glibc (e.g. musl has no mallopt)
        return False


def trim_heaps() -> bool:
    """Hand the free pages inside every glibc heap back to the system (``malloc_trim(0)``).

    True when some memory was released.
    """
    libc = _libc()
    try:
        return libc is not None and bool(libc.malloc_trim(0))
    except AttributeError:  # not glibc
        return False


def resident_bytes() -> int | None:
    """This process's resident memory (RSS) in bytes; None where /proc is not there."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
