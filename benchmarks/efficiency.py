"""How close a run's retraining phase comes to the population benchmark's rates: one JSON line.

  python -m benchmarks.population --chips=32 > bench.jsonl
  python -m benchmarks.efficiency --workdir=runs/default --benchmark=bench.jsonl

The retraining phase (per-chip Reduce: retraining, verification, top-ups; ``timing.retrain_s``
of ``summary.json``) does two kinds of useful work: chip-steps (every chip's selected amount
and top-ups, ``chips.csv``) and chip-image evaluations, of the validation split (every chip
before retraining, after its selected steps if it has any, and after each top-up increment:
the decisions) and of the test set (every chip once after its retraining: the report). The
*ideal* time is that work at the benchmark's rates (``population_chip_steps_per_s`` and
``eval_chip_evals_per_s`` of its row for the run's ``--chips_per_batch``, else the nearest
size); the *efficiency* is ideal time / measured time. What is missing to 1 is the
bookkeeping around the step: padding and compaction, host transfers, evaluations of chips
that need none, compiles. ``efficiency_without_compile`` leaves out the phase's compile seconds
(``timing.retrain_compile_s``; almost none when the programs come from the persistent
compilation cache, ``--compilation_cache_dir``).
Benchmark and run must come from the same machine, with nothing else running.
"""

from __future__ import annotations

import csv
import json
import os

from absl import app, flags

from benchmarks import device
from reduce_jax.engine import train

WORKDIR = flags.DEFINE_string("workdir", None, "The run's output directory.", required=True)
RESULTS_DIR = device.define_results_flag()
BENCHMARK = flags.DEFINE_string(
    "benchmark", None, "File of benchmarks.population's JSON lines.", required=True
)


def benchmark_row(rows: list[dict], chips: int) -> dict:
    """The row measured at ``chips`` chips, else at the nearest size (the larger on a tie;
    rows with rates only)."""
    rated = [r for r in rows if "population_chip_steps_per_s" in r]
    if not rated:
        raise ValueError("no benchmark row with rates")
    return min(rated, key=lambda r: (abs(r["chips"] - chips), -r["chips"]))


def retrain_work(
    chips: list[dict], topup_steps: int, val_images: int, test_images: int
) -> tuple[int, int]:
    """``(chip_steps, chip_image_evals)`` the retraining phase needs for ``chips``
    (``chips.csv`` rows): the steps of every retrained chip; validation passes of every chip
    before, after its selected steps (if any) and after each top-up increment (``topup_steps``
    steps, the last one possibly cut); and one test pass per chip."""
    steps = passes = 0
    for c in chips:
        selected = int(c["selected_steps"]) if c["selected_steps"] not in ("", None) else 0
        extra = int(c["topup_steps"] or 0)
        steps += selected + extra
        passes += 1 + (selected > 0) + (-(-extra // topup_steps) if topup_steps > 0 else 0)
    return steps, passes * val_images + len(chips) * test_images


def efficiency(
    summary: dict, chips: list[dict], bench: dict, val_images: int, test_images: int
) -> dict:
    """The figure (see the module docstring) as a JSON-able dict; the benchmark's
    ``eval_chip_evals_per_s`` counts chip-image evaluations."""
    cfg, spe = summary["config"], summary["baseline"]["steps_per_epoch"]
    topup = int(train.epochs_to_steps(cfg["topup_epochs"], spe))
    steps, evals = retrain_work(chips, topup, val_images, test_images)
    step_rate, eval_rate = bench["population_chip_steps_per_s"], bench["eval_chip_evals_per_s"]
    measured = summary["timing"]["retrain_s"]
    # Runs written before the compile seconds were recorded have none: counted as 0.
    compiling = summary["timing"].get("retrain_compile_s", 0.0)
    ideal = steps / step_rate + evals / eval_rate
    return dict(
        chips=len(chips),
        chips_per_batch=cfg["chips_per_batch"],
        retrain_s=round(measured, 2),
        chip_steps=steps,
        chip_evals=evals,
        phase_chip_steps_per_s=round(steps / measured, 2),
        benchmark_chips=bench["chips"],
        benchmark_chip_steps_per_s=step_rate,
        benchmark_chip_evals_per_s=eval_rate,
        ideal_train_s=round(steps / step_rate, 2),
        ideal_eval_s=round(evals / eval_rate, 2),
        efficiency=round(ideal / measured, 3),
        compile_s=round(compiling, 2),
        efficiency_without_compile=round(ideal / (measured - compiling), 3),
    )


def main(argv):
    del argv
    with open(os.path.join(WORKDIR.value, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(WORKDIR.value, "chips.csv"), newline="") as f:
        chips = list(csv.DictReader(f))
    with open(BENCHMARK.value) as f:
        rows = [json.loads(line) for line in f if line.strip().startswith("{")]
    # The run's own split sizes (also right for --dataset=npz and a user's Dataset).
    val, test = summary["inputs"]["val_images"], summary["inputs"]["test_images"]
    bench = benchmark_row(rows, summary["config"]["chips_per_batch"])
    device.Results("efficiency", RESULTS_DIR.value)(efficiency(summary, chips, bench, val, test))


if __name__ == "__main__":
    app.run(main)
