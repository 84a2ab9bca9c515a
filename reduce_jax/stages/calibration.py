"""Choosing how the resilience map is built and read, by what Reduce would really spend.

A chip's cost under Reduce is the amount the map selects plus the top-ups it then needs.
The ``min`` statistic over the ``K`` analysis maps and the ``conservative`` interpolation
rarely under-provision, but they over-provision: most chips need less than the worst of
``K`` maps at the next grid rate up. A looser statistic or ``linear`` interpolation selects
less, and the verification tops up the chips it under-provisions.

``choose`` scores every candidate (statistic x interpolation) by leave-one-rate-out
cross-validation on the analysis: the map is built without grid rate ``f``, every analysis
chip of rate ``f`` is assigned an amount from it at its own measured rate, and its own
accuracy curve says which top-ups it would then need (``reduce_totals``). Rates the map
cannot be interpolated at without ``f`` (the first and the last) are not held out. The
candidate that misses the target on the fewest held-out chips (a chip the map flags though
an amount served it counts as missed) wins, and among those the one with the least total;
ties go to the stricter candidate (``min`` and ``conservative`` first).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from reduce_jax.stages import resilience, retraining

# From the strictest to the loosest: with top-ups at a fine increment, a statistic above the
# median (an amount that only some of the K maps of a rate had met) can cost least in all.
STATISTICS = ("min", "quantile:0.25", "quantile:0.5", "mean", "quantile:0.75")
REFERENCE = ("min", "conservative")


def reduce_totals(
    accuracy: np.ndarray,
    amount_steps: np.ndarray,
    selected: np.ndarray,
    target: float,
    increment: int,
    cap: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps Reduce would spend on each chip (its amount plus the top-ups it needs), read
    off the chip's own accuracy curve.

    A top-up round adds ``increment`` steps (at most ``cap`` in all); the chip stops at the
    first amount that meets the target. The accuracy after ``x`` steps is read at the first
    evaluated amount at or above ``x`` (the last one beyond the curve).

    Args:
      accuracy: ``float[n, A]`` each chip's accuracy after each evaluated amount.
      amount_steps: ``int[A]`` the evaluated amounts, increasing.
      selected: ``float[n]`` the amount each chip is given (``inf``: not retrained).
      target: the accuracy target.
      increment: steps of a top-up round (0: no top-ups).
      cap: most top-up steps per chip.

    Returns:
      ``(total float64[n], met bool[n])``; ``total`` is 0 and ``met`` False where the chip
      is not retrained; a chip that misses the target after the cap spends ``selected + cap``.
    """
    acc = np.asarray(accuracy, np.float64)
    steps = np.asarray(amount_steps)
    served = np.isfinite(selected)
    base = np.where(served, selected, 0.0)
    rounds = int(np.ceil(cap / increment)) if increment > 0 and cap > 0 else 0
    extra = np.minimum(np.arange(rounds + 1) * max(increment, 0), cap)  # [R]
    amounts = base[:, None] + extra[None, :]  # [n, R]
    j = np.minimum(np.searchsorted(steps, amounts - 1e-9), len(steps) - 1)
    ok = np.take_along_axis(acc, j, 1) >= target
    first = np.argmax(ok, 1)
    met = ok.any(1) & served
    total = np.where(met, amounts[np.arange(len(base)), first], base + extra[-1])
    return np.where(served, total, 0.0), met


class Choice(NamedTuple):
    """The map's statistic and interpolation, and every candidate's cross-validated score.

    Attributes:
      statistic: the chosen statistic; interpolation: the chosen interpolation.
      scores: one dict per candidate: ``statistic``, ``interpolation``, ``total_epochs``
        (amounts plus top-ups over the held-out chips), ``missed`` (held-out chips that
        miss the target, or that the map does not serve though an amount met it).
      chips: held-out chips scored per candidate.
    """

    statistic: str
    interpolation: str
    scores: list[dict]
    chips: int


def _held_out(
    policy: retraining.Verification,
    analysis: resilience.Analysis,
    rates: np.ndarray,
    grid: np.ndarray,
    statistic: str,
    interpolation: str,
) -> tuple[float, int]:
    """Total steps and misses of one candidate over the held-out chips of every inner rate.

    Args:
      rates: ``float[F, K]`` the analysis chips' rates; grid: ``float[F]`` the grid's.
    """
    steps = analysis.amount_steps.astype(np.float64)
    total, missed = 0.0, 0
    for f in range(1, len(grid) - 1):
        keep = np.arange(len(grid)) != f
        required, _ = resilience.required_amounts(
            analysis.accuracy[keep], steps, policy.decision_target, statistic
        )
        selected, _ = resilience.retraining_amount(grid[keep], required, rates[f], interpolation)
        curves = analysis.accuracy[f].T  # [K, A]
        spent, met = reduce_totals(
            curves,
            analysis.amount_steps,
            np.asarray(selected, np.float64),
            policy.decision_target,
            policy.topup_steps,
            policy.max_topup_steps,
        )
        total += float(spent.sum())
        missed += int((~met).sum())
    return total, missed


def choose(
    policy: retraining.Verification,
    steps_per_epoch: int,
    analysis: resilience.Analysis,
    rates: np.ndarray,
    grid: np.ndarray,
    statistics: tuple[str, ...] = STATISTICS,
    interpolations: tuple[str, ...] = resilience.INTERPOLATIONS,
) -> Choice:
    """The candidate with the fewest cross-validated misses, then the least total (see the
    module docstring); ``REFERENCE`` is always scored.

    Args:
      policy: the decision target, top-up increment and cap.
      steps_per_epoch: training steps in one epoch (totals are reported in epochs).
      analysis: the resilience analysis.
      rates: ``float[F, K]`` its chips' rates in the map's measure.
      grid: ``float[F]`` the grid's measured rates in that measure.
      statistics, interpolations: the candidates (the reference is always scored).
    """
    candidates = [(s, i) for s in statistics for i in interpolations]
    if REFERENCE not in candidates:
        candidates.insert(0, REFERENCE)
    scores = []
    for s, i in candidates:
        total, missed = _held_out(policy, analysis, rates, grid, s, i)
        scores.append(
            dict(
                statistic=s,
                interpolation=i,
                total_epochs=total / steps_per_epoch,
                missed=missed,
            )
        )
    # Fewest misses first: a candidate that flags chips (not served, so they cost nothing)
    # must not look cheap; then the least total; ties go to the earlier (stricter) candidate.
    best = min(scores, key=lambda c: (c["missed"], c["total_epochs"]))
    chips = max(len(grid) - 2, 0) * analysis.accuracy.shape[2]
    return Choice(best["statistic"], best["interpolation"], scores, chips)
