"""Per-chip results and the cost of Reduce against retraining every chip a fixed amount."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from reduce_jax.stages import grouping, resilience, retraining

CHIP_STATUSES = ("ok", "missed_target", "above_grid", "unrecoverable", "diverged")


class ChipResults(NamedTuple):
    """Every chip's result (the ``chips`` of ``summary.json``), arrays over chips.

    Attributes:
      status: ``str[chips]`` one of ``CHIP_STATUSES``: ``ok`` (meets the target),
        ``missed_target`` (retrained and topped up to the cap, still below the target),
        ``above_grid`` / ``unrecoverable`` (not retrained), ``diverged`` (non-finite
        training). These describe per-chip Reduce.
      selected_steps: ``int64[chips]`` the amount from the map (``-1``: not retrained).
      topup_steps: ``int64[chips]``.
      accuracy_before, accuracy_after: ``float64[chips]`` on the chip, before and after
        (validation split: the one decisions are taken on).
      meets_target: ``bool[chips]`` served (retrained, not diverged) and at or above the
        target plus ``--validation_margin`` on the validation split (what the decisions
        required). A chip the map does not serve (``above_grid``, ``unrecoverable``) never
        meets it, whatever its accuracy without retraining.
      test_accuracy_after: ``float64[chips]`` after, on the test set (reported only).
      meets_target_test: ``bool[chips]`` served, not diverged, and ``test_accuracy_after >=
        target`` (the target alone).
      group: ``int64[chips]`` grouped runs: the retraining that served the chip (``-1``:
        none); ``None`` in runs without grouping, like the two fields below.
      grouped_accuracy_after: ``float64[chips]`` the serving model on the chip (NaN: none).
      grouped_meets_target: ``bool[chips]``.
    """

    status: np.ndarray
    selected_steps: np.ndarray
    topup_steps: np.ndarray
    accuracy_before: np.ndarray
    accuracy_after: np.ndarray
    meets_target: np.ndarray
    test_accuracy_after: np.ndarray
    meets_target_test: np.ndarray
    group: np.ndarray | None = None
    grouped_accuracy_after: np.ndarray | None = None
    grouped_meets_target: np.ndarray | None = None


def chip_results(
    assignment: resilience.Assignment,
    outcome: retraining.ChipOutcome,
    decision_target: float,
    grouped: grouping.GroupedOutcome | None = None,
    *,
    test_target: float | None = None,
) -> ChipResults:
    """Every chip's status and result from its amount and its (per-chip) retraining.

    Args:
      assignment: the chips' amounts.
      outcome: the per-chip retraining (one unit per chip, in chip order).
      decision_target: the accuracy the validation split requires (``--validation_margin``
        included).
      grouped: the grouped retraining, in grouped runs.
      test_target: the target the test set is judged against (None: ``decision_target``).
    """
    test_target = decision_target if test_target is None else test_target
    selected = assignment.ok
    diverged = outcome.diverged
    served = selected & ~diverged
    meets = (outcome.accuracy_after >= decision_target) & served
    names = np.array([resilience.STATUS_NAMES[int(s)] for s in assignment.status], object)
    status = np.where(selected, np.where(meets, "ok", "missed_target"), names)
    status = np.where(diverged, "diverged", status)
    results = ChipResults(
        status=status,
        selected_steps=np.where(selected, assignment.budgets, -1),
        topup_steps=outcome.topup_steps,
        accuracy_before=outcome.accuracy_before,
        accuracy_after=outcome.accuracy_after,
        meets_target=meets,
        test_accuracy_after=outcome.test_accuracy_after,
        meets_target_test=(outcome.test_accuracy_after >= test_target) & served,
    )
    if grouped is None:
        return results
    group = grouped.served_by
    return results._replace(
        group=group,
        grouped_accuracy_after=np.where(group >= 0, grouped.accuracy_after, np.nan),
        grouped_meets_target=(
            (group >= 0) & (grouped.accuracy_after >= decision_target) & ~grouped.diverged
        ),
    )


class Cost(NamedTuple):
    """Retraining cost of a run in epochs (``summary.json``'s ``cost``; plain Python values).

    ``reduce_epochs`` sums every chip's selected amount and top-ups (chips that are not
    retrained cost nothing); the fixed policy retrains every chip ``fixed_epochs_per_chip``.
    ``grouped_*`` (grouped runs; None otherwise) count every retraining of the grouped run:
    every group's amount and top-ups, split groups and their members' retraining included.
    ``*_recoverable`` compare on the chips Reduce retrains only, which is the fair
    comparison when many chips are unrecoverable. These count training only; the comparison
    of policies with evaluation counted, and where Reduce breaks even, is
    ``policies.compare``'s (one unit for every break-even the run reports).
    """

    reduce_epochs: float
    reduce_planned_epochs: float
    grouped_epochs: float | None
    grouped_steps: int | None
    grouped_planned_epochs: float | None
    groups: int | None
    groups_split: int | None
    grouped_topup_epochs: float | None
    grouped_chips_meeting_target: int | None
    grouped_savings_fraction: float | None
    grouped_savings_vs_reduce: float | None
    reduce_steps: int
    fixed_epochs: float
    fixed_epochs_per_chip: float
    analysis_epochs: float
    savings: float
    savings_fraction: float | None
    fixed_epochs_recoverable: float
    savings_recoverable: float
    savings_fraction_recoverable: float | None
    topup_epochs: float
    chips_meeting_target: int
    chips_meeting_target_test: int
    chips_unrecoverable: int
    chips_missing_target: int
    chips_diverged: int
    steps_per_epoch: int


def break_even_chips(analysis_epochs: float, per_chip_saving: float) -> int | None:
    """Least population ``n`` with ``n * per_chip_saving >= analysis_epochs`` (None if
    Reduce saves nothing per chip, or either value is unknown: NaN)."""
    if not per_chip_saving > 0 or math.isnan(analysis_epochs):
        return None
    # A ratio within float rounding (relative 1e-9) above a whole number is that number.
    return math.ceil(analysis_epochs / per_chip_saving * (1 - 1e-9))


def _fraction(saved: float, total: float) -> float | None:
    return saved / total if total > 0 else None


def summarize(
    chips: ChipResults,
    fixed_epochs_per_chip: float,
    analysis_epochs: float,
    steps_per_epoch: int,
    grouped: grouping.GroupedOutcome | None = None,
) -> Cost:
    """Reduce's retraining cost against the fixed policy (``Cost``), from the chip results."""
    n = len(chips.status)
    if n == 0:
        raise ValueError("no chips")
    spe = steps_per_epoch
    selected = chips.selected_steps >= 0
    planned_steps = int(chips.selected_steps[selected].sum())
    reduce_steps = planned_steps + int(chips.topup_steps.sum())
    reduce_epochs = reduce_steps / spe
    fixed_epochs = fixed_epochs_per_chip * n
    fixed_recoverable = fixed_epochs_per_chip * int(selected.sum())
    grouped_fields = dict.fromkeys(_GROUPED_FIELDS)
    if grouped is not None:
        grouped_fields = _grouped_cost(grouped, chips, fixed_epochs, reduce_epochs, spe)
    return Cost(
        reduce_epochs=reduce_epochs,
        reduce_planned_epochs=planned_steps / spe,
        **grouped_fields,
        reduce_steps=reduce_steps,
        fixed_epochs=fixed_epochs,
        fixed_epochs_per_chip=float(fixed_epochs_per_chip),
        analysis_epochs=float(analysis_epochs),
        savings=fixed_epochs - reduce_epochs,
        savings_fraction=_fraction(fixed_epochs - reduce_epochs, fixed_epochs),
        fixed_epochs_recoverable=fixed_recoverable,
        savings_recoverable=fixed_recoverable - reduce_epochs,
        savings_fraction_recoverable=_fraction(
            fixed_recoverable - reduce_epochs, fixed_recoverable
        ),
        # Summed chip by chip in epochs, as the chip records report them.
        topup_epochs=sum(float(t / spe) for t in chips.topup_steps),
        chips_meeting_target=int(chips.meets_target.sum()),
        chips_meeting_target_test=int(chips.meets_target_test.sum()),
        chips_unrecoverable=int(np.isin(chips.status, ("above_grid", "unrecoverable")).sum()),
        chips_missing_target=int((chips.status == "missed_target").sum()),
        chips_diverged=int((chips.status == "diverged").sum()),
        steps_per_epoch=int(spe),
    )


_GROUPED_FIELDS = (
    "grouped_epochs",
    "grouped_steps",
    "grouped_planned_epochs",
    "groups",
    "groups_split",
    "grouped_topup_epochs",
    "grouped_chips_meeting_target",
    "grouped_savings_fraction",
    "grouped_savings_vs_reduce",
)


def _grouped_cost(
    grouped: grouping.GroupedOutcome,
    chips: ChipResults,
    fixed_epochs: float,
    reduce_epochs: float,
    spe: int,
) -> dict:
    """The ``grouped_*`` fields of ``Cost``."""
    table = grouped.retrainings
    steps = int(table.steps.sum()) + int(table.topup_steps.sum())
    return dict(
        grouped_epochs=steps / spe,
        grouped_steps=steps,
        grouped_planned_epochs=int(table.steps.sum()) / spe,
        groups=len(table.steps),
        groups_split=int(grouped.split.sum()),
        grouped_topup_epochs=int(table.topup_steps.sum()) / spe,
        grouped_chips_meeting_target=int(chips.grouped_meets_target.sum()),
        grouped_savings_fraction=_fraction(fixed_epochs - steps / spe, fixed_epochs),
        grouped_savings_vs_reduce=reduce_epochs - steps / spe,
    )
