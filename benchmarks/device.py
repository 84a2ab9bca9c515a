"""The device a benchmark runs on: versions, kind, memory limit and peak memory.

Imports nothing of the library, so ``benchmarks.collect env`` checks the device even where
the library does not import.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys

import jax
from absl import flags

MB = 1 << 20
# Where a benchmark's JSON lines are written, besides being printed.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def define_results_flag() -> flags.FlagHolder:
    """``--results_dir``: where the benchmark writes the JSON lines it prints (defined once
    per process, however many benchmarks are imported)."""
    if "results_dir" in flags.FLAGS:
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS["results_dir"])
    return flags.DEFINE_string(
        "results_dir",
        RESULTS_DIR,
        "Folder the JSON lines are written into as well as printed (one file a run, named "
        "for the benchmark, the device and the UTC time); empty: printed only.",
    )


class Results:
    """A benchmark's output: each row printed as one JSON line and appended to
    ``<directory>/<name>-<device kind>-<UTC date and time>.jsonl`` (nothing written where
    ``directory`` is empty)."""

    def __init__(self, name: str, directory: str | None):
        self.path = None
        if directory:
            kind = re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
            os.makedirs(directory, exist_ok=True)
            self.path = os.path.join(directory, f"{name}-{kind}-{now}.jsonl")

    def __call__(self, row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if self.path is not None:
            first = not os.path.exists(self.path)
            with open(self.path, "a") as f:
                f.write(line + "\n")
            if first:
                print(f"results: {self.path}", file=sys.stderr, flush=True)
