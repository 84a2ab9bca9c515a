"""Which fault-rate measure predicts the retraining a chip really needs.

For a validation set of chips, each chip is retrained up to the grid's largest amount and
evaluated at every amount, which gives the least grid amount that really meets the target
(``needed``). Each rate measure predicts an amount from the chip's rate through the
resilience map; the study reports, per measure, the rank correlation of the rate and of the
predicted amount with the needed one, and how many chips the prediction under-provisions
(they would miss the target and need top-ups) or over-provisions (retraining wasted).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from absl import logging
from scipy import stats

from reduce_jax.engine import population
from reduce_jax.engine.progress import ProgressStore
from reduce_jax.hardware import systolic
from reduce_jax.stages import calibration, resilience, retraining


def needed_steps(accuracy: np.ndarray, amount_steps: np.ndarray, target: float) -> np.ndarray:
    """Least grid amount meeting the target per chip: ``float64[chips]`` (inf: none does).

    Args:
      accuracy: ``float[chips, A]`` accuracy after each amount; amount_steps: ``int[A]``.
    """
    ok = np.asarray(accuracy) >= target
    steps = np.asarray(amount_steps, np.float64)
    return np.where(ok.any(1), steps[np.argmax(ok, 1)], np.inf)


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (ties averaged, ``inf`` ranks highest); None if constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    return float(np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1])


def score_measure(
    rates: np.ndarray,
    predicted: np.ndarray,
    status: np.ndarray,
    needed: np.ndarray,
    steps_per_epoch: int,
) -> dict:
    """How well one measure's predictions match the needed amounts.

    ``needed`` is a grid amount; with ``linear`` interpolation predictions fall between grid
    amounts, so ``exact`` is rare and ``under`` means below the least *grid* amount that
    met the target (the chip may still meet it in between).

    Args:
      rates: ``float[chips]`` the chips' rates in the measure.
      predicted: ``float[chips]`` predicted steps (``inf`` where not served).
      status: ``int[chips]`` from ``resilience.retraining_amount``.
      needed: ``float[chips]`` from ``needed_steps``.

    Returns:
      ``spearman_rate`` (rate vs needed), ``spearman_amount`` (predicted vs needed),
      counts ``exact``, ``under`` (predicted < needed: the chip misses the target and needs
      top-ups), ``over`` (predicted > needed), ``flagged`` (not served: above the grid or
      unrecoverable) and ``flagged_recoverable`` (flagged though a grid amount served it),
      and ``excess_epochs`` / ``shortfall_epochs`` summed over served chips whose need is
      within the grid.
    """
    served = np.asarray(status) == resilience.OK
    finite = np.isfinite(needed)
    both = served & finite
    gap = np.where(both, np.nan_to_num(predicted, posinf=0) - np.nan_to_num(needed, posinf=0), 0)
    return dict(
        spearman_rate=rank_correlation(rates, needed),
        spearman_amount=rank_correlation(predicted, needed),
        exact=int(np.sum(served & (predicted == needed))),
        under=int(np.sum(served & (predicted < needed))),
        over=int(np.sum(served & (predicted > needed))),
        flagged=int(np.sum(~served)),
        flagged_recoverable=int(np.sum(~served & finite)),
        excess_epochs=float(np.maximum(gap, 0).sum() / steps_per_epoch),
        shortfall_epochs=float(np.maximum(-gap, 0).sum() / steps_per_epoch),
    )


def reduce_vs_oracle(
    policy: retraining.Verification,
    steps_per_epoch: int,
    analysis: resilience.Analysis,
    selected: np.ndarray,
    needed: np.ndarray,
) -> dict:
    """What Reduce would spend on the study's chips against the oracle (the least evaluated
    amount each one needed), from the chips' own accuracy curves.

    Args:
      policy: the decision target, top-up increment and cap.
      steps_per_epoch: training steps in one epoch (results are in epochs).
      analysis: the chips' accuracies (``K = 1``).
      selected: ``float[n]`` the amount the map selects for each (``inf``: not served).
      needed: ``float[n]`` the oracle's amount (``inf``: no evaluated amount met the target).

    Returns:
      Over the chips both serve: ``reduce_over_oracle`` (Reduce's amounts plus the top-ups
      they would need, over the oracle's amounts; None if the oracle spends nothing),
      ``reduce_epochs``, ``oracle_epochs``, ``compared_chips``; ``reduce_missed`` (of those,
      chips still below the target after the top-up cap) and ``reduce_flagged`` (chips the
      oracle serves that the map does not).
    """
    spent, met = calibration.reduce_totals(
        analysis.accuracy[:, :, 0],
        analysis.amount_steps,
        selected,
        policy.decision_target,
        policy.topup_steps,
        policy.max_topup_steps,
    )
    oracle = np.isfinite(needed)
    both = oracle & np.isfinite(selected)
    reduce_steps, oracle_steps = float(spent[both].sum()), float(needed[both].sum())
    return dict(
        reduce_over_oracle=reduce_steps / oracle_steps if oracle_steps > 0 else None,
        reduce_epochs=reduce_steps / steps_per_epoch,
        oracle_epochs=oracle_steps / steps_per_epoch,
        compared_chips=int(both.sum()),
        reduce_missed=int((both & ~met).sum()),
        reduce_flagged=int((oracle & ~np.isfinite(selected)).sum()),
    )


def study(
    rates: dict[str, np.ndarray],
    grid_rates: dict[str, np.ndarray],
    required_steps: np.ndarray,
    needed: np.ndarray,
    interpolation: str,
    steps_per_epoch: int,
) -> dict:
    """Scores every measure on the validation chips.

    Args:
      rates: measure -> ``float[chips]`` the validation chips' rates.
      grid_rates: measure -> ``float[F]`` the grid's measured rates in that measure.
      required_steps: ``float[F]`` the resilience map in steps.
      needed: ``float[chips]`` from ``needed_steps``.

    Returns:
      ``{"measures": {measure: score_measure(...) + rates + predicted_epochs},
      "best_measure": the measure with the highest spearman_rate}``. A measure in which
      the grid's rates do not increase cannot be interpolated: its entry is
      ``{"skipped": reason, "rates": ...}``.
    """
    out = {}
    for name, r in rates.items():
        grid = np.asarray(grid_rates[name], np.float64)
        if np.any(np.diff(grid) <= 0):
            out[name] = dict(
                skipped=f"the grid's {name} rates {np.round(grid, 4).tolist()} do not increase",
                rates=np.asarray(r, np.float64).tolist(),
            )
            continue
        predicted, status = resilience.retraining_amount(
            grid_rates[name], required_steps, r, interpolation
        )
        predicted = np.asarray(predicted, np.float64)
        score = score_measure(r, predicted, np.asarray(status), needed, steps_per_epoch)
        score["rates"] = np.asarray(r, np.float64).tolist()
        score["predicted_epochs"] = [
            float(p / steps_per_epoch) if np.isfinite(p) else None for p in predicted
        ]
        out[name] = score
    ranked = [n for n in out if out[n].get("spearman_rate") is not None]
    best = max(ranked, key=lambda n: out[n]["spearman_rate"]) if ranked else None
    return dict(measures=out, best_measure=best)


class PredictorStudy(NamedTuple):
    """Which rate measure predicts the retraining a chip needs, on validation chips.

    Attributes:
      requested_rates: ``float64[n]`` the (mean) PE rates the chips were sampled at.
      analysis: the chips' accuracy after every grid amount (``Analysis`` with ``K = 1``:
        ``accuracy float64[n, A, 1]``, ``diverged bool[n, 1]``).
      needed_steps: ``float64[n]`` least grid amount that met the target (``inf``: none).
      scores: ``study``'s result: per measure scores, and the best measure.
    """

    requested_rates: np.ndarray
    analysis: resilience.Analysis
    needed_steps: np.ndarray
    scores: dict


def run_study(
    ctx: population.Context,
    policy: retraining.Verification,
    fault_maps: np.ndarray,
    requested_rates: np.ndarray,
    rmap: resilience.ResilienceMap,
    key: jax.Array,
    store: ProgressStore | None = None,
) -> PredictorStudy:
    """Retrains validation chips over the amount grid and scores every rate measure.

    Args:
      ctx: the engine's context.
      policy: the decision target (a chip's need), top-up increment and cap.
      fault_maps: ``bool[n, R, C]`` the validation chips.
      requested_rates: ``float[n]`` the rates they were sampled at.
      rmap: the resilience map (its measures' weights and grid rates, required steps, and
        its interpolation, as for the population).
      key: key of the chips' batch order.
      store: saves finished chunks under ``predictor`` (resume).
    """
    analysis = resilience.analyze(
        ctx, fault_maps[:, None], rmap.amount_epochs, key, store, "predictor", with_test=True
    )
    needed = needed_steps(analysis.accuracy[:, :, 0], analysis.amount_steps, policy.decision_target)
    scores = study(
        systolic.chip_rates(rmap.weights, fault_maps),
        rmap.grid_rates,
        rmap.required_steps,
        needed,
        rmap.interpolation,
        ctx.steps_per_epoch,
    )
    rates = systolic.chip_rates(rmap.weights, fault_maps)[rmap.rate_measure]
    selected, _ = resilience.retraining_amount(
        rmap.measured_rates, rmap.required_steps, rates, rmap.interpolation
    )
    scores.update(
        reduce_vs_oracle(
            policy, ctx.steps_per_epoch, analysis, np.asarray(selected, np.float64), needed
        )
    )
    logging.info(
        "predictor study: rank correlation of rate and needed retraining: %s",
        ", ".join(
            f"{m} {v['spearman_rate']:.3f}" if v.get("spearman_rate") is not None else f"{m} -"
            for m, v in scores["measures"].items()
        ),
    )
    return PredictorStudy(np.asarray(requested_rates, np.float64), analysis, needed, scores)
