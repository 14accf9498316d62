"""Keep NumPy's BLAS library to one thread in a process that runs ONNX Runtime sessions.

The server's NumPy work is small: the out-of-domain distance (a [classes, 1280] x [1280, 64] product
per image), the heat-maps, calibration. NumPy's OpenBLAS still starts a thread per core for each
product, and those threads spin for the same cores ONNX Runtime's are using. On a 2-core AMD EPYC
(AVX2) that made the out-of-domain distance 11% of the server's samples under 16 clients, and one
BLAS thread took the server from 60-67 to 80-98 images/s (README, Performance). On an idle machine
one thread is a little slower at these sizes (the out-of-domain score of one image: 0.16 against
0.12 ms), which is nothing against what the spinning threads took under load.
"""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits


def single_threaded_blas() -> list[int]:
    """Limit every BLAS library loaded in this process to one thread; returns their thread counts now.

    Call it after NumPy is imported (threadpoolctl finds the libraries already loaded). The limit holds
    until the process ends (threadpoolctl restores it only when used as a context manager).
    """
    threadpool_limits(limits=1, user_api="blas")
    return blas_threads()


def blas_threads() -> list[int]:
    """How many threads each loaded BLAS library uses now."""
    return [int(pool["num_threads"]) for pool in threadpool_info() if pool.get("user_api") == "blas"]
