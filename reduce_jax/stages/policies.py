"""Reduce against what a user would do without it, with training and evaluation in one unit.

Policies, each giving every chip some retraining and verifying it on the validation split:

* ``fixed``: every chip is retrained ``--fixed_epochs`` and verified once.
* ``adaptive``: no analysis. Every chip is verified at 0 and topped up ``--topup_epochs`` at a
  time until it meets the target or reaches ``--adaptive_max_epochs``.
* ``reduce``: the amounts from the resilience map, top-ups, and the one-off analysis.
* ``grouped``: grouped Reduce (eFAT), in grouped runs.
* ``oracle``: on the predictor study's chips, the least evaluated amount each one needed
  (known only in hindsight: the bound no policy can beat).

``fixed`` and ``adaptive`` are read off one *trajectory* per chip: every chip of the
population is retrained once, continuously, up to the largest amount either needs, and
evaluated at every top-up increment (``resilience.analyze``). A chip's trajectory does not
depend on when it is stopped (its budget only gates its steps), so stopping it where a
policy stops gives that policy's result.

Cost counts evaluation too. ``Compute`` holds XLA's flop count of one chip's training step
and of one evaluation pass over the validation split; a policy's ``compute_epochs`` is its
training plus its evaluation passes in epochs of training (flops of one training epoch).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from reduce_jax.engine import population, train
from reduce_jax.engine.progress import ProgressStore
from reduce_jax.stages import cost as cost_lib
from reduce_jax.stages import grouping, predictor, resilience

POLICIES = ("fixed", "adaptive", "reduce", "grouped", "oracle")


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


def measure_compute(ctx: population.Context, batch_size: int, eval_batch_size: int) -> Compute:
    """``Compute`` of the run's model from XLA's cost analysis (compiles, runs nothing).

    The evaluation pass is counted as one evaluation batch times the number of batches of
    the validation split (XLA counts the body of ``Trainer.evaluate``'s scan once, not once
    per batch; the last batch is padded, and computed, in full).
    """
    trainer, variables = ctx.trainer, ctx.variables
    images, labels = ctx.data.val_images, ctx.data.val_labels
    shape = lambda x, lead=(): jax.ShapeDtypeStruct((*lead, *x.shape), x.dtype)  # noqa: E731
    batch = (
        lambda b: (  # noqa: E731
            jax.ShapeDtypeStruct((b, *images.shape[1:]), images.dtype),
            jax.ShapeDtypeStruct((b,), labels.dtype),
        )
    )
    mask = jax.tree.map(shape, variables["params"])
    state = jax.eval_shape(lambda m: train.init_chip(variables, m, trainer.tx, 1), mask)
    step = xla_flops(trainer.step.lower(state, mask, *batch(batch_size)).compile())
    one_chip = lambda tree: jax.tree.map(lambda x: shape(x, (1,)), tree)  # noqa: E731
    b = min(eval_batch_size, len(labels))
    evaluate = trainer.evaluate.lower(one_chip(variables), one_chip(mask), *batch(b))
    per_batch = xla_flops(evaluate.compile())
    return Compute(step, per_batch * math.ceil(len(labels) / b), ctx.steps_per_epoch)


class Policy(NamedTuple):
    """What one policy costs and achieves.

    Attributes:
      chips: chips the policy was applied to.
      train_steps: training steps of all its chips.
      eval_passes: evaluation passes (one chip over the validation split each).
      chips_meeting_target: chips at or above the target on the validation split (the
        target plus ``--validation_margin``: what the decisions required).
      chips_meeting_target_test: chips at or above the target (alone) on the test set
        (reported only).
    """

    chips: int
    train_steps: int
    eval_passes: int
    chips_meeting_target: int
    chips_meeting_target_test: int | None


def _meets(acc: np.ndarray, target: float) -> int:
    return int(np.sum(np.asarray(acc) >= target))


def trajectory_points(
    topup_steps: int, cap_steps: int, fixed_steps: int, steps_per_epoch: int
) -> np.ndarray:
    """Amounts ``float64[P]`` in epochs at which the trajectory is evaluated: every top-up
    increment up to the adaptive cap (the cap included), and the fixed amount."""
    k = math.ceil(cap_steps / topup_steps) if topup_steps > 0 else 0
    steps = np.minimum(np.arange(k + 1) * topup_steps, cap_steps)
    steps = np.unique(np.concatenate([steps, [0, fixed_steps]]))
    return steps / steps_per_epoch


def run_trajectory(
    ctx: population.Context,
    chip_maps: np.ndarray,
    points_epochs: np.ndarray,
    key: jax.Array,
    store: ProgressStore | None = None,
) -> resilience.Analysis:
    """Every chip retrained once up to the last point and evaluated at each (validation and
    test): an ``Analysis`` with ``F = chips`` and ``K = 1``."""
    return resilience.analyze(
        ctx, chip_maps[:, None], points_epochs, key, store, "policies", with_test=True
    )


def fixed_policy(
    traj: resilience.Analysis, fixed_steps: int, target: float, test_target: float
) -> Policy:
    """Every chip retrained ``fixed_steps`` and verified once (``target`` on the validation
    split, ``test_target`` on the test set)."""
    j = int(np.searchsorted(traj.amount_steps, fixed_steps))
    n = traj.accuracy.shape[0]
    return Policy(
        chips=n,
        train_steps=n * int(fixed_steps),
        eval_passes=n,
        chips_meeting_target=_meets(traj.accuracy[:, j, 0], target),
        chips_meeting_target_test=_meets(traj.test_accuracy[:, j, 0], test_target),
    )


def adaptive_stops(val: np.ndarray, target: float) -> np.ndarray:
    """Index ``int64[chips]`` of the first point at which each chip meets the target (the
    last point, the cap, where none does).

    Args:
      val: ``float[chips, P]`` accuracy at every top-up increment, from 0 to the cap.
    """
    ok = np.asarray(val) >= target
    return np.where(ok.any(1), np.argmax(ok, 1), val.shape[1] - 1).astype(np.int64)


def adaptive_policy(
    traj: resilience.Analysis, cap_steps: int, target: float, test_target: float
) -> Policy:
    """Verify at 0; top up one increment at a time until ``target`` (validation) or the cap;
    the test set is judged against ``test_target``."""
    points = np.flatnonzero(traj.amount_steps <= cap_steps)
    val, test = traj.accuracy[:, points, 0], traj.test_accuracy[:, points, 0]
    stop = adaptive_stops(val, target)
    rows = np.arange(len(stop))
    return Policy(
        chips=len(stop),
        train_steps=int(traj.amount_steps[points][stop].sum()),
        eval_passes=int((stop + 1).sum()),
        chips_meeting_target=_meets(val[rows, stop], target),
        chips_meeting_target_test=_meets(test[rows, stop], test_target),
    )


def topup_rounds(topup_steps: np.ndarray, increment: int) -> np.ndarray:
    """Top-up rounds ``int64[n]`` behind each unit's top-up steps (each round adds at most
    ``increment`` steps and is followed by an evaluation)."""
    if increment <= 0:
        return np.zeros(len(topup_steps), np.int64)
    return np.ceil(np.asarray(topup_steps) / increment).astype(np.int64)


def reduce_policy(chips: cost_lib.ChipResults, increment: int) -> Policy:
    """Per-chip Reduce: every served chip is verified after its amount and after every
    top-up round; chips the map flags are neither retrained nor evaluated."""
    served = chips.selected_steps >= 0
    rounds = topup_rounds(chips.topup_steps, increment)
    return Policy(
        chips=len(served),
        train_steps=int(chips.selected_steps[served].sum() + chips.topup_steps.sum()),
        eval_passes=int(served.sum() + rounds.sum()),
        chips_meeting_target=int(chips.meets_target.sum()),
        chips_meeting_target_test=int(chips.meets_target_test.sum()),
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


class Comparison(NamedTuple):
    """Every policy of a run, and where Reduce breaks even with ``adaptive``.

    Attributes:
      policies: name -> ``Policy`` (only the policies the run measured).
      analysis: the one-off resilience analysis, as a ``Policy`` of its ``F * K`` chips.
      compute: flops of a training step and of an evaluation pass.
      break_even_vs_adaptive: least population from which Reduce, analysis included,
        costs less compute than ``adaptive`` (None: Reduce costs more per chip).
    """

    policies: dict[str, Policy]
    analysis: Policy
    compute: Compute
    break_even_vs_adaptive: int | None


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
    policies: dict[str, Policy], analysis: resilience.Analysis, compute: Compute
) -> Comparison:
    """Collects the policies and Reduce's break-even population against ``adaptive``."""
    one_off = analysis_policy(analysis)
    cost = lambda p: compute.epochs(p.train_steps, p.eval_passes)  # noqa: E731
    per_chip = lambda p: cost(p) / max(p.chips, 1)  # noqa: E731
    even = None
    if "adaptive" in policies and "reduce" in policies:
        saving = per_chip(policies["adaptive"]) - per_chip(policies["reduce"])
        even = cost_lib.break_even_chips(cost(one_off), saving)
    return Comparison(policies, one_off, compute, even)
