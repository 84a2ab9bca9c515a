"""The online map: a resilience map learned from the chips already retrained, no analysis.

Chips are retrained in arrival order, in rounds of ``batch`` chips. Every finished chip adds
an observation: its rate and the steps it needed (the steps at which its verification first
met the target; ``inf`` when it did not within its cap). From the observations so far the
map is fitted, non-decreasing in the rate like the resilience map (``plan``). A chip of the
next round

* starts at the map's *lower* estimate for its rate: the rates are pooled where the
  ``quantile`` of the needs would decrease (isotonic regression), each pool gives a lower
  confidence bound of its quantile (an order statistic, so a pool of a few chips gives 0),
  and the bounds are made non-decreasing. The chip is trained to its start without
  evaluation, since the map says the target cannot be met before;
* is then verified and topped up like the adaptive policy;
* stops at a cap of its own once enough chips at or below its rate met the target: the
  most any of them needed plus the top-up allowance (as Reduce gives up on a chip after its
  amount and ``--max_topup_epochs``), else at the adaptive policy's cap;
* is not served where the map says the target cannot be reached: the lower estimate at its
  rate is unreached and at least ``min_evidence`` chips at or below its rate missed.

The first round, with no observations, is the adaptive policy. A chip that met the target
at its first verification only shows that it needed at most its start; it is recorded at
its start (a lower bound of a quantile does not rise above the start by such records).
A saved map's observations (``MapBundle.observations``) can seed the fit, and the run
returns them with its own added.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from scipy import stats

from reduce_jax.engine import population
from reduce_jax.engine.progress import ProgressStore
from reduce_jax.stages import policies, retraining, sequential


class Observations(NamedTuple):
    """(rate, need) pairs: ``rates float64[n]``, ``needed_steps float64[n]`` (``inf``: not
    reached within the cap)."""

    rates: np.ndarray
    needed_steps: np.ndarray

    @classmethod
    def empty(cls) -> Observations:
        return cls(np.zeros(0), np.zeros(0))

    def add(self, rates, needed_steps) -> Observations:
        return Observations(
            np.concatenate([self.rates, np.asarray(rates, np.float64).ravel()]),
            np.concatenate([self.needed_steps, np.asarray(needed_steps, np.float64).ravel()]),
        )


class OnlineSettings(NamedTuple):
    """The online map's settings.

    Attributes:
      batch: chips per round (the map is refitted between rounds).
      quantile: the quantile of the needs a chip's start is a lower bound of, in (0, 1).
      confidence: the confidence of that lower bound, in (0, 1).
      min_evidence: chips at or below a rate that missed the target before chips at that
        rate are not served (0: every chip is served).
      margin_steps: a chip's own cap is the most any chip at or below its rate needed,
        plus this (the top-up allowance, as Reduce's); 0: no cap of its own.
      cap_evidence: chips that met the target, at or below a chip's rate, before the chip
        gets a cap of its own.
    """

    batch: int = 8
    quantile: float = 0.25
    confidence: float = 0.9
    min_evidence: int = 3
    margin_steps: int = 0
    cap_evidence: int = 8


def _quantile(y: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``y`` (one of its values; ``inf`` allowed)."""
    return float(np.quantile(np.asarray(y, np.float64), q, method="inverted_cdf"))


def _pooled(x: np.ndarray, y: np.ndarray, q: float):
    """Pool adjacent violators of the ``q`` quantile: ``(xs float64[u], blocks)``, the
    distinct rates and, in increasing order, ``(needs, first, last)`` per block."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xs, inverse = np.unique(x, return_inverse=True)
    merged: list[tuple[list, int, int]] = []
    for i in range(len(xs)):
        merged.append((list(y[inverse == i]), i, i))
        while len(merged) > 1 and _quantile(merged[-2][0], q) > _quantile(merged[-1][0], q):
            last = merged.pop()
            merged[-1] = (merged[-1][0] + last[0], merged[-1][1], last[2])
    return xs, merged


def isotonic_quantile(x: np.ndarray, y: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing fit of the ``q`` quantile of ``y`` in ``x`` (pool adjacent
    violators, each block at its quantile; equal ``x`` share a value).

    Args:
      x: ``float[n]`` rates; y: ``float[n]`` needs (``inf`` allowed).

    Returns:
      ``(xs float64[u], fit float64[u])``: the distinct rates, increasing, and the fitted,
      non-decreasing quantile at each.
    """
    xs, blocks = _pooled(x, y, q)
    fit = np.zeros(len(xs))
    for values, lo, hi in blocks:
        fit[lo : hi + 1] = _quantile(values, q)
    return xs, fit


def quantile_lower_bound(values: np.ndarray, q: float, confidence: float) -> float:
    """A lower confidence bound of the ``q`` quantile of the law ``values float[m]`` were
    drawn from: the largest order statistic ``v_(j)`` with ``P(Binomial(m, q) >= j) >=
    confidence`` (the chance that at least ``j`` draws fall at or below the quantile);
    0 where no order statistic is one (too few values)."""
    v = np.sort(np.asarray(values, np.float64))
    m = len(v)
    j = np.arange(1, m + 1)
    ok = np.flatnonzero(stats.binom.sf(j - 1, m, q) >= confidence)
    return float(v[ok[-1]]) if len(ok) else 0.0


def lower_fit(x: np.ndarray, y: np.ndarray, q: float, confidence: float):
    """The map's lower estimate: ``(xs float64[u], low float64[u])``, the distinct rates
    and, non-decreasing, the running maximum over the pooled blocks
    (``isotonic_quantile``) of each block's lower confidence bound of its quantile."""
    xs, blocks = _pooled(x, y, q)
    low = np.zeros(len(xs))
    for values, lo, hi in blocks:
        low[lo : hi + 1] = quantile_lower_bound(np.asarray(values), q, confidence)
    return xs, np.maximum.accumulate(low)


class Plan(NamedTuple):
    """The map's plan for new chips ``[m]``: ``first`` steps before the first verification,
    ``last`` the chip's own cap, ``skip`` chips not served (``int64``, ``int64``,
    ``bool``)."""

    first: np.ndarray
    last: np.ndarray
    skip: np.ndarray


def plan(
    obs: Observations, rates: np.ndarray, points: np.ndarray, settings: OnlineSettings
) -> Plan:
    """Starts, caps and skips for chips of ``rates float[m]`` from the observations so far.

    * start: the lower estimate (``lower_fit``) at the largest observed rate at or below the
      chip's, rounded down to a verification point (0 below every observed rate);
    * cap: with at least ``cap_evidence`` chips that met the target at or below the chip's
      rate, the most any of them needed plus ``margin_steps`` (else the policy's cap);
    * not served: the lower estimate is ``inf`` (unreached) with at least
      ``min_evidence`` misses at or below the chip's rate.

    Args:
      points: ``int[P]`` the verification points (``policies.adaptive_points``), the last
        the policy's cap.
    """
    rates = np.asarray(rates, np.float64)
    m, cap = len(rates), int(points[-1])
    if not len(obs.rates):
        return Plan(np.zeros(m, np.int64), np.full(m, cap, np.int64), np.zeros(m, bool))
    xs, low = lower_fit(obs.rates, obs.needed_steps, settings.quantile, settings.confidence)
    at = np.searchsorted(xs, rates, side="right") - 1  # largest observed rate <= the chip's
    estimate = np.where(at >= 0, low[np.maximum(at, 0)], 0.0)
    reached = np.isfinite(obs.needed_steps)
    below = obs.rates[None, :] <= rates[:, None]  # [m, n]
    misses = (below & ~reached).sum(1)
    skip = np.zeros(m, bool)
    if settings.min_evidence > 0:
        skip = np.isinf(estimate) & (misses >= settings.min_evidence)
    j = np.searchsorted(points, np.minimum(estimate, cap), side="right") - 1
    first = np.where(np.isfinite(estimate), points[np.maximum(j, 0)], cap)
    hardest = np.where(below & reached, obs.needed_steps, -np.inf).max(1, initial=-np.inf)
    own = (
        (settings.margin_steps > 0)
        & ((below & reached).sum(1) >= settings.cap_evidence)
        & np.isfinite(hardest)
    )
    last = np.where(own, np.minimum(hardest + settings.margin_steps, cap), cap)
    last = np.maximum(last, first)
    return Plan(np.where(skip, 0, first).astype(np.int64), last.astype(np.int64), skip)


def observations_of(outcome: policies.AdaptiveOutcome, rates: np.ndarray) -> Observations:
    """What finished chips ``rates float[m]`` add to the map: the steps at which a chip met
    the target, ``inf`` where it reached the cap without; a diverged chip or one not
    served adds nothing."""
    keep = np.asarray(outcome.served, bool) & ~np.asarray(outcome.diverged, bool)
    need = np.where(outcome.met, outcome.steps, np.inf).astype(np.float64)
    return Observations(np.asarray(rates, np.float64)[keep], need[keep])


class OnlineOutcome(NamedTuple):
    """The online policy's chips (``outcome``, in chip order) and every observation the
    map holds at the end (the prior's first, then the chips' in arrival order)."""

    outcome: policies.AdaptiveOutcome
    observations: Observations


def run_online(
    ctx: population.Context,
    chip_maps: np.ndarray,
    chip_rates: np.ndarray,
    topup_steps: int,
    cap_steps: int,
    target: float,
    key: jax.Array,
    settings: OnlineSettings,
    test: sequential.SequentialTest | None = None,
    prior: Observations | None = None,
    store: ProgressStore | None = None,
    audit: bool = False,
    sink: retraining.WeightSink | None = None,
) -> OnlineOutcome:
    """The online policy on chips ``bool[n, R, C]`` of rates ``float[n]``, in arrival order.

    Each chip is trained on the batches of ``key`` (its trajectory is the adaptive policy's),
    verified by ``test`` from its start on, and stopped as the adaptive policy stops it.

    Args:
      settings: the map's settings (``OnlineSettings``).
      prior: observations the map starts from (a saved map's); default none.
      store: saves finished rounds (a resumed round's observations are added again, so a
        resumed run plans every round as the uninterrupted run did).
      sink: receives every chip's final variables (``policies.run_adaptive``; chip ``i`` is
        member ``i``).
    """
    points = policies.adaptive_points(topup_steps, cap_steps)
    rates = np.asarray(chip_rates, np.float64)
    obs = prior if prior is not None else Observations.empty()
    size = population.chunk_size(len(rates), settings.batch)
    parts = []
    for r, lo in enumerate(range(0, len(rates), size)):
        ids = np.arange(lo, min(lo + size, len(rates)))
        p = plan(obs, rates[ids], points, settings)
        out = policies.run_adaptive(
            ctx, chip_maps[ids], topup_steps, cap_steps, target, key, store,
            test=test, audit=audit, first=p.first, last=p.last, skip=p.skip,
            stage=f"online_policy/round_{r}", size=size, sink=sink, first_id=lo,
        )  # fmt: skip
        obs = obs.add(*observations_of(out, rates[ids]))
        parts.append(out)
    if not parts:
        empty = np.zeros(0)
        return OnlineOutcome(policies.AdaptiveOutcome(*([empty] * 10)), obs)
    outcome = jax.tree.map(lambda *x: np.concatenate(x), *parts)
    return OnlineOutcome(outcome, obs)
