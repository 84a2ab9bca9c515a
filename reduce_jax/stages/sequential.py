"""Verification that stops early: the validation split in slices, a chip rejected as soon as
the slices seen prove it cannot meet the target.

A chip *meets* the target when its accuracy on the whole validation split of ``N`` images
is at least the target, i.e. when it classifies at least ``T*`` of them correctly
(``needed_correct``). The split is evaluated in ``S`` slices of a random order of its
images. After ``n`` images with ``k`` correct, the chip's correct count ``T`` on the whole
split is unknown; the ``n`` images seen are a simple random sample of the split, so ``k``
follows the hypergeometric law ``H(N, T, n)``, whose distribution function decreases in
``T``. The hypothesis "the chip meets the target" (``T >= T*``) is rejected when

    P(K <= k | K ~ H(N, T*, n)) <= alpha / S,

the one-sided test against its hardest case ``T = T*`` at a level ``lambda`` chosen so that,
over the ``S`` looks of one verification, a chip with ``T*`` correct is rejected with
probability at most ``alpha`` over the order of the images: that probability is computed
exactly by dynamic programming over the count seen (``false_reject_probability``), and
``lambda`` is at least ``alpha / S`` (the union bound). A chip with more correct images is
rejected less often (the law of the counts seen increases with ``T``). Acceptance still
needs the whole split (at ``n = N``, ``K = T`` and the test is exact: reject iff ``k < T*``). A chip
that cannot meet the target is always rejected, at the latest after the last slice. A
false rejection costs one more top-up, never a chip that misses the target accepted.

Evaluation cost counts the images evaluated: a verification that stops after ``n`` of
``N`` images costs ``n / N`` evaluation passes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from reduce_jax import sharding
from reduce_jax.engine import population, train


def needed_correct(num_images: int, target: float) -> int:
    """``T*``: the fewest correct images of ``num_images`` whose accuracy, computed as the
    engine computes it (``float32(T) / N``), is at least ``target`` (``num_images + 1``:
    none is)."""
    counts = np.arange(num_images + 1)
    acc = (counts.astype(np.float32) / np.float32(num_images)).astype(np.float64)
    ok = np.flatnonzero(acc >= target)
    return int(ok[0]) if len(ok) else num_images + 1


def slice_bounds(num_images: int, slices: int) -> np.ndarray:
    """Cumulative image counts ``int64[S + 1]`` (``0 .. N``) of ``S`` near-equal slices."""
    slices = max(1, min(int(slices), num_images))
    return np.round(np.linspace(0, num_images, slices + 1)).astype(np.int64)


def _thresholds(num_images: int, seen: np.ndarray, t_star: int, level: float) -> np.ndarray:
    """Per look, the largest count ``k`` with ``P(K <= k | H(N, T*, n)) <= level`` (``-1``:
    none); the last look (``n = N``) rejects exactly ``k < T*``."""
    out = np.full(len(seen), -1, np.int64)
    for j, n in enumerate(seen):
        if n >= num_images or t_star > num_images:
            out[j] = min(t_star - 1, n)
            continue
        cdf = stats.hypergeom.cdf(np.arange(n + 1), num_images, t_star, n)
        ok = np.flatnonzero(cdf <= level)
        out[j] = int(ok[-1]) if len(ok) else -1
    return out


def false_reject_probability(
    num_images: int, seen: np.ndarray, t_star: int, reject: np.ndarray
) -> float:
    """The probability that a chip with exactly ``t_star`` of ``num_images`` correct, its
    images in a uniformly random order, is rejected at some look (``reject int[S]`` after
    ``seen int[S]`` images): the exact sequential probability, by dynamic programming over
    the correct count seen so far. A chip with more correct is rejected no more often."""
    if t_star > num_images:
        return 1.0
    dist = np.zeros(num_images + 1)
    dist[0] = 1.0
    rejected, before = 0.0, 0
    for j, n in enumerate(np.asarray(seen, np.int64)):
        m = int(n - before)
        ks = np.flatnonzero(dist > 0)
        x = np.arange(m + 1)
        # The next m images are drawn from the N - before unseen, T* - k of them correct.
        pmf = stats.hypergeom.pmf(x[None, :], num_images - before, (t_star - ks)[:, None], m)
        new = np.zeros(num_images + 1)
        for i, k in enumerate(ks):
            new[k : k + m + 1] += dist[k] * pmf[i]
        if reject[j] >= 0:
            rejected += new[: reject[j] + 1].sum()
            new[: reject[j] + 1] = 0.0
        dist, before = new, int(n)
    return float(rejected)


def reject_below(num_images: int, seen: np.ndarray, target: float, alpha: float) -> np.ndarray:
    """Rejection thresholds ``int64[S]``: after ``seen[j]`` images, a chip with at most
    ``out[j]`` correct is rejected (``-1``: none is). The last look (``seen = N``) is the
    exact decision ``k < T*``.

    Every look tests at one level: the largest for which a chip at ``T*`` is rejected at
    some look with probability at most ``alpha`` (``false_reject_probability``, exact; by
    bisection from ``alpha / S``, the union bound, which always qualifies).

    Args:
      seen: ``int[S]`` images seen at each look (increasing, the last ``N``).
      alpha: the bound on a verification's probability of rejecting a chip that meets the
        target.
    """
    t_star = needed_correct(num_images, target)
    seen = np.asarray(seen, np.int64)
    lo, hi = alpha / len(seen), alpha
    if alpha > 0 and t_star <= num_images:
        for _ in range(20):
            mid = (lo + hi) / 2
            ok = false_reject_probability(
                num_images, seen, t_star, _thresholds(num_images, seen, t_star, mid)
            )
            lo, hi = (mid, hi) if ok <= alpha else (lo, mid)
    return _thresholds(num_images, seen, t_star, lo)


class SequentialTest(NamedTuple):
    """How a verification is run.

    Attributes:
      bounds: ``int64[S + 1]`` cumulative images of the slices (``slice_bounds``).
      reject: ``int64[S]`` rejection thresholds (``reject_below``).
      order: ``int64[N]`` the random order of the validation images.
      alpha: the false-rejection bound of one verification.
    """

    bounds: np.ndarray
    reject: np.ndarray
    order: np.ndarray
    alpha: float

    @property
    def num_images(self) -> int:
        return int(self.bounds[-1])

    @property
    def slices(self) -> int:
        return len(self.reject)


def make_test(
    num_images: int, target: float, slices: int, alpha: float, key: jax.Array
) -> SequentialTest:
    """The sequential test of a split of ``num_images`` against ``target``: ``slices``
    slices (1: the whole split at once, no early stop) of the order drawn from ``key``."""
    bounds = slice_bounds(num_images, slices)
    order = np.asarray(jax.random.permutation(key, num_images), np.int64)
    return SequentialTest(bounds, reject_below(num_images, bounds[1:], target, alpha), order, alpha)


def whole_split(num_images: int, target: float) -> SequentialTest:
    """One slice, the images in their order: the usual verification."""
    bounds = slice_bounds(num_images, 1)
    return SequentialTest(
        bounds, reject_below(num_images, bounds[1:], target, 0.0), np.arange(num_images), 0.0
    )


def decide(hits: np.ndarray, test: SequentialTest) -> tuple[np.ndarray, np.ndarray]:
    """The test's decisions from every slice's correct images ``int[m, S]``: ``(accept
    bool[m], seen int64[m])``, ``seen`` the images evaluated up to the look that decided
    (what ``verify`` evaluates; this reads them all)."""
    cum = np.cumsum(np.asarray(hits, np.int64), axis=1)
    rejected = cum <= test.reject
    first = np.where(rejected.any(1), np.argmax(rejected, 1), test.slices - 1)
    return ~rejected.any(1), test.bounds[first + 1].astype(np.int64)


class Verdict(NamedTuple):
    """One verification of chips ``[m]``.

    Attributes:
      accept: ``bool[m]`` met the target on the whole split.
      seen: ``int64[m]`` images evaluated to decide (the cost).
      accuracy: ``float64[m]`` accuracy on the whole split where it was evaluated whole
        (accepted chips, and every chip with ``audit``), else on the images seen.
      whole_accept: ``bool[m]`` the decision the whole split gives (with ``audit``; without,
        ``accept``).
    """

    accept: np.ndarray
    seen: np.ndarray
    accuracy: np.ndarray
    whole_accept: np.ndarray


class SlicedData(NamedTuple):
    """The validation slices on the device, in the test's order: ``images[j]``,
    ``labels[j]`` for slice ``j``."""

    images: tuple[jax.Array, ...]
    labels: tuple[jax.Array, ...]


def slice_data(data: population.DeviceData, test: SequentialTest) -> SlicedData:
    """The validation split cut into the test's slices (once per run: device arrays)."""
    order = jnp.asarray(test.order)
    images, labels = data.val_images[order], data.val_labels[order]
    b = test.bounds
    return SlicedData(
        tuple(sharding.replicate(images[b[j] : b[j + 1]]) for j in range(test.slices)),
        tuple(sharding.replicate(labels[b[j] : b[j + 1]]) for j in range(test.slices)),
    )


def verify(
    trainer: train.Trainer,
    states: train.ChipState,
    chips,
    sliced: SlicedData,
    test: SequentialTest,
    ids: np.ndarray,
    audit: bool = False,
) -> Verdict:
    """Verifies chips ``ids`` of ``states`` slice by slice; a chip is no longer evaluated once
    rejected (with ``audit``, every chip is evaluated on every slice, for the whole split's
    decision; the verdict and its cost are the same).

    Args:
      states: ``ChipState[chips]``; chips: their chips (``trainer.chips``).
      ids: ``int[m]`` the chips to verify.
    """
    ids = np.asarray(ids, np.int64)
    m = len(ids)
    correct = np.zeros(m, np.int64)
    seen = np.zeros(m, np.int64)
    rejected = np.zeros(m, bool)
    for j in range(test.slices):
        live = np.flatnonzero(~rejected) if not audit else np.arange(m)
        if not len(live):
            break
        size = len(sliced.labels[j])
        acc = population.evaluate_on(
            trainer, states, chips, sliced.images[j], sliced.labels[j], ids[live]
        )
        hits = np.rint(acc * size)
        correct[live] += hits.astype(np.int64)
        counted = live[~rejected[live]]
        seen[counted] += size
        rejected[counted] |= correct[counted] <= test.reject[j]
    total = test.num_images
    accept = (seen == total) & ~rejected
    if audit:  # every image of every chip was evaluated
        return Verdict(accept, seen, _accuracy(correct, total), correct > test.reject[-1])
    return Verdict(accept, seen, _accuracy(correct, np.maximum(seen, 1)), accept)


def _accuracy(correct: np.ndarray, images) -> np.ndarray:
    """``float64`` accuracies computed as the engine computes them (``float32`` division),
    so they compare with a target as the engine's do."""
    ratio = np.asarray(correct, np.float32) / np.asarray(images, np.float32)
    return ratio.astype(np.float64)
