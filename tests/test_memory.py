"""glibc's heaps give memory back: large blocks are their own mappings, ``trim_heaps`` frees the rest."""

import subprocess
import sys
import textwrap

import pytest

from oncolens.runtime.memory import resident_bytes, return_large_allocations, trim_heaps

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")


def run_fresh(code: str) -> list[float]:
    """Run ``code`` in a new interpreter (its heap is its own) and return the numbers it prints."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [float(word) for word in done.stdout.split()]


def test_freed_small_blocks_stay_resident_until_the_heaps_are_trimmed() -> None:
    before, freed, trimmed, released = run_fresh(
        """
    from oncolens.runtime.memory import resident_bytes, return_large_allocations, trim_heaps
    def resident_mb():
        return resident_bytes() / 2**20
    return_large_allocations()
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # 190 MB of blocks under the 1 MiB threshold
    kept = blocks[::50]  # a few stay alive, spread over the heap: it cannot just shrink from the top
    before = resident_mb()
    del blocks
    freed = resident_mb()
    released = trim_heaps()
    print(before, freed, resident_mb(), int(released))
    """
    )
    assert freed > before - 20, "freeing alone gave the memory back: nothing left for trim_heaps to do"
    assert freed - trimmed > 100 and released == 1


def test_the_settings_take_on_this_system() -> None:
    assert return_large_allocations() is True
    assert trim_heaps() in (True, False)  # callable: True only when something was free to release


def test_resident_bytes_follow_an_allocation() -> None:
    before = resident_bytes()
    block = bytearray(64 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    after = resident_bytes()
    assert before is not None and after is not None
    assert after - before > 60 * 2**20
