"""Runs ``experiments.resilience`` and SIGKILLs it right after the first chunk of a phase is
saved: a deterministic stand-in for a run killed at an arbitrary point in that phase.

Usage: ``python tests/kill_after_chunk.py PHASE [resilience flags...]``.
"""

import os
import runpy
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reduce_jax.engine import progress  # noqa: E402


def main() -> None:
    phase = sys.argv[1]
    put = progress.ProgressStore.put

    def put_then_die(self, saved_phase, index, result):
        put(self, saved_phase, index, result)
        if saved_phase == phase:
            os.kill(os.getpid(), signal.SIGKILL)

    progress.ProgressStore.put = put_then_die
    sys.argv = ["experiments.resilience", *sys.argv[2:]]
    runpy.run_module("experiments.resilience", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
