"""Progress of a long run: per-chunk results saved for resuming, and a progress meter."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import TypeVar

import jax
import numpy as np
from absl import logging

from reduce_jax import files
from reduce_jax.errors import ConfigError

PROGRESS_FILE = "progress.json"
# Settings that do not change results: a resumed run may differ in these.
_NOT_RESULT_KEYS = ("workdir", "summary_chips")
# A chunk's result: a NamedTuple of numpy arrays (``population.drive``).
Result = TypeVar("Result", bound=tuple)


class ProgressStore:
    """Per-chunk results of the phases of a run, saved atomically after each chunk."""

    def __init__(self, workdir: str | None, config: dict, overwrite: bool):
        self.path = os.path.join(workdir, PROGRESS_FILE) if workdir else None
        key = {k: v for k, v in config.items() if k not in _NOT_RESULT_KEYS}
        self.state = {"config": key, "phases": {}}
        if self.path and os.path.isfile(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            if saved.get("config") != key and not overwrite:
                diff = sorted(
                    k
                    for k in set(key) | set(saved.get("config", {}))
                    if key.get(k) != saved.get("config", {}).get(k)
                )
                raise ConfigError(
                    f"--workdir={workdir} holds a run with other settings (differs in: "
                    f"{', '.join(diff)}); pass --overwrite or choose another --workdir"
                )
            if saved.get("config") == key:
                self.state = saved
                logging.info("resuming from %s", self.path)

    def done(self, phase: str, result: type[Result]) -> dict[int, Result]:
        """Saved chunks of ``phase``: chunk index -> the ``result`` (a NamedTuple of arrays)
        that ``put`` was given (a field saved as None is None)."""
        saved = self.state["phases"].get(phase, {})
        return {
            int(i): result(**{f: _decode(r[f]) if f in r else None for f in result._fields})
            for i, r in saved.items()
        }

    def put(self, phase: str, index: int, result: tuple) -> None:
        """Saves chunk ``index`` of ``phase`` (a NamedTuple of arrays or None; NaN and inf
        are kept) atomically."""
        encoded = {k: _encode(np.asarray(v)) for k, v in result._asdict().items() if v is not None}
        self.state["phases"].setdefault(phase, {})[str(index)] = encoded
        if self.path and jax.process_index() == 0:
            files.write_json_atomic(self.path, self.state)


# JSON has no NaN or infinity: non-finite floats are saved as these strings.
_NON_FINITE = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def _encode(x: np.ndarray) -> dict:
    """An array as JSON: dtype, shape and the values as a flat list."""
    values = x.ravel().tolist()
    if x.dtype.kind == "f":
        values = [v if np.isfinite(v) else str(v) for v in values]
    return {"dtype": x.dtype.str, "shape": list(x.shape), "values": values}


def _decode(d: dict) -> np.ndarray:
    values = [_NON_FINITE.get(v, v) if isinstance(v, str) else v for v in d["values"]]
    return np.asarray(values, np.dtype(d["dtype"])).reshape(d["shape"])


class Meter:
    """Logs progress of a long phase (work done of the total, rate, ETA) at most every
    ``every_s`` seconds, and when the work is complete."""

    def __init__(self, label: str, total: int, unit: str = "chip-steps", every_s: float = 5.0):
        self.label, self.total, self.unit, self.every_s = label, max(int(total), 1), unit, every_s
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0
        self.reused = 0  # work found done (resumed): counted as done, not in the rate

    def resumed(self, n: int) -> None:
        """Counts ``n`` units of work that an earlier run finished (not logged on its own)."""
        self.done += n
        self.reused += n

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter() - self.start
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = (self.done - self.reused) / max(now, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            logging.info(
                "%s: %d/%d %s (%.0f%%), %.1f/s, ETA %.0f s",
                self.label,
                self.done,
                self.total,
                self.unit,
                100 * self.done / self.total,
                rate,
                eta,
            )


# Seconds this process has spent compiling (tracing, lowering to MLIR and XLA's compile), as
# JAX's monitoring events report them; a compile served by the persistent compilation cache
# counts its tracing and lowering only.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]


def _on_event_duration(event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (all threads)."""
    return _compile_seconds[0]


class Timer:
    """Seconds per phase of a run: ``with timer.phase("analysis"): ...`` records
    ``analysis_s``, and ``analysis_compile_s``, the part of it spent compiling; ``times``
    keeps them in the order the phases ran."""

    def __init__(self):
        self.start = time.perf_counter()
        self.times: dict[str, float | bool] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t, c = time.perf_counter(), compile_seconds()
        try:
            yield
        finally:
            self.times[f"{name}_s"] = time.perf_counter() - t
            self.times[f"{name}_compile_s"] = compile_seconds() - c

    def total(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self.start
