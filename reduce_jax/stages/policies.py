"""Reduce against what a user would do without it, with training and evaluation in one unit.

Policies, each giving every chip some retraining and verifying it on the validation split:

* ``fixed``: every chip is retrained ``--fixed_epochs`` and verified once. Its cost counts
  every chip; its outcome (chips meeting the target) is measured on every chip or, with
  ``--fixed_policy_chips``, on a random sample of them (``Policy.sampled_chips``).
* ``adaptive``: no analysis. Every chip is verified at 0 and topped up ``--topup_epochs`` at a
  time until it meets the target or reaches ``--adaptive_max_epochs`` (``run_adaptive``:
  one continuous retraining per chip, stopped where the policy stops it).
* ``adaptive_es``: adaptive whose verifications stop early (``sequential``): the same
  training, fewer images evaluated.
* ``online``: no analysis; a map learned from the chips already retrained starts each chip
  where it most likely needs no less (``online``), with verifications that stop early.
* ``reduce``: the amounts from the resilience map, top-ups, and the one-off analysis.
* ``grouped``: grouped Reduce (eFAT), in grouped runs.
* ``oracle``: on the predictor study's chips (other chips than the population's), the least
  evaluated amount each one needed (known only in hindsight: the bound no policy can beat).

Cost counts evaluation too. ``Compute`` holds XLA's flop count of one chip's training step
and of one evaluation pass over the validation split; a policy's *compute epochs* are its
training plus its evaluation passes in epochs of training (flops of one training epoch).
Every comparison (``compare``: the cheapest policy without Reduce, break-even populations)
is in compute epochs, or in training epochs where the backend gives no flop count.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reduce_jax import sharding
from reduce_jax.engine import population, train
from reduce_jax.engine.progress import ProgressStore
from reduce_jax.stages import cost as cost_lib
from reduce_jax.stages import grouping, predictor, resilience, retraining, sequential

POLICIES = ("fixed", "adaptive", "adaptive_es", "online", "reduce", "grouped", "oracle")


def xla_flops(compiled) -> float:
    """XLA's flop count of a compiled program (NaN if the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


class Compute(NamedTuple):
    """Flops of one chip's work, to put training and evaluation in one unit.

    Attributes:
      step_flops: one training step of one chip (XLA's count of ``Trainer.step``).
      eval_flops: one evaluation pass of one chip over the validation split.
      steps_per_epoch: training steps in one epoch.
    """

    step_flops: float
    eval_flops: float
    steps_per_epoch: int

    def epochs(self, train_steps: float, eval_passes: float) -> float:
        """Training steps plus evaluation passes, in epochs of training."""
        epoch = self.step_flops * self.steps_per_epoch
        return (train_steps * self.step_flops + eval_passes * self.eval_flops) / epoch

    def flops(self, train_steps: float, eval_passes: float) -> float:
        return train_steps * self.step_flops + eval_passes * self.eval_flops


def measure_compute(
    ctx: population.Context, batch_size: int, eval_batch_size: int, array: tuple[int, int]
) -> Compute:
    """``Compute`` of the run's model from XLA's cost analysis (compiles, runs nothing).

    The evaluation pass is counted as one evaluation batch times the number of batches of
    the validation split (XLA counts the body of ``Trainer.evaluate``'s scan once, not once
    per batch; the last batch is padded, and computed, in full). ``array``: the chips'
    ``(R, C)`` (what a chip is may depend on it: fault-aware chips carry ``[3, R, C]`` stuck
    bits); a chip's computation does not depend on its faulty PEs' positions.
    """
    trainer, variables = ctx.trainer, ctx.variables
    if trainer.hardware.counted is not None:  # the same arithmetic, counted in full
        trainer = train.make_trainer(
            trainer.hardware.counted, trainer.tx, batch_size, eval_batch_size
        )
    images, labels = ctx.data.val_images, ctx.data.val_labels
    shape = lambda x, lead=(): jax.ShapeDtypeStruct((*lead, *x.shape), x.dtype)  # noqa: E731
    batch = (
        lambda b: (  # noqa: E731
            jax.ShapeDtypeStruct((b, *images.shape[1:]), images.dtype),
            jax.ShapeDtypeStruct((b,), labels.dtype),
        )
    )
    maps = jax.ShapeDtypeStruct((1, *array), jnp.bool_)
    chips = jax.eval_shape(trainer.chips, variables["params"], maps)
    chip = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), chips)
    state = jax.eval_shape(
        lambda c: trainer.init_population(variables, c, jnp.ones((1,), jnp.int32)), chips
    )
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)
    step = xla_flops(trainer.step.lower(state, chip, *batch(batch_size)).compile())
    one_chip = lambda tree: jax.tree.map(lambda x: shape(x, (1,)), tree)  # noqa: E731
    b = min(eval_batch_size, len(labels))
    evaluate = trainer.evaluate.lower(one_chip(variables), chips, *batch(b))
    per_batch = xla_flops(evaluate.compile())
    return Compute(step, per_batch * math.ceil(len(labels) / b), ctx.steps_per_epoch)


class Policy(NamedTuple):
    """What one policy costs and achieves.

    Attributes:
      chips: chips the policy was applied to (and paid for).
      train_steps: training steps of all its chips.
      eval_passes: evaluation passes (one chip over the validation split each).
      chips_meeting_target: chips at or above the target on the validation split (the
        target plus ``--validation_margin``: what the decisions required), of
        ``measured_chips``.
      chips_meeting_target_test: chips at or above the target (alone) on the test set
        (reported only), of ``measured_chips``; None where not measured.
      sampled_chips: where the outcome was measured on a random sample of the chips (the
        fixed policy with ``--fixed_policy_chips``), the sample's size; None: every chip.
      rounds_mean, rounds_max: sequential verify-and-retrain rounds per chip, their mean
        and most (a round is a verification and the training before it: on a production
        line, a trip between the tester and the trainer); None: not counted.
    """

    chips: int
    train_steps: int
    eval_passes: float
    chips_meeting_target: int
    chips_meeting_target_test: int | None
    sampled_chips: int | None = None
    rounds_mean: float | None = None
    rounds_max: int | None = None

    @property
    def measured_chips(self) -> int:
        """The chips the two ``chips_meeting_*`` counts are out of."""
        return self.chips if self.sampled_chips is None else self.sampled_chips


def _meets(acc: np.ndarray, target: float) -> int:
    return int(np.sum(np.asarray(acc) >= target))


def rounds(per_chip: np.ndarray) -> dict:
    """``rounds_mean`` and ``rounds_max`` of ``int[n]`` rounds per chip."""
    per_chip = np.asarray(per_chip, np.int64)
    if not len(per_chip):
        return dict(rounds_mean=0.0, rounds_max=0)
    return dict(rounds_mean=float(per_chip.mean()), rounds_max=int(per_chip.max()))


def sample_chips(num_chips: int, sample: int, key: jax.Array) -> np.ndarray:
    """Chips ``int64[m]`` (increasing) whose fixed-policy outcome is measured: ``sample`` of
    them drawn without replacement, or every chip when ``sample`` is 0 or at least
    ``num_chips``."""
    if sample <= 0 or sample >= num_chips:
        return np.arange(num_chips, dtype=np.int64)
    drawn = jax.random.choice(key, num_chips, (sample,), replace=False)
    return np.sort(np.asarray(drawn, np.int64))


def run_fixed(
    ctx: population.Context,
    chip_maps: np.ndarray,
    fixed_steps: int,
    key: jax.Array,
    store: ProgressStore | None = None,
) -> resilience.Analysis:
    """Chips ``bool[m, R, C]`` retrained ``fixed_steps`` and evaluated there (validation and
    test): an ``Analysis`` with ``F = m``, ``K = 1`` and one amount."""
    return resilience.analyze(
        ctx,
        chip_maps[:, None],
        np.array([fixed_steps / ctx.steps_per_epoch]),
        key,
        store,
        "fixed_policy",
        with_test=True,
    )


def fixed_policy(
    traj: resilience.Analysis,
    fixed_steps: int,
    target: float,
    test_target: float,
    chips: int | None = None,
) -> Policy:
    """Every chip retrained ``fixed_steps`` and verified once (``target`` on the validation
    split, ``test_target`` on the test set).

    Args:
      traj: the measured chips (``run_fixed``, or any analysis that evaluates them at
        ``fixed_steps``).
      chips: the population the policy is paid for (default: the measured chips); when
        larger, the measured chips are a sample of it.
    """
    j = int(np.searchsorted(traj.amount_steps, fixed_steps))
    m = traj.accuracy.shape[0]
    n = m if chips is None else int(chips)
    if n < m:
        raise ValueError(f"a sample of {m} chips from a population of {n}")
    return Policy(
        chips=n,
        train_steps=n * int(fixed_steps),
        eval_passes=n,
        chips_meeting_target=_meets(traj.accuracy[:, j, 0], target),
        chips_meeting_target_test=_meets(traj.test_accuracy[:, j, 0], test_target),
        sampled_chips=m if n > m else None,
        rounds_mean=1.0,
        rounds_max=1,
    )


class AdaptiveOutcome(NamedTuple):
    """Where a sequential policy (adaptive, online) stopped every chip (arrays over chips).

    Attributes:
      steps: ``int64[n]`` training steps at the stop (0 for a chip not served).
      eval_passes: ``float64[n]`` validation passes: the images evaluated, over the split's
        size (a verification that stops early costs less than one pass).
      val: ``float64[n]`` validation accuracy at the stop (on the images seen where the
        verification stopped early; 0 for a diverged chip; NaN for a chip not served).
      test: ``float64[n]`` test accuracy at the stop (reported only; NaN: not served).
      diverged: ``bool[n]`` training became non-finite (stopped there).
      met: ``bool[n]`` the last verification accepted the chip (whole split).
      first: ``int64[n]`` steps at the chip's first verification.
      verifications: ``int64[n]`` verifications (rounds: each waits for the training
        before it).
      false_rejects: ``int64[n]`` verifications stopped early that the whole split would
        have accepted (counted where audited).
      served: ``bool[n]`` the chip was retrained and verified (the online map skips chips
        it says cannot be served).
    """

    steps: np.ndarray
    eval_passes: np.ndarray
    val: np.ndarray
    test: np.ndarray
    diverged: np.ndarray
    met: np.ndarray
    first: np.ndarray
    verifications: np.ndarray
    false_rejects: np.ndarray
    served: np.ndarray


class _Chips(NamedTuple):
    """Chips as ``population.drive`` chunks them: ``maps bool[n, R, C]``, the steps of
    their first verification ``first int64[n]`` and of their own cap ``last int64[n]`` (a
    verification point), and ``skip bool[n]`` (not served)."""

    maps: np.ndarray
    first: np.ndarray
    last: np.ndarray
    skip: np.ndarray


def adaptive_points(topup_steps: int, cap_steps: int) -> np.ndarray:
    """Steps ``int64[P]`` at which adaptive verifies a chip: 0, every increment, the cap."""
    k = math.ceil(cap_steps / topup_steps) if topup_steps > 0 else 0
    return np.unique(np.minimum(np.arange(k + 1) * topup_steps, cap_steps)).astype(np.int64)


def run_adaptive(
    ctx: population.Context,
    chip_maps: np.ndarray,
    topup_steps: int,
    cap_steps: int,
    target: float,
    key: jax.Array,
    store: ProgressStore | None = None,
    *,
    test: sequential.SequentialTest | None = None,
    audit: bool = False,
    first: np.ndarray | None = None,
    last: np.ndarray | None = None,
    skip: np.ndarray | None = None,
    stage: str = "adaptive_policy",
    size: int | None = None,
    sink: retraining.WeightSink | None = None,
    first_id: int = 0,
) -> AdaptiveOutcome:
    """The adaptive policy on chips ``bool[n, R, C]``: each trained continuously on the
    batches of ``key``, verified at 0 and after every ``topup_steps``, and stopped at the
    first verification that meets ``target`` (validation), or at ``cap_steps``. A stopped
    chip takes no more steps (its trajectory does not depend on when it is stopped), so the
    policy costs what it spends, not the cap; only the chips still running are evaluated.

    Args:
      test: how a verification is run (``sequential``; default: the whole split at once).
      audit: also evaluate the images an early stop skips, to count false rejections
        (the policy's decisions and cost do not change).
      first: ``int[n]`` steps before a chip's first verification (default 0): the chip is
        trained without evaluation until the first of the policy's points at or past it
        (the online map's start).
      last: ``int[n]`` a cap of the chip's own, at most ``cap_steps`` (default
        ``cap_steps``): the chip is verified there and stopped (the first of the policy's
        points at or past it).
      skip: ``bool[n]`` chips neither retrained nor evaluated (not served).
      stage, size: the stage's name in ``store`` and its chips per chunk (default:
        ``ctx.chips_per_batch``).
      sink: receives every chunk's chips' final variables as the chunk finishes
        (``retraining.WeightSink``; a chip not served is the baseline on its hardware);
        first_id: the id there of chip 0 (its members are ``first_id + i``).
    """
    points = adaptive_points(topup_steps, cap_steps)
    n_all = len(chip_maps)
    test = test if test is not None else sequential.whole_split(len(ctx.data.val_labels), target)
    sliced = sequential.slice_data(ctx.data, test)
    first = np.zeros(n_all, np.int64) if first is None else np.asarray(first, np.int64)
    last = np.full(n_all, points[-1]) if last is None else np.asarray(last, np.int64)
    # A chip's own cap: the first point at or past it.
    last = points[np.searchsorted(points, np.minimum(last, points[-1]))]
    skip = np.zeros(n_all, bool) if skip is None else np.asarray(skip, bool)

    def compute(ids: np.ndarray, chunk: _Chips) -> AdaptiveOutcome:
        n = len(chunk.maps)
        active = (np.arange(n) < len(ids)) & ~chunk.skip
        served = active.copy()
        budgets = np.where(active, chunk.last, 0)
        states, chips = population.init_chunk(ctx.trainer, ctx.variables, chunk.maps, budgets)
        stop, checks, false_rejects = (np.zeros(n, np.int64) for _ in range(3))
        seen, val = np.zeros(n), np.where(served, 0.0, np.nan)
        diverged, met, prev = np.zeros(n, bool), np.zeros(n, bool), 0
        for s in points:
            if s > prev:
                phase = np.where(active, s - prev, 0)
                states = population.run_phase(
                    ctx.trainer, states, chips, ctx.data, key, phase, start=prev
                )
            prev = int(s)
            due = active & ((chunk.first <= s) | (s >= chunk.last))
            now = np.flatnonzero(due)
            if not len(now):
                continue
            verdict = sequential.verify(ctx.trainer, states, chips, sliced, test, now, audit)
            div = sharding.to_host(states.diverged)[now]
            seen[now] += verdict.seen
            checks[now] += 1
            false_rejects[now] += verdict.whole_accept & ~verdict.accept
            val[now] = np.where(div, 0.0, verdict.accuracy)
            diverged[now], met[now], stop[now] = div, verdict.accept & ~div, s
            active[now[verdict.accept | div | (s >= chunk.last[now])]] = False
            if not active.any():
                break
        test_acc = population.evaluate(ctx.trainer, states, chips, ctx.data, "test")
        if sink is not None:
            m = len(ids)
            trained = sharding.to_host(states.step)[:m].astype(np.int64)
            members = (first_id + np.asarray(ids, np.int64))[:, None]
            sink.write(stage, members, trained, chunk.maps[:m], diverged[:m], states.variables)
        return AdaptiveOutcome(
            steps=stop,
            eval_passes=seen / test.num_images,
            val=val,
            test=np.where(served, test_acc, np.nan),
            diverged=diverged,
            met=met,
            first=np.where(served, np.maximum(chunk.first, 0), 0),
            verifications=checks,
            false_rejects=false_rejects,
            served=served,
        )

    size = population.chunk_size(n_all, ctx.chips_per_batch if size is None else size)
    return population.drive(
        _Chips(np.asarray(chip_maps), first, last, skip),
        compute,
        AdaptiveOutcome,
        size,
        store=store,
        stage=stage,
    )


def adaptive_policy(outcome: AdaptiveOutcome, test_target: float) -> Policy:
    """A sequential policy's cost and outcome: the chips its last verification accepted
    meet the target on validation; the test set is judged against ``test_target``; a
    diverged chip, or one not served, meets neither."""
    ok = np.asarray(outcome.met, bool) & ~np.asarray(outcome.diverged, bool)
    test = np.asarray(outcome.test)[np.asarray(outcome.served, bool) & ~outcome.diverged]
    return Policy(
        chips=len(ok),
        train_steps=int(np.sum(outcome.steps)),
        eval_passes=float(np.sum(outcome.eval_passes)),
        chips_meeting_target=int(ok.sum()),
        chips_meeting_target_test=_meets(test, test_target),
        **rounds(outcome.verifications),
    )


def topup_rounds(topup_steps: np.ndarray, increment: int) -> np.ndarray:
    """Top-up rounds ``int64[n]`` behind each unit's top-up steps (each round adds at most
    ``increment`` steps and is followed by an evaluation)."""
    if increment <= 0:
        return np.zeros(len(topup_steps), np.int64)
    return np.ceil(np.asarray(topup_steps) / increment).astype(np.int64)


def reduce_policy(chips: cost_lib.ChipResults, increment: int) -> Policy:
    """Per-chip Reduce: every served chip is verified after its amount and after every
    top-up round (its rounds); chips the map flags are neither retrained nor evaluated."""
    served = chips.selected_steps >= 0
    topups = topup_rounds(chips.topup_steps, increment)
    return Policy(
        chips=len(served),
        train_steps=int(chips.selected_steps[served].sum() + chips.topup_steps.sum()),
        eval_passes=int(served.sum() + topups.sum()),
        chips_meeting_target=int(chips.meets_target.sum()),
        chips_meeting_target_test=int(chips.meets_target_test.sum()),
        **rounds(np.where(served, 1 + topups, 0)),
    )


def grouped_policy(
    grouped: grouping.GroupedOutcome, chips: cost_lib.ChipResults, increment: int
) -> Policy:
    """Grouped Reduce: every retraining is verified on its (fused) map after its amount and
    every top-up round, and its model on each member chip."""
    t = grouped.retrainings
    members = (t.members >= 0).sum(1)
    multi = members > 1
    evals = t.retrained.sum() + topup_rounds(t.topup_steps, increment).sum() + members[multi].sum()
    return Policy(
        chips=len(chips.status),
        train_steps=int(t.steps.sum() + t.topup_steps.sum()),
        eval_passes=int(evals),
        chips_meeting_target=int(chips.grouped_meets_target.sum()),
        chips_meeting_target_test=None,
    )


def oracle_policy(study: predictor.PredictorStudy, test_target: float) -> Policy:
    """The predictor study's chips, each retrained the least evaluated amount that met the
    target on the validation split (none where no amount did); it needs no evaluation. Its
    test results are judged against ``test_target``."""
    needed = study.needed_steps
    served = np.isfinite(needed)
    a = study.analysis
    j = np.searchsorted(a.amount_steps, np.where(served, needed, 0))
    rows = np.arange(len(needed))
    test = a.test_accuracy[rows, j, 0] if a.test_accuracy is not None else None
    return Policy(
        chips=len(needed),
        train_steps=int(needed[served].sum()),
        eval_passes=0,
        chips_meeting_target=int(served.sum()),
        chips_meeting_target_test=None if test is None else _meets(test[served], test_target),
    )


ALTERNATIVES = ("fixed", "adaptive", "adaptive_es", "online")  # no analysis needed


class Comparison(NamedTuple):
    """Every policy of a run, the cheapest one without Reduce, and where Reduce breaks even.

    Attributes:
      policies: name -> ``Policy`` (only the policies the run measured).
      analysis: the one-off resilience analysis, as a ``Policy`` of its ``F * K`` chips.
      compute: flops of a training step and of an evaluation pass.
      unit: what every cost and break-even here is in: ``compute_epochs`` (training and
        evaluation, in training epochs), or ``train_epochs`` where the backend gives no flop
        count.
      break_even: name -> least population from which Reduce, analysis included, costs less
        than that policy (None: Reduce costs as much or more per chip, so never), for each
        of ``ALTERNATIVES`` the run measured.
      cheapest: the alternative that costs least per chip (None: none was measured).
      audits: name -> ``(verifications, false_rejects)`` of the policies whose early
        stops were audited against the whole split.
    """

    policies: dict[str, Policy]
    analysis: Policy
    compute: Compute
    unit: str
    break_even: dict[str, int | None]
    cheapest: str | None
    audits: dict[str, tuple[int, int]] = {}

    @property
    def break_even_vs_adaptive(self) -> int | None:
        return self.break_even.get("adaptive")

    @property
    def break_even_vs_cheapest(self) -> int | None:
        return None if self.cheapest is None else self.break_even[self.cheapest]

    def cost(self, p: Policy) -> float:
        """``p``'s cost in ``unit``."""
        if self.unit == "compute_epochs":
            return self.compute.epochs(p.train_steps, p.eval_passes)
        return p.train_steps / self.compute.steps_per_epoch

    def per_chip(self, p: Policy) -> float:
        return self.cost(p) / max(p.chips, 1)

    def total(self, name: str, chips: int) -> float:
        """Policy ``name``'s cost for ``chips`` chips at its measured cost per chip, Reduce's
        and grouped Reduce's with the analysis."""
        one_off = self.cost(self.analysis) if name in ONE_OFF else 0.0
        return one_off + chips * self.per_chip(self.policies[name])

    @property
    def recommended(self) -> str | None:
        """The policy (Reduce with its analysis among them) that costs least for the run's
        population, of those serving chips without hindsight; None: none measured."""
        names = [n for n in POLICIES if n in self.policies and n != "oracle"]
        if not names:
            return None
        chips = max(p.chips for p in self.policies.values())
        return min(names, key=lambda n: self.total(n, chips))


ONE_OFF = ("reduce", "grouped")  # policies that pay the analysis


def analysis_policy(analysis: resilience.Analysis) -> Policy:
    """The resilience analysis as a cost: ``F * K`` chips to the largest amount, each
    evaluated at every amount of the axis."""
    num_f, num_a, k = analysis.accuracy.shape
    return Policy(
        chips=num_f * k,
        train_steps=num_f * k * int(analysis.amount_steps.max()),
        eval_passes=num_f * k * num_a,
        chips_meeting_target=0,
        chips_meeting_target_test=None,
    )


def compare(
    policies: dict[str, Policy],
    analysis: resilience.Analysis,
    compute: Compute,
    audits: dict[str, tuple[int, int]] | None = None,
) -> Comparison:
    """Collects the policies, the cheapest alternative and Reduce's break-even population
    against each alternative, in one unit (``Comparison.unit``)."""
    one_off = analysis_policy(analysis)
    known = math.isfinite(compute.epochs(1, 1))
    out = Comparison(
        policies, one_off, compute, "compute_epochs" if known else "train_epochs", {}, None,
        dict(audits or {}),
    )  # fmt: skip
    measured = [name for name in ALTERNATIVES if name in policies]
    if "reduce" in policies:
        for name in measured:
            saving = out.per_chip(policies[name]) - out.per_chip(policies["reduce"])
            out.break_even[name] = cost_lib.break_even_chips(out.cost(one_off), saving)
    cheapest = min(measured, key=lambda n: out.per_chip(policies[n]), default=None)
    return out._replace(cheapest=cheapest)


# Where each policy wins --------------------------------------------------------------------

REGION_EVAL_EPOCHS = np.geomspace(0.01, 1.0, 7)  # one evaluation pass, in training epochs
REGION_CHIPS = np.array([10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000])


class Regions(NamedTuple):
    """Which policy costs least, over the cost of an evaluation pass and the population.

    Every policy is costed from the run's own per-chip counts: training epochs and
    evaluation passes per chip, and for Reduce (and grouped Reduce) the analysis's, as
    ``one-off + chips * per-chip``, an evaluation pass costing ``eval_epochs`` epochs of
    training. The online policy's per-chip counts are those of the run's population (a
    longer line would learn more, so this is its cost at worst).

    Attributes:
      eval_epochs: ``float64[E]`` the cost of one evaluation pass, in training epochs.
      chips: ``int64[N]`` population sizes.
      cheapest: ``[E][N]`` the name of the cheapest policy in each cell.
      measured_eval_epochs: the run's own cost of an evaluation pass (NaN: no flop count).
    """

    eval_epochs: np.ndarray
    chips: np.ndarray
    cheapest: list[list[str]]
    measured_eval_epochs: float


def where_each_wins(
    comparison: Comparison,
    eval_epochs: np.ndarray = REGION_EVAL_EPOCHS,
    chips: np.ndarray = REGION_CHIPS,
) -> Regions:
    """The cheapest policy (of those without hindsight: not ``oracle``) in every cell of
    ``eval_epochs float[E]`` x ``chips int[N]`` (ties: the first in ``POLICIES``)."""
    spe = comparison.compute.steps_per_epoch
    names = [n for n in POLICIES if n in comparison.policies and n != "oracle"]

    def cost(p: Policy, e: float) -> float:
        return p.train_steps / spe + e * p.eval_passes

    one = comparison.analysis
    table = []
    for e in np.asarray(eval_epochs, np.float64):
        row = []
        for n in np.asarray(chips, np.int64):
            totals = [
                (cost(one, e) if name in ONE_OFF else 0.0)
                + n * cost(comparison.policies[name], e) / max(comparison.policies[name].chips, 1)
                for name in names
            ]
            row.append(names[int(np.argmin(totals))] if names else "")
        table.append(row)
    c = comparison.compute
    measured = c.eval_flops / (c.step_flops * c.steps_per_epoch)
    return Regions(
        np.asarray(eval_epochs, np.float64), np.asarray(chips, np.int64), table, float(measured)
    )
