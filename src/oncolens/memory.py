"""Keep the server's resident memory from ratcheting up after large requests (glibc only).

Decoded images are large single allocations (Pillow allocates in 16 MB blocks). glibc raises its
mmap threshold after the first such block is freed, so later ones come from the heap arenas of the
worker threads and stay resident after the request. A fixed threshold makes every allocation of
1 MiB or more its own mapping, returned to the system when freed. A no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1024 * 1024


def return_large_allocations() -> bool:
    """Set glibc's mmap threshold to 1 MiB (fixed); True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
