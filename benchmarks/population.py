"""Population retraining vs a Python loop over chips: prints one JSON object per setting.

  python -m benchmarks.population                 # N in {1, 8, 32, 128}
  python -m benchmarks.population --chips=32      # one setting
  python -m benchmarks.population --quick         # seconds-long smoke mode (digits, mlp)
  python -m benchmarks.population --dataset=synthetic_cifar --model=vgg_small --chips=256

The settings a Reduce run shares with it (``--dataset``, ``--model``, ``--model_width``,
``--batch_size``, ``--chip_batching``, ``--array_rows``, ``--array_cols``, the retraining
``--optimizer``, ``--learning_rate`` and ``--weight_decay``, ``--eval_batch_size``,
``--seed``) are ``reduce_jax.config``'s flags, read into a ``ReduceConfig``; the flags below
are the benchmark's own. Every line is also written into ``benchmarks/results/``
(``--results_dir``; the path is printed on stderr).

For each population size N: chip-steps/s of the population training step (all N chips;
``Trainer.run``, the path the pipeline uses, ``--steps`` steps per call; also one call per
step of ``Trainer.population_step``) and of a Python loop that calls the jitted single-chip
step for each chip; their ratio; chip-evaluations/s of population evaluation
on the test set; compile time of ``Trainer.run``; peak RSS of the process so far and, where
the device reports it (GPUs), the device's peak memory so far (sizes run in increasing order,
so both are those of the largest size yet); the step's GFLOP/s (XLA's flop count of the
compiled single-chip step, times N, / time; on a CPU it counts the zero channels that
``conv.conv_single`` pads in) next to a float32 matmul's GFLOP/s measured in the same run.

Memory. The N chips are computed in chunks of ``--chips_per_batch`` chips, one chunk after
another, as the pipeline does. Unless the flag is given, the chunk is the largest divisor of N whose
compiled programs (``compiled.memory_analysis()``), plus the other chips' states kept on the
device, fit in ``--memory_fraction`` of the device's memory (host memory on a CPU). If not
even one chip fits, or a chunk given with ``--chips_per_batch`` does not, the line for that N
is ``{"chips": N, "skipped": "<reason>", ...}`` and nothing is run for it.

Besides the rates, each line holds ``chips_per_batch``, ``loop_chips`` (chips the loop ran
over), ``planned_mb`` (what the plan above counted), ``device_memory_limit_mb``, the
matmul's size, dtype and precision, and ``jax_version``, ``jaxlib_version``, ``backend``
and ``device_kind``. A size that raised (say, out of memory at run time) prints
``{"chips": N, "error": "<message>", ...}``; the process then exits with status 1 after the
other sizes.

``--dataset=synthetic_cifar`` is CIFAR-shaped random data (32x32x3 images, 10 classes,
``--synthetic_sizes`` train/test images, the same for the same ``--seed``) for throughput
runs with no dataset files; it is not one of the library's datasets.
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import sys
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import device
from reduce_jax import config, sharding
from reduce_jax import data as data_lib
from reduce_jax.engine import population, train
from reduce_jax.hardware import faults
from reduce_jax.nets import models
from reduce_jax.stages import policies

CHIPS = flags.DEFINE_list("chips", ["1", "8", "32", "128"], "Population sizes N.")
QUICK = flags.DEFINE_boolean("quick", False, "Smoke mode: digits, mlp, N=4, few repeats.")
NO_BN = flags.DEFINE_boolean(
    "no_bn",
    False,
    "The model without BatchNorm (vgg11_bn, resnet*: convolutions with biases, the folded "
    "form), to measure what BatchNorm costs.",
)
STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per measurement.")
LOOP_CHIPS = flags.DEFINE_integer(
    "loop_chips",
    0,
    "Chips of the Python-loop baseline (0: all N). Its chip-steps/s does not depend on N, "
    "so a large N can time the loop on fewer chips.",
)
TRIALS = flags.DEFINE_integer("trials", 3, "Timings are the best of this many trials.")
MATMUL_N = flags.DEFINE_integer(
    "matmul_n", 0, "Size of the float32 matmul reference (0: 2048 on a CPU, else 8192)."
)
MEMORY_FRACTION = flags.DEFINE_float(
    "memory_fraction", 0.9, "Fraction of the device's memory a chunk may plan to use."
)
MEMORY_LIMIT_MB = flags.DEFINE_float(
    "memory_limit_mb", 0, "Device memory to plan with, in MB (0: what the device reports)."
)
SYNTHETIC_SIZES = flags.DEFINE_list(
    "synthetic_sizes", ["10000", "1000"], "Train and test images of a synthetic dataset."
)
RESULTS_DIR = device.define_results_flag()

# name -> (image shape, classes). Random inputs: for throughput only.
SYNTHETIC = {"synthetic_cifar": ((32, 32, 3), 10)}

MB = device.MB


def synthetic_dataset(name: str, num_train: int, num_test: int, seed: int = 0):
    """Uniform [0, 1) float32 images and uniform labels of ``SYNTHETIC[name]``'s shape."""
    if name not in SYNTHETIC:
        raise ValueError(f"unknown synthetic dataset {name!r}; expected one of {list(SYNTHETIC)}")
    shape, classes = SYNTHETIC[name]
    rng = np.random.default_rng(seed)
    images = rng.random((num_train + num_test, *shape), np.float32)
    labels = rng.integers(0, classes, num_train + num_test).astype(np.int32)
    return data_lib.Dataset(
        train_images=images[:num_train],
        train_labels=labels[:num_train],
        test_images=images[num_train:],
        test_labels=labels[num_train:],
        num_classes=classes,
        name=name,
    )


def load_dataset(
    name: str, synthetic_sizes=(10000, 1000), seed: int = 0, data_dir: str | None = None
):
    if name in SYNTHETIC:
        return synthetic_dataset(name, *(int(s) for s in synthetic_sizes), seed=seed)
    return data_lib.load_dataset(name, data_dir)


def _time(fn, repeats: int, trials: int = 3) -> float:
    """Best-of-``trials`` seconds per call of ``fn`` (which blocks), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(max(1, trials)):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def matmul_gflops(n: int = 2048, repeats: int = 3, trials: int = 3, precision=None) -> float:
    """GFLOP/s of an ``n x n`` float32 matmul (``precision``: None for the default, which on
    recent NVIDIA GPUs lets XLA use TF32; "highest" for full float32)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: jnp.matmul(a, a, precision=precision))
    s = _time(lambda: f(a).block_until_ready(), repeats, trials)
    return 2 * n**3 / s / 1e9


def compiled_bytes(compiled) -> int | None:
    """Device bytes a compiled program needs: arguments + outputs - donated + temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(m, list | tuple):
        m = m[0] if m else None
    if m is None:
        return None
    get = lambda name: int(getattr(m, name, 0) or 0)
    return (
        get("argument_size_in_bytes")
        + get("output_size_in_bytes")
        - get("alias_size_in_bytes")
        + get("temp_size_in_bytes")
    )


def chunk_candidates(n: int, num_devices: int = 1) -> list[int]:
    """Divisors of ``n`` that are multiples of ``num_devices``, largest first."""
    out = [c for c in range(n, 0, -1) if n % c == 0 and c % num_devices == 0]
    return out or [n]


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class Programs(NamedTuple):
    """Compiled programs of one chunk size."""

    chips: int
    run: Any
    step: Any
    evaluate: Any
    compile_s: float
    bytes: int | None  # the most any of them needs (None: unknown)
    step_flops: float


class Setup(NamedTuple):
    trainer: train.Trainer
    variables: Any
    data: population.DeviceData
    x: jax.Array
    y: jax.Array
    steps: int
    array: tuple[int, int]  # (rows, cols)


def _abstract_chunk(setup: Setup, c: int):
    """Shapes (and shardings) of the states and chips of a chunk of ``c`` chips."""

    def make(maps, budgets):
        chips = setup.trainer.chips(setup.variables["params"], maps)
        return setup.trainer.init_population(setup.variables, chips, budgets), chips

    shapes = jax.eval_shape(
        make,
        jax.ShapeDtypeStruct((c, *setup.array), jnp.bool_),
        jax.ShapeDtypeStruct((c,), jnp.int32),
    )
    if sharding.num_shards() == 1:
        return shapes
    spec = jax.sharding.NamedSharding(sharding.mesh(), jax.sharding.PartitionSpec(sharding.AXIS))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=spec), shapes)


def _compile_run(setup: Setup, c: int):
    states, chips = _abstract_chunk(setup, c)
    d = setup.data
    start = time.perf_counter()
    run = setup.trainer.run.lower(
        states, chips, d.train_images, d.train_labels, jax.random.key(2), 0, setup.steps
    ).compile()
    return run, time.perf_counter() - start


def _compile_rest(setup: Setup, c: int, run, compile_s: float, chip_flops: float) -> Programs:
    states, chips = _abstract_chunk(setup, c)
    d = setup.data
    step = (
        jax.jit(setup.trainer.population_step.__wrapped__, donate_argnums=0)
        .lower(states, chips, setup.x, setup.y)
        .compile()
    )
    evaluate = setup.trainer.evaluate.lower(
        states.variables, chips, d.test_images, d.test_labels
    ).compile()
    sizes = [compiled_bytes(p) for p in (run, step, evaluate)]
    need = None if any(s is None for s in sizes) else max(sizes)
    return Programs(c, run, step, evaluate, compile_s, need, c * chip_flops)


def chip_step_flops(setup: Setup) -> float:
    """XLA's flop count of one chip's training step (the single-chip program).

    A population step does this arithmetic for each of its chips; its own compiled program
    is not counted instead, because XLA counts the body of a loop (``lax.map`` over chips
    in the CPU convolutions) once, not once per chip. On a CPU the count includes the zero
    channels ``conv.conv_single`` pads in.
    """
    states, chips = jax.eval_shape(lambda t: train.slice_chips(t, 0), _abstract_chunk(setup, 1))
    return policies.xla_flops(setup.trainer.step.lower(states, chips, setup.x, setup.y).compile())


def plan(
    setup: Setup, n: int, loop_n: int, requested: int, budget, cache: dict, chip_flops: float
) -> dict:
    """Compiles the programs of the chunk size to use for ``n`` chips.

    Returns ``{"programs": Programs, "needed": bytes | None}`` or ``{"skipped": reason, ...}``.
    ``needed`` counts a chunk's programs, every other chip's states and masks (and the
    loop's copies), and the data once more.
    """
    per_chip = _nbytes(_abstract_chunk(setup, 1))  # states + masks of one chip
    d = setup.data
    data_bytes = _nbytes((d.train_images, d.train_labels, d.test_images, d.test_labels))

    def needed(c: int, program_bytes: int | None) -> int | None:
        if program_bytes is None:
            return None
        return program_bytes + (n - c + loop_n) * per_chip + data_bytes

    def fits(c, program_bytes):
        need = needed(c, program_bytes)
        return budget is None or need is None or need <= budget

    candidates = [requested] if requested else chunk_candidates(n, sharding.num_shards())
    # Program bytes per chip, from the last compile, else from sizes compiled before (all of
    # a program's bytes scaled with its chips: never more than it needs): sizes that would
    # not fit even so are not compiled.
    estimate = max((q.bytes / q.chips for q in cache.values() if q.bytes), default=None)
    smallest = None  # (chips, bytes needed, how known) of the smallest size ruled out
    for c in candidates:
        if estimate is not None and budget is not None:
            guess = (n - c + loop_n) * per_chip + data_bytes + c * estimate
            if guess > budget:
                smallest = (c, guess, "at least, estimated")
                continue
        if c in cache:
            programs = cache[c]
        else:
            run, compile_s = _compile_run(setup, c)
            programs = Programs(c, run, None, None, compile_s, compiled_bytes(run), float("nan"))
            if fits(c, programs.bytes):
                programs = _compile_rest(setup, c, run, compile_s, chip_flops)
        if programs.step is not None and fits(c, programs.bytes):
            cache[c] = programs
            return dict(programs=programs, needed=needed(c, programs.bytes))
        smallest = (c, needed(c, programs.bytes), "compiled")
        estimate = programs.bytes / c
    c, need, how = smallest
    return dict(
        skipped=(
            f"no chunk of the {n} chips fits in {budget / MB:.0f} MB of device memory "
            f"(--memory_fraction of the limit): {c} chips need {need / MB:.0f} MB ({how}), "
            f"with the other chips' states and masks at {per_chip / MB:.2f} MB each"
        ),
        needed_mb=round(need / MB, 1),
    )


def bench(
    n: int,
    cfg: config.ReduceConfig,
    ds,
    model,
    variables,
    peak: float,
    steps: int,
    chips_per_batch: int = 0,
    loop_chips: int = 0,
    trials: int = 3,
    memory_limit: int | None = None,
    memory_fraction: float = 0.9,
    cache: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """One JSON-able row for a population of ``n`` chips (see the module docstring).

    Args:
      cfg: the settings a run shares with the benchmark: the array (``array_rows``,
        ``array_cols``), ``batch_size``, ``chip_batching``, the retraining optimizer and
        ``eval_batch_size``.
      chips_per_batch: chips computed together (0: the largest divisor of ``n`` that fits).
      memory_limit: bytes to plan with (None: ``device.memory_limit()``).
      cache: compiled programs by chunk size, shared between calls with the same model,
        data, settings and steps.
      extra: keys added to the row.
    """
    cache = {} if cache is None else cache
    batch_size, array = cfg.batch_size, (cfg.array_rows, cfg.array_cols)
    key = (id(model), id(ds), cfg, steps)
    if cache.get("key") != key:
        cache.clear()
        cache["key"] = key
        cache["trainer"] = train.make_trainer(
            model,
            train.make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.weight_decay),
            batch_size,
            cfg.eval_batch_size,
            chip_batching=cfg.chip_batching,
        )
        # The benchmark takes no decisions: its test images stand in for the validation split.
        held_out = dict(val_images=ds.test_images, val_labels=ds.test_labels)
        cache["data"] = population.DeviceData.from_dataset(dataclasses.replace(ds, **held_out))
    trainer, data = cache["trainer"], cache["data"]
    idx = train.batch_indices(jax.random.key(2), 0, data.num_train, batch_size)
    x, y = data.train_images[idx], data.train_labels[idx]
    setup = Setup(trainer, variables, data, x, y, steps, array)
    loop_n = n if loop_chips <= 0 else min(n, loop_chips)
    limit = device.memory_limit() if memory_limit is None else memory_limit
    budget = None if limit is None else memory_fraction * limit
    programs_cache = cache.setdefault("programs", {})
    if chips_per_batch and n % chips_per_batch:
        raise ValueError(f"--chips_per_batch={chips_per_batch} must divide N={n}")
    meta = dict(
        model=model.__class__.__name__,
        dataset=ds.name,
        batch_size=batch_size,
        devices=jax.device_count(),
        **device.environment(),
        device_memory_limit_mb=None if limit is None else round(limit / MB, 1),
        **(extra or {}),
    )
    if "chip_flops" not in cache:
        cache["chip_flops"] = chip_step_flops(setup)
    p = plan(setup, n, loop_n, chips_per_batch, budget, programs_cache, cache["chip_flops"])
    if "skipped" in p:
        return dict(chips=n, skipped=p["skipped"], needed_mb=p["needed_mb"], **meta)
    prog: Programs = p["programs"]
    c = prog.chips

    maps = np.asarray(faults.sample_fault_maps(jax.random.key(1), n, *array, 0.1))
    chunks = [
        population.init_chunk(trainer, variables, maps[lo : lo + c], np.full(c, 1 << 30))
        for lo in range(0, n, c)
    ]
    states = [s for s, _ in chunks]
    masks = [m for _, m in chunks]

    def pop_step():
        losses = []
        for i in range(len(states)):
            states[i], loss = prog.step(states[i], masks[i], x, y)
            losses.append(loss)
        jax.block_until_ready(losses)

    step_s = _time(pop_step, steps, trials)

    # The production path: Trainer.run, many steps per call (batches gathered on device).
    def pop_run():
        for i in range(len(states)):
            args = (data.train_images, data.train_labels, jax.random.key(2), 0, steps)
            states[i] = prog.run(states[i], masks[i], *args)
        jax.block_until_ready([s.step for s in states])

    pop_s = _time(pop_run, 1, trials) / steps

    chips = [train.slice_chips(states[i // c], i % c) for i in range(loop_n)]
    chip_masks = [train.slice_chips(masks[i // c], i % c) for i in range(loop_n)]

    def loop_step():
        for i in range(loop_n):
            chips[i], loss = trainer.step(chips[i], chip_masks[i], x, y)
        loss.block_until_ready()

    loop_s = _time(loop_step, max(1, steps // 2), trials) * n / loop_n
    chips.clear()  # the loop's copies are not needed any more
    chip_masks.clear()

    def evaluate():
        accs = [
            prog.evaluate(s.variables, m, data.test_images, data.test_labels)
            for s, m in zip(states, masks, strict=True)
        ]
        jax.block_until_ready(accs)

    eval_s = _time(evaluate, 1, trials)
    step_gflops = prog.step_flops * (n // c) / pop_s / 1e9
    return dict(
        chips=n,
        population_chip_steps_per_s=round(n / pop_s, 2),
        population_single_step_calls_chip_steps_per_s=round(n / step_s, 2),
        loop_chip_steps_per_s=round(n / loop_s, 2),
        speedup=round(loop_s / pop_s, 3),
        eval_chip_evals_per_s=round(n * len(ds.test_labels) / eval_s, 1),
        compile_s=round(prog.compile_s, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        peak_device_mb=device.peak_mb(),
        planned_mb=None if p["needed"] is None else round(p["needed"] / MB, 3),
        step_gflops=round(step_gflops, 2),
        matmul_gflops=round(peak, 2),
        fraction_of_matmul_peak=round(step_gflops / peak, 4),
        chips_per_batch=c,
        loop_chips=loop_n,
        **meta,
    )


class LeNet5NNConv(nn.Module):
    """LeNet-5 as a user writes it, with Flax's ``nn.Conv`` and ``nn.max_pool`` and the
    ``(x, train)`` convention: ``models.LeNet5``'s layers, without ``models.Conv``."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        for i, features in enumerate((6, 16)):
            x = nn.relu(nn.Conv(features, (5, 5), name=f"conv{i + 1}")(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="out")(x)


def get_model(name: str, num_classes: int, width: float, batch_norm: bool) -> nn.Module:
    """A library model, or ``lenet5_nnconv`` (a user's module, through ``reduce_jax.run``'s
    calling convention; ``width`` and ``batch_norm`` do not apply to it)."""
    if name == "lenet5_nnconv":
        return LeNet5NNConv(num_classes)
    return models.get_model(name, num_classes, width, batch_norm)


def main(argv):
    del argv
    trials = TRIALS.value
    cfg = config.from_flags()
    sizes, steps = [int(c) for c in CHIPS.value], STEPS.value
    if QUICK.value:
        cfg = dataclasses.replace(cfg, dataset="digits", model="mlp", array_rows=8, array_cols=8)
        sizes, steps = [4], 2
    # The benchmark plans its chunk unless one is asked for.
    chips_per_batch = cfg.chips_per_batch if flags.FLAGS["chips_per_batch"].present else 0
    ds = load_dataset(cfg.dataset, SYNTHETIC_SIZES.value, cfg.seed, cfg.data_dir)
    model = get_model(cfg.model, ds.num_classes, cfg.model_width, not NO_BN.value)
    # One compiled program, not one per operation.
    init = jax.jit(lambda k: models.init_variables(model, k, ds.image_shape))
    variables = init(jax.random.key(0))
    on_cpu = jax.default_backend() == "cpu"
    n_mm = MATMUL_N.value or (512 if QUICK.value else 2048 if on_cpu else 8192)
    peak = matmul_gflops(n_mm, 3 if on_cpu else 10, trials)
    # On accelerators the default precision of a float32 matmul may be lower (TF32 on recent
    # NVIDIA GPUs); the full-float32 rate goes beside it.
    highest = None if on_cpu else round(matmul_gflops(n_mm, 10, trials, "highest"), 2)
    precision = getattr(jax.config, "jax_default_matmul_precision", None)
    extra = dict(
        model_name=cfg.model,
        model_width=cfg.model_width,
        chip_batching=cfg.chip_batching,
        batch_norm=bool(jax.tree.leaves(variables["batch_stats"])),
        steps=steps,
        array=cfg.array_rows,
        array_cols=cfg.array_cols,
        matmul_n=n_mm,
        matmul_dtype="float32",
        matmul_precision="default" if precision is None else str(precision),
        matmul_gflops_highest_precision=highest,
    )
    run = functools.partial(
        bench,
        chips_per_batch=chips_per_batch,
        loop_chips=LOOP_CHIPS.value,
        trials=trials,
        memory_limit=int(MEMORY_LIMIT_MB.value * MB) if MEMORY_LIMIT_MB.value > 0 else None,
        memory_fraction=MEMORY_FRACTION.value,
        cache={},
        extra=extra,
    )
    results = device.Results("population", RESULTS_DIR.value)
    failed = False
    for n in sizes:
        try:
            row = run(n, cfg, ds, model, variables, peak, steps)
        except Exception as e:  # e.g. out of device memory: report it, go on with the next N
            failed = True
            msg = (str(e).strip().splitlines() or [""])[0][:500]
            row = dict(chips=n, error=f"{type(e).__name__}: {msg}", model=model.__class__.__name__)
            row.update(dataset=ds.name, **device.environment(), **extra)
            logging.exception("N=%d failed", n)
        results(row)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    # The config's flags belong to the command, not to the module: importing it (tests,
    # other benchmarks) defines only the benchmark's own.
    config.define_flags()
    flags.adopt_module_key_flags(config)
    app.run(main)
