"""Memory and compiles of the retraining phase as chunks go by: one JSON line per chunk.

  python -m benchmarks.retrain_memory --chips=480 --chips_per_batch=16

Retrains ``--chips`` chips of a small MLP on digits (budgets 0 to 11 steps, so chunks are
compacted as chips finish, and top-ups) through ``retraining.retrain``, and after each chunk
prints the chips done, the process's current and peak RSS (MB) and the number of programs
compiled so far. With memory bounded by ``--chips_per_batch``, both RSS figures level off
after the first chunks instead of growing with the chips.
"""

from __future__ import annotations

import logging as py_logging
import resource

import jax
import numpy as np
from absl import app, flags

from benchmarks import device
from reduce_jax import data
from reduce_jax.engine import population, progress, train
from reduce_jax.hardware import faults
from reduce_jax.nets import models
from reduce_jax.stages import retraining

CHIPS = flags.DEFINE_integer("chips", 480, "Chips to retrain.")
CHIPS_PER_BATCH = flags.DEFINE_integer("chips_per_batch", 16, "Chips per chunk.")
RESULTS_DIR = device.define_results_flag()


class _CompileCounter(py_logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        self.count += record.getMessage().startswith("Compiling")


def _rss_mb() -> tuple[float, float]:
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv):
    del argv
    counter = _CompileCounter()
    py_logging.getLogger("jax._src.interpreters.pxla").addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    ds = data.load_dataset("digits")
    model = models.MLP(num_classes=10, hidden=(32,))
    variables = jax.tree.map(np.asarray, models.init_variables(model, jax.random.key(0), (8, 8, 1)))
    trainer = train.make_trainer(model, train.make_optimizer("adam", 3e-3), 64)
    device_data = population.DeviceData.from_dataset(data.split_validation(ds, 0.1))
    ctx = population.Context(trainer, variables, device_data, 23, CHIPS_PER_BATCH.value)
    policy = retraining.Verification(
        decision_target=0.5, test_target=0.5, topup_steps=4, max_topup_steps=8
    )
    n = CHIPS.value
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(1), n, 8, 8, 0.1))
    steps = np.random.default_rng(0).integers(0, 12, n)
    units = retraining.Units.of_groups([[i] for i in range(n)], steps, True)

    results = device.Results("retrain_memory", RESULTS_DIR.value)

    class Meter(progress.Meter):
        def __call__(self, k: int) -> None:
            super().__call__(k)
            if self.unit == "chips":
                current, peak = _rss_mb()
                row = dict(chips_done=self.done, rss_mb=round(current), peak_rss_mb=round(peak))
                results(dict(row, compiles=counter.count))

    population.Meter = Meter  # the driver's per-chunk meter
    retraining.retrain(ctx, policy, units, maps, jax.random.key(3))


if __name__ == "__main__":
    app.run(main)
