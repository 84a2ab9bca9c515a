"""A ResNet-style downsampling block over a population of chips: prints one JSON object per
population size and implementation.

  python -m benchmarks.strided_block                  # N in {8, 32}
  python -m benchmarks.strided_block --chips=8 --trials=5

The block is a 3x3 stride-2 SAME convolution plus a 1x1 stride-2 projection shortcut, both
``--cin`` -> ``--cout`` channels on ``--size`` x ``--size`` inputs of ``--batch_size``
images; every chip has its own input and kernels (a block inside a ResNet). One timed call
runs ``--steps`` steps of forward, backward (input and kernel gradients) and an SGD update of
the kernels in a ``fori_loop``, as ``Trainer.run`` runs training steps, vmapped over the N
chips. Implementations:

* ``conv``: ``reduce_jax.nets.conv.conv2d`` with strides (its batching rule and gradient);
* ``conv_subsampled``: the stride-1 ``conv.conv2d`` subsampled (what a strided convolution
  cost before it had its own path);
* ``nn_conv``: ``flax.linen.Conv`` with strides, vmapped (a grouped convolution);
* ``nn_conv_alone``: ``flax.linen.Conv`` for one chip (vmapped over a population of one),
  what each chip of a Python loop over chips would cost.

Each line holds ``ms_per_chip_step`` (the best of ``--trials`` calls / steps / N),
``cpu_ms_per_chip_step`` (the same with the process's CPU time, the sum over its threads,
which other processes on a shared machine disturb less than the wall-clock time) and
``compile_s``, with the backend and JAX version.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import device
from reduce_jax.nets import conv

CHIPS = flags.DEFINE_list("chips", ["8", "32"], "Population sizes N.")
IMPLS = flags.DEFINE_list(
    "impls",
    ["conv", "conv_subsampled", "nn_conv", "nn_conv_alone"],
    "Implementations to time.",
)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Images per step.")
SIZE = flags.DEFINE_integer("size", 32, "Input height and width.")
CIN = flags.DEFINE_integer("cin", 16, "Input channels.")
COUT = flags.DEFINE_integer("cout", 32, "Output channels.")
STEPS = flags.DEFINE_integer("steps", 3, "Steps per timed call.")
TRIALS = flags.DEFINE_integer("trials", 3, "Timings are the best of this many calls.")
RESULTS_DIR = device.define_results_flag()

STRIDES = (2, 2)


def _conv_block(x, w3, w1):
    return conv.conv2d(x, w3, "SAME", STRIDES) + conv.conv2d(x, w1, "SAME", STRIDES)


def _subsampled_block(x, w3, w1):
    """The stride-1 convolutions (the padding of the strided ones), subsampled."""
    out = 0.0
    for w in (w3, w1):
        kh, kw = w.shape[:2]
        pads = conv.pads_of("SAME", kh, kw, STRIDES, x.shape[1:3])
        out = out + conv._conv(x, w, conv.Window(kh, kw, pads))[:, ::2, ::2]
    return out


def _nn_conv_block(x, w3, w1):
    c3 = nn.Conv(w3.shape[-1], (3, 3), STRIDES, "SAME", use_bias=False)
    c1 = nn.Conv(w1.shape[-1], (1, 1), STRIDES, "SAME", use_bias=False)
    return c3.apply({"params": {"kernel": w3}}, x) + c1.apply({"params": {"kernel": w1}}, x)


BLOCKS = {
    "conv": _conv_block,
    "conv_subsampled": _subsampled_block,
    "nn_conv": _nn_conv_block,
    "nn_conv_alone": _nn_conv_block,
}


def _train_steps(block, steps: int):
    """``steps`` SGD steps of every chip's kernels on its own input, in a ``fori_loop``;
    returns the kernels and the summed input gradient (so that it is computed)."""

    def loss(x, w3, w1, probe):
        return jnp.sum(block(x, w3, w1) * probe)

    grads = jax.vmap(jax.grad(loss, (0, 1, 2)))

    def body(_, carry):
        w3, w1, gx_sum, x, probe = carry
        gx, g3, g1 = grads(x, w3, w1, probe)
        return w3 - 1e-3 * g3, w1 - 1e-3 * g1, gx_sum + jnp.sum(gx), x, probe

    def run(w3, w1, x, probe):
        w3, w1, gx_sum, _, _ = jax.lax.fori_loop(0, steps, body, (w3, w1, 0.0, x, probe))
        return w3, w1, gx_sum

    return jax.jit(run)


def _measure(name: str, n: int) -> dict:
    n = 1 if name == "nn_conv_alone" else n
    keys = jax.random.split(jax.random.key(0), 4)
    b, s, cin, cout = BATCH_SIZE.value, SIZE.value, CIN.value, COUT.value
    x = jax.random.normal(keys[0], (n, b, s, s, cin))
    w3 = jax.random.normal(keys[1], (n, 3, 3, cin, cout)) * 0.1
    w1 = jax.random.normal(keys[2], (n, 1, 1, cin, cout)) * 0.1
    probe = jax.random.normal(keys[3], (n, b, -(-s // 2), -(-s // 2), cout))
    run = _train_steps(BLOCKS[name], STEPS.value)
    start = time.perf_counter()
    compiled = run.lower(w3, w1, x, probe).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(w3, w1, x, probe))
    best, best_cpu = float("inf"), float("inf")
    for _ in range(TRIALS.value):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(w3, w1, x, probe))
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    per_chip_step = lambda t: round(t / STEPS.value / n * 1e3, 2)
    return {
        "impl": name,
        "chips": n,
        "ms_per_chip_step": per_chip_step(best),
        "cpu_ms_per_chip_step": per_chip_step(best_cpu),
        "compile_s": round(compile_s, 2),
        "block": f"{b}x{s}x{s}x{cin} -> 3x3/2 + 1x1/2 -> {cout}",
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }


def main(argv):
    del argv
    results = device.Results("strided_block", RESULTS_DIR.value)
    for n in map(int, CHIPS.value):
        for name in IMPLS.value:
            results(_measure(name, n))


if __name__ == "__main__":
    app.run(main)
