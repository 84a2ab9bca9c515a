"""The int8 population step against the float32 one: prints one JSON object per setting.

  python -m benchmarks.datapath                       # LeNet-5 on mnist5k, N in {8}
  python -m benchmarks.datapath --chips=8,32 --trials=5
  python -m benchmarks.datapath --quick               # seconds-long smoke mode (digits)

For each population size N, one line with the chip-steps/s of three population training
steps, timed in the same process on the same batches (``--steps`` steps per call in a
``fori_loop``, best of ``--trials`` calls, after a compiling call):

* ``float32``: the engine's ``Trainer.run`` (FAP+T as the study runs it, bypass masks of
  ``--fault_rate`` PE maps);
* ``int8``: the int8 model (``nets.int8``) on the same bypass masks, no stuck bits (the
  matrix-product path, on ``mitigation.fault_aware`` hardware);
* ``int8_psum``: the int8 model with a stuck partial-sum bit in every faulty PE of the same
  maps, no bypass (the fault-aware retraining; the row-by-row path of
  ``stuck_at.stuck_at_matmul``);

and their ratios ``int8_over_float32`` and ``int8_psum_over_float32`` (time per step,
so above 1 is slower than float32), with each one's compile time, the backend and JAX's
version. Every line is also written into ``benchmarks/results/`` (``--results_dir``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import device
from reduce_jax import data as data_lib
from reduce_jax.engine import population, train
from reduce_jax.hardware import faults, stuck_at
from reduce_jax.nets import int8, models
from reduce_jax.stages import mitigation

CHIPS = flags.DEFINE_list("chips", ["8"], "Population sizes N.")
QUICK = flags.DEFINE_boolean("quick", False, "Smoke mode: digits, LeNet-5 at width 0.5, N=2.")
DATASET = flags.DEFINE_string("dataset", "mnist5k", "Dataset (mnist5k, digits, ...).")
MODEL = flags.DEFINE_string("model", "lenet5", "Model name (nets.models.MODELS).")
MODEL_WIDTH = flags.DEFINE_float("model_width", 1.0, "Channel multiplier.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Training batch size.")
ARRAY = flags.DEFINE_list("array", ["16", "16"], "Array rows, columns.")
FAULT_RATE = flags.DEFINE_float("fault_rate", 0.05, "Faulty-PE rate of every chip.")
STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per call.")
TRIALS = flags.DEFINE_integer("trials", 3, "Timings are the best of this many calls.")
RESULTS_DIR = device.define_results_flag()


def _time(fn, trials: int) -> tuple[float, float]:
    """``(compile and first call s, best-of-trials s)`` of ``fn`` (which blocks)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(max(1, trials)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def measure(n: int, dataset, model, batch_size: int, array, rate: float, steps: int, trials: int):
    """One line: chip-steps/s of the float32, int8 and int8-with-psum-faults steps."""
    d = population.DeviceData.from_dataset(data_lib.split_validation(dataset, 0.1))
    variables = models.init_variables(model, jax.random.key(0), dataset.image_shape)
    tx = train.make_optimizer("adam", 1e-3)
    maps = faults.sample_fault_maps(jax.random.key(1), n, *array, rate, "exact")
    psum = stuck_at.StuckAtMix((0.0, 0.0, 1.0), 0.5, "uniform")
    stuck = stuck_at.sample_stuck_at(jax.random.key(2), maps, psum)
    key = jax.random.key(3)
    x, y = d.train_images, d.train_labels

    float_trainer = train.make_trainer(model, tx, batch_size)
    budgets = np.full(n, 1 << 30, np.int32)
    f_states, masks = population.init_chunk(float_trainer, variables, np.asarray(maps), budgets)

    held = {"states": f_states}  # Trainer.run donates its states: each call continues them

    def float_run():
        held["states"] = float_trainer.run(held["states"], masks, x, y, key, 0, steps)
        jax.block_until_ready(held["states"].params)

    folded, params = int8.folded_model(model), int8.fold(variables)
    net = int8.Int8Net(folded, int8.calibrate(folded, params, x[:500]), tuple(array))
    int8_masks = float_trainer.chips(params, jnp.asarray(maps))
    ones = train.unit_masks(params, n)
    fast = train.make_trainer(mitigation.fault_aware(net, key), tx, batch_size)
    aware_net = net._replace(sites=("psum",))
    aware = train.make_trainer(mitigation.fault_aware(aware_net, key), tx, batch_size)
    v = {"params": params, "batch_stats": {}}
    held["int8"] = fast.init_population(v, (int8_masks, None), budgets)
    held["psum"] = aware.init_population(v, (ones, stuck), budgets)

    def int8_run():
        held["int8"] = fast.run(held["int8"], (int8_masks, None), x, y, key, 0, steps)
        jax.block_until_ready(held["int8"].params)

    def psum_run():
        held["psum"] = aware.run(held["psum"], (ones, stuck), x, y, key, 0, steps)
        jax.block_until_ready(held["psum"].params)

    row = dict(chips=n, steps=steps, batch_size=batch_size, array=list(array), fault_rate=rate)
    times = {}
    for name, fn in (("float32", float_run), ("int8", int8_run), ("int8_psum", psum_run)):
        first, best = _time(fn, trials)
        times[name] = best
        row[f"{name}_chip_steps_per_s"] = round(n * steps / best, 2)
        row[f"{name}_compile_s"] = round(first - best, 2)
    row["int8_over_float32"] = round(times["int8"] / times["float32"], 2)
    row["int8_psum_over_float32"] = round(times["int8_psum"] / times["float32"], 2)
    row["backend"] = jax.default_backend()
    row["jax_version"] = jax.__version__
    return row


def main(argv):
    del argv
    if QUICK.value:
        name, width, chips, bs, array = "digits", 0.5, [2], 32, (8, 8)
    else:
        name, width = DATASET.value, MODEL_WIDTH.value
        chips, bs, array = [int(c) for c in CHIPS.value], BATCH_SIZE.value, ARRAY.value
    dataset = data_lib.load_dataset(name)
    model = models.get_model(MODEL.value, dataset.num_classes, width)
    array = tuple(int(a) for a in array)
    results = device.Results("datapath", RESULTS_DIR.value)
    trials = 1 if QUICK.value else TRIALS.value
    steps = 2 if QUICK.value else STEPS.value
    for n in chips:
        row = measure(n, dataset, model, bs, array, FAULT_RATE.value, steps, trials)
        results(dict(row, dataset=name, model=MODEL.value, model_width=width))


if __name__ == "__main__":
    app.run(main)
