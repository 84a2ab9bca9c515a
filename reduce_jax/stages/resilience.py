"""Resilience analysis, the resilience map, and per-chip retraining amounts.

1. ``analyze``: accuracy of ``K`` sampled chips at every fault rate of a grid ``F`` after
   every retraining amount of a grid ``A``. Amounts nest, so each chip is retrained once, up
   to ``max(A)``, and evaluated on the way.
2. ``resilience_map``: per grid rate, the least amount whose statistic over the ``K`` chips
   meets the accuracy target (``inf`` = unrecoverable), non-decreasing in the rate.
3. ``assign``: every chip's amount from its fault rate (``retraining_amount``, vectorised
   and jit-able).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from reduce_jax import sharding
from reduce_jax.engine import population, train
from reduce_jax.engine.progress import Meter, ProgressStore
from reduce_jax.hardware import systolic

STATISTICS_HELP = "min, mean, or quantile:q with q in [0, 1]"
AUTO = "auto"  # --statistic / --interpolation chosen by ``calibration.choose``
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


def amount_axis(
    grid_epochs, eval_every: float, steps_per_epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """The amounts the analysis evaluates at: the grid's, and every multiple of
    ``eval_every`` epochs up to the largest.

    Amounts nest (each chip is retrained once, up to the largest), so a denser axis costs
    evaluations only, and the map can select amounts between the grid's points.

    Args:
      grid_epochs: ``float[A0]`` the amount grid (``--retrain_epochs``), increasing.
      eval_every: spacing of the extra amounts in epochs (0: the grid only).
      steps_per_epoch: to express amounts in steps.

    Returns:
      ``(epochs float64[A], steps int64[A])``, increasing, one entry per distinct number of
      steps (the smallest amount in epochs that gives it).
    """
    epochs = np.asarray(grid_epochs, np.float64)
    if eval_every > 0:
        count = int(np.floor(epochs.max() / eval_every + 1e-9))
        epochs = np.union1d(epochs, np.round(np.arange(1, count + 1) * eval_every, 12))
    steps, first = np.unique(train.epochs_to_steps(epochs, steps_per_epoch), return_index=True)
    return epochs[first], steps.astype(np.int64)


class Analysis(NamedTuple):
    """Result of the resilience analysis.

    Attributes:
      accuracy: ``float64[F, A, K]`` validation accuracy of sample ``k`` of grid rate ``f``
        after amount ``a`` (0 from the amount at which the chip diverged on).
      diverged: ``bool[F, K]`` the chip's training became non-finite.
      amount_epochs: ``float64[A]`` the amounts evaluated at (``amount_axis``), in epochs.
      amount_steps: ``int64[A]`` the same in steps.
      test_accuracy: ``float64[F, A, K]`` the same on the test set (reported only), or None
        where it was not measured.
    """

    accuracy: np.ndarray
    diverged: np.ndarray
    amount_epochs: np.ndarray
    amount_steps: np.ndarray
    test_accuracy: np.ndarray | None = None


def analyze(
    ctx: population.Context,
    fault_maps: np.ndarray,
    amount_epochs: np.ndarray,
    key: jax.Array,
    store: ProgressStore | None = None,
    stage: str = "analysis",
    with_test: bool = False,
) -> Analysis:
    """Accuracy of sampled chips at every (fault rate, retraining amount) of the grid.

    All ``F * K`` chips form one population (``population.drive``); every chip is retrained
    once up to ``max(amount_steps)`` and evaluated at each amount.

    Args:
      ctx: the run's context.
      fault_maps: ``bool[F, K, R, C]``.
      amount_epochs: ``float[A]`` increasing retraining amounts in epochs (0 = no
        retraining), one per distinct number of steps (``amount_axis``).
      key: key of the batch order.
      store: saves finished chunks under ``stage`` (resume).
      stage: the stage's name (``analysis``; ``predictor`` for the predictor study).
      with_test: also evaluate on the test set (for reporting).

    Returns:
      ``Analysis``.
    """
    num_f, k = fault_maps.shape[:2]
    epochs = np.asarray(amount_epochs, np.float64)
    steps = train.epochs_to_steps(epochs, ctx.steps_per_epoch)
    if np.any(np.diff(steps) <= 0) or steps.min() < 0:
        raise ValueError(f"amounts must be non-negative and increasing in steps, got {steps}")
    flat_maps = np.asarray(fault_maps).reshape(num_f * k, *fault_maps.shape[2:])
    meter = Meter(f"{stage} training", len(flat_maps) * int(steps.max()))

    def compute(ids: np.ndarray, chunk: _Chips) -> _Measured:
        maps = chunk.maps
        real = np.arange(len(maps)) < len(ids)
        budgets = np.where(real, steps.max(), 0)
        states, chips = population.init_chunk(ctx.trainer, ctx.variables, maps, budgets)
        splits = ("val", "test") if with_test else ("val",)
        chunk_acc, prev = {split: [] for split in splits}, 0
        for s in steps:
            states = population.run_phase(
                ctx.trainer,
                states,
                chips,
                ctx.data,
                key,
                np.where(real, s - prev, 0),
                on_progress=meter,
                start=prev,
            )
            prev = int(s)
            # A diverged chip is frozen at its last finite state; it never counts as
            # recovered from the amount at which it diverged on.
            div_now = sharding.to_host(states.diverged)
            for split in splits:
                acc_now = population.evaluate(ctx.trainer, states, chips, ctx.data, split)
                chunk_acc[split].append(np.where(div_now, 0.0, acc_now))
        for chip in ids[div_now[: len(ids)]]:
            logging.warning(
                "%s chip %d: loss or weights became non-finite; its accuracy counts as 0 "
                "from then on",
                stage,
                chip,
            )
        return _Measured(
            diverged=div_now,
            val=np.stack(chunk_acc["val"], 1),
            test=np.stack(chunk_acc["test"], 1) if with_test else None,
        )

    size = population.chunk_size(len(flat_maps), ctx.chips_per_batch)
    out = population.drive(_Chips(flat_maps), compute, _Measured, size, store=store, stage=stage)
    by_rate = lambda acc: acc.reshape(num_f, k, -1).transpose(0, 2, 1)  # noqa: E731
    return Analysis(
        accuracy=by_rate(out.val),
        diverged=out.diverged.reshape(num_f, k),
        amount_epochs=epochs,
        amount_steps=steps,
        test_accuracy=by_rate(out.test) if with_test else None,
    )


class _Chips(NamedTuple):
    """The analysis' chips, as ``population.drive`` chunks them: ``maps bool[n, R, C]``."""

    maps: np.ndarray


class _Measured(NamedTuple):
    """What the analysis measures on chips ``[n]``: ``diverged bool[n]``, and the accuracy
    ``float64[n, A]`` at every amount on the validation (``val``) and test (``test``, None
    where not measured) sets."""

    diverged: np.ndarray
    val: np.ndarray
    test: np.ndarray | None


class ResilienceMap(NamedTuple):
    """The least retraining that meets the target at every grid fault rate.

    Attributes:
      weights: measure -> ``float64[R, C]`` per-PE weights of every rate measure
        (``systolic.pe_weights`` of the trained baseline): a map's rate is their sum over
        its faulty PEs.
      grid_rates: measure -> ``float64[F]`` the grid points' measured rates (mean over
        their ``K`` maps) in every rate measure.
      rate_measure: the measure the map is read in.
      required_epochs: ``float64[F]`` least amount (``inf``: unrecoverable), non-decreasing.
      required_steps: ``float64[F]`` the same in steps (``inf``: unrecoverable).
      statistic_accuracy: ``float64[F, A]`` the statistic over the ``K`` maps.
      amount_epochs: ``float64[A]`` the amounts the analysis evaluated at (epochs).
      amount_steps: ``int64[A]`` the same in steps.
      statistic: the statistic over the ``K`` maps it was built with.
      interpolation: how a chip's amount is read off it (``INTERPOLATIONS``).
    """

    weights: dict[str, np.ndarray]
    grid_rates: dict[str, np.ndarray]
    rate_measure: str
    required_epochs: np.ndarray
    required_steps: np.ndarray
    statistic_accuracy: np.ndarray
    amount_epochs: np.ndarray
    amount_steps: np.ndarray
    statistic: str = "min"
    interpolation: str = "conservative"

    @property
    def measured_rates(self) -> np.ndarray:
        """``float64[F]`` the grid's rates in the map's own measure."""
        return self.grid_rates[self.rate_measure]


def resilience_map(
    analysis: Analysis,
    fault_maps: np.ndarray,
    weights: dict[str, np.ndarray],
    target: float,
    statistic: str,
    rate_measure: str,
    steps_per_epoch: int,
    interpolation: str = "conservative",
) -> ResilienceMap:
    """The resilience map of an analysis under the target (``required_amounts``).

    Args:
      analysis: from ``analyze``; fault_maps: its maps ``bool[F, K, R, C]``.
      weights: measure -> ``float[R, C]`` (``systolic.measure_weights``).
      target, statistic: as in ``required_amounts``.
      rate_measure: the measure the map is read in.
      steps_per_epoch: to express the amounts in steps.
      interpolation: how chips' amounts are read off the map.
    """
    required, stat = required_amounts(analysis.accuracy, analysis.amount_epochs, target, statistic)
    finite = np.isfinite(required)
    steps = train.epochs_to_steps(np.where(finite, required, 0), steps_per_epoch)
    return ResilienceMap(
        weights=weights,
        grid_rates=systolic.grid_rates(weights, fault_maps),
        rate_measure=rate_measure,
        required_epochs=required,
        required_steps=np.where(finite, steps, np.inf),
        statistic_accuracy=stat,
        amount_epochs=analysis.amount_epochs,
        amount_steps=analysis.amount_steps,
        statistic=statistic,
        interpolation=interpolation,
    )


def required_amounts(
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


class Assignment(NamedTuple):
    """Every chip's retraining amount, read off the resilience map.

    Attributes:
      rates: measure -> ``float64[chips]`` every chip's rate in every measure.
      steps: ``float64[chips]`` the selected steps (``inf`` unless ``status == OK``).
      status: ``int32[chips]`` ``OK``, ``ABOVE_GRID`` or ``UNRECOVERABLE``.
    """

    rates: dict[str, np.ndarray]
    steps: np.ndarray
    status: np.ndarray

    @property
    def ok(self) -> np.ndarray:
        """``bool[chips]`` chips the map serves (they are retrained)."""
        return self.status == OK

    @property
    def budgets(self) -> np.ndarray:
        """``int64[chips]`` selected steps, 0 where the chip is not retrained."""
        return np.where(self.ok, self.steps, 0).astype(np.int64)


def assign(rmap: ResilienceMap, fault_maps: np.ndarray) -> Assignment:
    """Every chip's amount from its rate in the map's measure (``retraining_amount``, with
    the map's interpolation).

    Args:
      rmap: the resilience map.
      fault_maps: ``bool[chips, R, C]`` the chips' maps.
    """
    rates = systolic.chip_rates(rmap.weights, fault_maps)
    steps, status = retraining_amount(
        rmap.measured_rates, rmap.required_steps, rates[rmap.rate_measure], rmap.interpolation
    )
    return Assignment(rates=rates, steps=np.asarray(steps), status=np.asarray(status))


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
