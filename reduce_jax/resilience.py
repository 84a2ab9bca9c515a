"""Resilience analysis, the resilience map, and per-chip retraining amounts.

1. ``analyze``: accuracy of ``K`` sampled chips at every fault rate of a grid ``F`` after
   every retraining amount of a grid ``A``. Amounts nest, so each chip is retrained once, up
   to ``max(A)``, and evaluated on the way.
2. ``resilience_map``: per grid rate, the least amount whose statistic over the ``K`` chips
   meets the accuracy target (``inf`` = unrecoverable), non-decreasing in the rate.
3. ``retraining_amount``: every chip's amount from its fault rate, vectorised and jit-able.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from reduce_jax import population, sharding, train

STATISTICS_HELP = "min, mean, or quantile:q with q in [0, 1]"
INTERPOLATIONS = ("conservative", "linear")

# Status of a chip's amount.
OK, ABOVE_GRID, UNRECOVERABLE = 0, 1, 2
STATUS_NAMES = {OK: "ok", ABOVE_GRID: "above_grid", UNRECOVERABLE: "unrecoverable"}


def parse_statistic(statistic: str) -> Callable[[np.ndarray], np.ndarray]:
    """``min`` | ``mean`` | ``quantile:q`` -> a reduction over the last axis."""
    if statistic == "min":
        return lambda x: np.min(x, axis=-1)
    if statistic == "mean":
        return lambda x: np.mean(x, axis=-1)
    if statistic.startswith("quantile:"):
        try:
            q = float(statistic.split(":", 1)[1])
        except ValueError:
            q = -1.0
        if 0.0 <= q <= 1.0:
            return lambda x: np.quantile(x, q, axis=-1)
    raise ValueError(f"--statistic={statistic!r} is not one of: {STATISTICS_HELP}")


def analyze(
    trainer: train.Trainer,
    params,
    data: population.DeviceData,
    fault_maps: np.ndarray,
    amount_steps: np.ndarray,
    phase_key: jax.Array,
    chips_per_batch: int,
    done: dict[int, dict] | None = None,
    on_chunk: Callable[[int, dict], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of sampled chips at every (fault rate, retraining amount) of the grid.

    All ``F * K`` chips form one population, processed in chunks of ``chips_per_batch``; every
    chip is retrained once up to ``max(amount_steps)`` and evaluated at each amount.

    Args:
      trainer: from ``train.make_trainer``.
      params: the fault-free baseline.
      data: train and test sets on the device.
      fault_maps: ``bool[F, K, R, C]``.
      amount_steps: ``int[A]`` increasing retraining amounts in steps (0 = no retraining).
      phase_key: key of the batch order.
      chips_per_batch: chunk size.
      done: results of chunks already finished (from ``on_chunk``), to resume.
      on_chunk: called with ``(chunk_index, result)`` after each chunk (for checkpointing).
      on_progress: called with chip-steps completed.

    Returns:
      ``(accuracy float64[F, A, K], diverged bool[F, K])``.
    """
    num_f, k = fault_maps.shape[:2]
    steps = np.asarray(amount_steps, np.int64)
    if np.any(np.diff(steps) < 0) or steps.min() < 0:
        raise ValueError(f"amount_steps must be non-negative and sorted, got {steps}")
    flat_maps = np.asarray(fault_maps).reshape(num_f * k, *fault_maps.shape[2:])
    n = len(flat_maps)
    size = population.chunk_size(n, chips_per_batch)

    def compute(ids: np.ndarray) -> dict[str, list]:
        m = len(ids)
        maps, budgets = population.pad_chunk(
            flat_maps[ids], np.full(m, steps.max(), np.int64), size
        )
        states, masks = population.init_chunk(trainer, params, maps, budgets)
        chunk_acc, prev = [], 0
        for s in steps:
            states = population.run_phase(
                trainer,
                states,
                masks,
                data,
                phase_key,
                np.where(np.arange(size) < m, s - prev, 0),
                on_progress=on_progress,
                start=prev,
            )
            prev = int(s)
            acc_now = population.evaluate(trainer, states, masks, data)[:m]
            # A diverged chip is frozen at its last finite state; it never counts as
            # recovered from the amount at which it diverged on.
            div_now = sharding.to_host(states.diverged)[:m]
            chunk_acc.append(np.where(div_now, 0.0, acc_now))
        for chip in ids[div_now]:
            logging.warning(
                "analysis chip %d: loss or weights became non-finite; its "
                "accuracy counts as 0 from then on",
                chip,
            )
        return dict(accuracy=np.stack(chunk_acc, 1).tolist(), diverged=div_now.tolist())

    out = population.map_chunks(np.arange(n), size, done, compute, on_chunk)
    acc, diverged = out["accuracy"], out["diverged"]
    return acc.reshape(num_f, k, -1).transpose(0, 2, 1), diverged.reshape(num_f, k)


def resilience_map(
    accuracy: np.ndarray, retrain_epochs: np.ndarray, target: float, statistic: str = "min"
) -> tuple[np.ndarray, np.ndarray]:
    """Least retraining that meets the target at every grid fault rate.

    Args:
      accuracy: ``float[F, A, K]`` from ``analyze`` (rates and amounts increasing).
      retrain_epochs: ``float[A]`` the amounts, increasing.
      target: accuracy constraint (absolute).
      statistic: over the ``K`` chips: ``min``, ``mean`` or ``quantile:q``.

    Returns:
      ``(required float64[F], stat float64[F, A])``: ``required[f]`` is the smallest amount
      ``a`` with ``stat[f, a] >= target`` (``inf`` if none), made non-decreasing in ``f``.
    """
    stat = parse_statistic(statistic)(np.asarray(accuracy, np.float64))
    amounts = np.asarray(retrain_epochs, np.float64)
    ok = stat >= target
    first = np.where(ok.any(1), amounts[np.argmax(ok, 1)], np.inf)
    return np.maximum.accumulate(first), stat


def retraining_amount(
    map_rates: jax.Array,
    required_steps: jax.Array,
    chip_rates: jax.Array,
    mode: str = "conservative",
    tolerance: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
    """Every chip's retraining amount from its fault rate, by interpolation on the map.

    Args:
      map_rates: ``float[F]`` increasing grid fault rates.
      required_steps: ``float[F]`` the map in steps, non-decreasing (``inf`` unrecoverable).
      chip_rates: ``float[chips]`` chips' fault rates (same measure as ``map_rates``).
      mode: ``conservative`` (the amount at the smallest grid rate >= the chip's rate) or
        ``linear`` (linear between neighbouring grid rates, rounded up to a whole step).
      tolerance: rates within this of a grid rate count as on it.

    Returns:
      ``(steps float32[chips], status int32[chips])``. ``status`` is ``OK``, ``ABOVE_GRID``
      (rate above the largest grid rate) or ``UNRECOVERABLE``; ``steps`` is ``inf`` unless OK.
      Never clipped to the grid.
    """
    if mode not in INTERPOLATIONS:
        raise ValueError(f"--interpolation={mode!r}; allowed: {', '.join(INTERPOLATIONS)}")
    grid = jnp.asarray(map_rates, jnp.float32)
    req = jnp.asarray(required_steps, jnp.float32)
    rates = jnp.asarray(chip_rates, jnp.float32)
    num = grid.shape[0]
    hi = jnp.searchsorted(grid, rates - tolerance, side="left")  # smallest grid >= rate
    above = hi >= num
    hi_c = jnp.clip(hi, 0, num - 1)
    conservative = req[hi_c]
    if mode == "conservative":
        steps = conservative
    else:
        lo_c = jnp.clip(hi_c - 1, 0, num - 1)
        g_lo, g_hi = grid[lo_c], grid[hi_c]
        frac = jnp.where(g_hi > g_lo, (rates - g_lo) / jnp.where(g_hi > g_lo, g_hi - g_lo, 1), 1.0)
        frac = jnp.clip(frac, 0.0, 1.0)
        r_lo, r_hi = req[lo_c], req[hi_c]
        finite = jnp.isfinite(r_lo) & jnp.isfinite(r_hi)
        lin = jnp.where(finite, r_lo + frac * (jnp.where(finite, r_hi - r_lo, 0.0)), jnp.inf)
        # On (or below) a grid point the amount is the grid's own.
        steps = jnp.where(frac >= 1.0, conservative, jnp.ceil(lin - 1e-4))
        steps = jnp.minimum(steps, conservative)
    unrecoverable = ~above & ~jnp.isfinite(steps)
    status = jnp.where(above, ABOVE_GRID, jnp.where(unrecoverable, UNRECOVERABLE, OK))
    steps = jnp.where(status == OK, steps, jnp.inf)
    return steps.astype(jnp.float32), status.astype(jnp.int32)
