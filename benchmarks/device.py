"""The device a benchmark runs on: versions, kind, memory limit and peak memory.

Imports nothing of the library, so ``benchmarks.collect env`` checks the device even where
the library does not import.
"""

from __future__ import annotations

import os
import platform

import jax

MB = 1 << 20


def memory_stats() -> dict:
    """The first device's allocator statistics ({} where the backend has none, as on CPUs)."""
    try:
        return jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        return {}


def memory_limit() -> int | None:
    """Bytes the first device may allocate: its allocator's limit; host memory on a CPU."""
    stats = memory_stats()
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if jax.default_backend() == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def peak_mb() -> float | None:
    """Peak bytes in use on the first device so far, in MB (None where not reported)."""
    peak = memory_stats().get("peak_bytes_in_use")
    return None if peak is None else round(peak / MB, 1)


def environment() -> dict:
    """Versions, backend and device kind of this run."""
    import jaxlib

    return dict(
        jax_version=jax.__version__,
        jaxlib_version=getattr(jaxlib, "__version__", None),
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        python_version=platform.python_version(),
    )
