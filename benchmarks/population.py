"""Population retraining vs a Python loop over chips: prints one JSON object per setting.

  python -m benchmarks.population                 # N in {1, 8, 32, 128}
  python -m benchmarks.population --chips=32      # one setting
  python -m benchmarks.population --quick         # seconds-long smoke mode (digits, mlp)

For each population size N: chip-steps/s of the population training step (all N chips;
``Trainer.run``, the path the pipeline uses, ``--steps`` steps per call; also one call per
step of ``Trainer.population_step``) and of a Python loop that calls the jitted single-chip
step for each chip; their ratio; chip-evaluations/s of population evaluation
on the test set; compile time of ``Trainer.run``; peak RSS of the process so far (sizes run
in increasing order, so it is that of the largest size yet); the step's GFLOP/s (XLA's flop
count of the compiled step / time) next to a float32 matmul's GFLOP/s measured in the same run.
"""

from __future__ import annotations

import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from reduce_jax import data as data_lib
from reduce_jax import faults, models, population, train

CHIPS = flags.DEFINE_list("chips", ["1", "8", "32", "128"], "Population sizes N.")
QUICK = flags.DEFINE_boolean("quick", False, "Smoke mode: digits, mlp, N=4, few repeats.")
DATASET = flags.DEFINE_string("dataset", "mnist5k", "Dataset.")
MODEL = flags.DEFINE_string("model", "lenet5", "Model.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per measurement.")
ARRAY = flags.DEFINE_integer("array", 16, "Systolic array size (square).")


def _time(fn, repeats: int) -> float:
    """Best-of-3 seconds per call of ``fn`` (which blocks), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def matmul_gflops(n: int = 2048) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    s = _time(lambda: f(a).block_until_ready(), 3)
    return 2 * n**3 / s / 1e9


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def bench(n: int, ds, model, params, peak: float, steps: int, array: int) -> dict:
    tx = train.make_optimizer("adam", 1e-3)
    trainer = train.make_trainer(model, tx, BATCH_SIZE.value)
    data = population.DeviceData.from_dataset(ds)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(1), n, array, array, 0.1))
    states, masks = population.init_chunk(trainer, params, maps, np.full(n, 1 << 30))
    idx = train.batch_indices(jax.random.key(2), 0, data.num_train, BATCH_SIZE.value)
    x, y = data.train_images[idx], data.train_labels[idx]

    # Compile time of the pipeline's path (Trainer.run); the flop count of one step.
    start = time.perf_counter()
    trainer.run.lower(
        states, masks, data.train_images, data.train_labels, jax.random.key(2), 0, steps
    ).compile()
    compile_s = time.perf_counter() - start
    compiled = (
        jax.jit(trainer.population_step.__wrapped__, donate_argnums=0)
        .lower(states, masks, x, y)
        .compile()
    )
    flops = _flops(compiled)

    holder = [states]

    def pop_step():
        holder[0], loss = compiled(holder[0], masks, x, y)
        loss.block_until_ready()

    step_s = _time(pop_step, steps)

    # The production path: Trainer.run, many steps per call (batches gathered on device).
    def pop_run():
        holder[0] = trainer.run(
            holder[0], masks, data.train_images, data.train_labels, jax.random.key(2), 0, steps
        )
        holder[0].step.block_until_ready()

    pop_s = _time(pop_run, 1) / steps

    chips = [train.slice_chips(holder[0], i) for i in range(n)]
    chip_masks = [train.slice_chips(masks, i) for i in range(n)]

    def loop_step():
        for i in range(n):
            chips[i], loss = trainer.step(chips[i], chip_masks[i], x, y)
        loss.block_until_ready()

    loop_s = _time(loop_step, max(1, steps // 2))

    def evaluate():
        trainer.evaluate(
            holder[0].params, masks, data.test_images, data.test_labels
        ).block_until_ready()

    eval_s = _time(evaluate, 1)
    step_gflops = flops / pop_s / 1e9
    return dict(
        chips=n,
        population_chip_steps_per_s=round(n / pop_s, 2),
        population_single_step_calls_chip_steps_per_s=round(n / step_s, 2),
        loop_chip_steps_per_s=round(n / loop_s, 2),
        speedup=round(loop_s / pop_s, 3),
        eval_chip_evals_per_s=round(n * len(ds.test_labels) / eval_s, 1),
        compile_s=round(compile_s, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        step_gflops=round(step_gflops, 2),
        matmul_gflops=round(peak, 2),
        fraction_of_matmul_peak=round(step_gflops / peak, 4),
        model=model.__class__.__name__,
        dataset=ds.name,
        batch_size=BATCH_SIZE.value,
        devices=jax.device_count(),
    )


def main(argv):
    del argv
    if QUICK.value:
        ds = data_lib.load_dataset("digits")
        name, sizes, steps, array = "mlp", [4], 2, 8
    else:
        ds = data_lib.load_dataset(DATASET.value)
        name, sizes, steps, array = (
            MODEL.value,
            [int(c) for c in CHIPS.value],
            STEPS.value,
            (ARRAY.value),
        )
    model = models.get_model(name, ds.num_classes)
    params = models.init_params(model, jax.random.key(0), ds.image_shape)
    peak = matmul_gflops(512 if QUICK.value else 2048)
    for n in sizes:
        print(json.dumps(bench(n, ds, model, params, peak, steps, array)), flush=True)


if __name__ == "__main__":
    app.run(main)
