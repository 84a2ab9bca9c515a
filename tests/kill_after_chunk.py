"""Runs ``experiments.resilience`` and stops it when the code reaches a given point: a
deterministic stand-in for a run stopped at an arbitrary moment (no delays, so the stop point
does not depend on machine load).

Usage: ``python tests/kill_after_chunk.py STOP [resilience flags...]``, where ``STOP`` is

* ``PHASE``: SIGKILL right after the first chunk of ``PHASE`` is saved in this process;
* ``SIGNAL@POINT``: the process sends itself ``SIGNAL`` (``SIGTERM`` or ``SIGINT``, which the
  CLI handles) when it first reaches ``POINT``, one of ``POINTS`` or ``before:PHASE`` (the
  first chunk of ``PHASE`` computed, not yet saved) or ``after:PHASE`` (just saved).

A run that ends without reaching its stop point exits with code 3.
"""

import os
import runpy
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reduce_jax import config, data, files  # noqa: E402
from reduce_jax.engine import progress  # noqa: E402
from reduce_jax.stages import baseline  # noqa: E402

NOT_REACHED = 3
# Points of a run: (module, function, "before" it runs or "after" it returned).
POINTS = {
    "validate": (config, "validate", "before"),  # flags parsed, nothing read yet
    "load_data": (data, "load_dataset", "before"),
    "train_baseline": (baseline, "train_baseline", "before"),
    "save_baseline": (baseline, "save_baseline", "before"),  # trained, not saved
    "saved_baseline": (baseline, "save_baseline", "after"),
}
SUMMARY_WRITTEN = "summary.json"  # point: summary.json written, the other outputs not yet


def _stop(signum: int) -> None:
    os.kill(os.getpid(), signum)


def _at_call(module, name: str, when: str, signum: int) -> None:
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        if when == "before":
            _stop(signum)
        out = original(*args, **kwargs)
        if when == "after":
            _stop(signum)
        return out

    setattr(module, name, wrapped)


def _at_chunk(phase: str, when: str, signum: int) -> None:
    put = progress.ProgressStore.put

    def put_then_stop(self, saved_phase, index, result):
        if saved_phase == phase and when == "before":
            _stop(signum)
        put(self, saved_phase, index, result)
        if saved_phase == phase and when == "after":
            _stop(signum)

    progress.ProgressStore.put = put_then_stop


def _at_summary(signum: int) -> None:
    write = files.write_json_atomic

    def write_then_stop(path, *args, **kwargs):
        write(path, *args, **kwargs)
        if os.path.basename(path) == SUMMARY_WRITTEN:
            _stop(signum)

    files.write_json_atomic = write_then_stop


def install(stop: str) -> None:
    """Sets the stop point ``stop`` (see the module's docstring)."""
    if "@" not in stop:
        _at_chunk(stop, "after", signal.SIGKILL)
        return
    name, point = stop.split("@", 1)
    signum = signal.Signals[name]
    if point in POINTS:
        _at_call(*POINTS[point], signum)
    elif point == SUMMARY_WRITTEN:
        _at_summary(signum)
    elif point.split(":", 1)[0] in ("before", "after") and ":" in point:
        when, phase = point.split(":", 1)
        _at_chunk(phase, when, signum)
    else:
        raise SystemExit(f"unknown stop point {point!r}")


def main() -> None:
    install(sys.argv[1])
    sys.argv = ["experiments.resilience", *sys.argv[2:]]
    try:
        runpy.run_module("experiments.resilience", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(NOT_REACHED)


if __name__ == "__main__":
    main()
