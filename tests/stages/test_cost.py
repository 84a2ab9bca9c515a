"""Chip results and cost accounting on hand-made results."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reduce_jax.stages import cost, grouping, resilience, retraining

SPE = 10  # steps per epoch


def outcome(accuracy_before, accuracy_after, topup_steps, diverged, steps, retrained):
    n = len(steps)
    return retraining.ChipOutcome(
        members=np.arange(n)[:, None],
        steps=np.asarray(steps),
        retrained=np.asarray(retrained),
        accuracy_before=np.asarray(accuracy_before),
        accuracy_after=np.asarray(accuracy_after),
        test_accuracy_after=np.asarray(accuracy_after),
        topup_steps=np.asarray(topup_steps),
        diverged=np.asarray(diverged),
        member_accuracy=np.asarray(accuracy_after)[:, None],
        meets_target=np.zeros(n, bool),  # not read by chip_results
    )


def assignment(status, budgets, pe):
    steps = np.where(np.asarray(status) == resilience.OK, budgets, np.inf)
    return resilience.Assignment(
        rates=dict(pe=pe, effective=pe * 0.9), steps=steps, status=np.asarray(status)
    )


def results(target=0.9):
    status = [
        resilience.OK,
        resilience.OK,
        resilience.OK,
        resilience.UNRECOVERABLE,
        resilience.ABOVE_GRID,
        resilience.OK,
    ]
    budgets = np.array([5, 10, 20, 0, 0, 10])
    ok = np.array(status) == resilience.OK
    out = outcome(
        [0.8, 0.7, 0.5, 0.2, 0.1, 0.6],
        [0.95, 0.91, 0.85, 0.2, 0.1, 0.99],
        [0, 5, 10, 0, 0, 0],
        [False, False, False, False, False, True],
        np.where(ok, budgets, 0),
        ok,
    )
    return cost.chip_results(assignment(status, budgets, np.linspace(0.0, 0.5, 6)), out, target)


def test_chip_statuses_and_amounts():
    r = results()
    assert r.status.tolist() == [
        "ok",
        "ok",
        "missed_target",
        "unrecoverable",
        "above_grid",
        "diverged",
    ]
    assert r.meets_target.tolist() == [True, True, False, False, False, False]
    assert (r.selected_steps / SPE).tolist()[:3] == [0.5, 1.0, 2.0]
    assert r.selected_steps.tolist() == [5, 10, 20, -1, -1, 10]  # -1: not retrained
    assert (r.topup_steps / SPE).tolist() == [0.0, 0.5, 1.0, 0.0, 0.0, 0.0]
    assert set(r.status) <= set(cost.CHIP_STATUSES)
    assert r.group is None and r.grouped_meets_target is None


def test_validation_decisions_require_the_margin_and_the_test_set_only_the_target():
    # Validation accuracy after: 0.95, 0.91, 0.85, ...; decisions at 0.92, test judged at 0.9.
    status = [resilience.OK, resilience.OK]
    out = outcome([0.8, 0.7], [0.95, 0.91], [0, 5], [False, False], [5, 10], [True, True])
    a = assignment(status, np.array([5, 10]), np.array([0.0, 0.1]))
    r = cost.chip_results(a, out, 0.92, test_target=0.9)
    assert r.status.tolist() == ["ok", "missed_target"]
    assert r.meets_target.tolist() == [True, False]
    assert r.meets_target_test.tolist() == [True, True]
    same = cost.chip_results(a, out, 0.92)  # without a test target: the same target
    assert same.meets_target_test.tolist() == [True, False]


def test_cost_summary_by_hand():
    c = cost.summarize(
        results(), fixed_epochs_per_chip=4.0, analysis_epochs=30.0, steps_per_epoch=SPE
    )
    # selected 5+10+20+10 = 45 steps, top-ups 15 steps: 6 epochs
    assert c.reduce_steps == 60 and c.reduce_epochs == pytest.approx(6.0)
    assert c.fixed_epochs == 24.0 and c.savings == pytest.approx(18.0)
    assert c.savings_fraction == pytest.approx(0.75)
    assert c.fixed_epochs_recoverable == 16.0  # the 4 retrained chips
    assert c.savings_recoverable == pytest.approx(10.0)
    assert c.topup_epochs == pytest.approx(1.5)
    assert (
        c.chips_meeting_target,
        c.chips_unrecoverable,
        c.chips_missing_target,
        c.chips_diverged,
    ) == (2, 2, 1, 1)
    # The break-even is the comparison's (policies.compare, in compute epochs), not a second
    # figure in training epochs.
    assert "break_even_chips" not in c._fields


def test_a_chip_not_served_never_meets_the_target_whatever_its_accuracy():
    """Chips above the grid or unrecoverable are not retrained: even when their accuracy
    without retraining reads at or above the target, they do not count as meeting it."""
    status = [resilience.OK, resilience.ABOVE_GRID, resilience.UNRECOVERABLE]
    out = outcome(
        [0.95, 0.97, 0.96],
        [0.95, 0.97, 0.96],
        [0, 0, 0],
        [False] * 3,
        [0, 0, 0],
        [True, False, False],
    )
    a = assignment(status, np.zeros(3), np.array([0.0, 0.6, 0.3]))
    r = cost.chip_results(a, out, 0.9)
    assert r.status.tolist() == ["ok", "above_grid", "unrecoverable"]
    assert r.meets_target.tolist() == [True, False, False]
    assert r.meets_target_test.tolist() == [True, False, False]
    c = cost.summarize(r, 4.0, 30.0, SPE)
    assert c.chips_meeting_target + c.chips_unrecoverable == 3
    assert c.chips_meeting_target_test == 1


@given(
    analysis=st.floats(0.01, 1e4, allow_nan=False),
    saving=st.floats(1e-3, 1e3, allow_nan=False),
)
def test_break_even_is_the_least_population_that_pays_for_the_analysis(analysis, saving):
    n = cost.break_even_chips(analysis, saving)
    assert n * saving >= analysis * (1 - 1e-9)
    assert (n - 1) * saving < analysis


def test_break_even_rounds_up_between_whole_populations():
    # 30 / 4 = 7.5 chips: 7 chips save 28 < 30 epochs, 8 save 32.
    assert cost.break_even_chips(30.0, 4.0) == 8
    assert cost.break_even_chips(30.0, 3.0) == 10
    assert cost.break_even_chips(30.0, 0.0) is None


def test_all_unrecoverable():
    n = 6
    status = [resilience.UNRECOVERABLE] * n
    out = outcome([0.2] * n, [0.2] * n, [0] * n, [False] * n, [0] * n, [False] * n)
    r = cost.chip_results(assignment(status, np.zeros(n), np.linspace(0, 0.5, n)), out, 0.9)
    c = cost.summarize(r, 4.0, 30.0, SPE)
    assert c.reduce_epochs == 0 and c.fixed_epochs_recoverable == 0
    assert c.savings_fraction_recoverable is None and c.chips_unrecoverable == n


def test_no_chips():
    with pytest.raises(ValueError):
        cost.summarize(cost.ChipResults(*([np.zeros(0)] * 8)), 4.0, 30.0, SPE)


def test_grouped_cost_counts_every_group_and_split():
    status = [resilience.OK, resilience.OK, resilience.UNRECOVERABLE]
    per_chip = outcome(
        [0.5, 0.6, 0.1], [0.95, 0.85, 0.1], [0, 10, 0], [False] * 3, [5, 10, 0], [True, True, False]
    )
    # Retrainings: a group that missed, then split; a single chip; the serving group.
    table = outcome([0.5] * 3, [0.8, 0.9, 0.93], [5, 0, 0], [False] * 3, [10, 5, 10], [True] * 3)
    grouped = grouping.GroupedOutcome(
        retrainings=table,
        fused_pe_rate=np.zeros(3),
        fused_rate=np.zeros(3),
        split=np.array([True, False, False]),
        split_from=np.array([-1, 0, -1]),
        served_by=np.array([2, 2, -1]),
        accuracy_after=np.array([0.93, 0.93, 0.1]),
        diverged=np.zeros(3, bool),
    )
    a = assignment(status, np.array([5, 10, 0]), np.array([0.1, 0.2, 0.6]))
    r = cost.chip_results(a, per_chip, 0.9, grouped)
    assert r.group.tolist() == [2, 2, -1]
    assert r.grouped_meets_target.tolist() == [True, True, False]
    assert r.meets_target.tolist() == [True, False, False]
    assert np.isnan(r.grouped_accuracy_after[2])  # None in summary.json
    c = cost.summarize(r, 2.0, 12.0, SPE, grouped)
    assert c.grouped_steps == 30 and c.grouped_epochs == pytest.approx(3.0)
    assert c.grouped_planned_epochs == pytest.approx(2.5)
    assert c.grouped_topup_epochs == pytest.approx(0.5)
    assert (c.groups, c.groups_split) == (3, 1)
    assert c.reduce_epochs == pytest.approx(2.5)  # 5 + 10 selected, 10 top-up steps
    assert c.reduce_planned_epochs == pytest.approx(1.5)
    assert c.grouped_savings_vs_reduce == pytest.approx(-0.5)
    assert (c.chips_meeting_target, c.grouped_chips_meeting_target) == (1, 2)
    plain = cost.summarize(results(), 2.0, 12.0, SPE)
    assert plain.grouped_epochs is None and plain.groups is None


def test_an_accuracy_exactly_at_the_target_meets_it_on_every_split_and_in_groups():
    status = [resilience.OK, resilience.OK, resilience.OK]
    out = outcome([0.5] * 3, [0.9, 0.9, 0.899], [0] * 3, [False] * 3, [5] * 3, [True] * 3)
    grouped = grouping.GroupedOutcome(
        retrainings=outcome([0.5], [0.9], [0], [False], [5], [True]),
        fused_pe_rate=np.zeros(1),
        fused_rate=np.zeros(1),
        split=np.zeros(1, bool),
        split_from=np.array([-1]),
        served_by=np.array([0, 0, 0]),  # group 0 (the first) serves every chip
        accuracy_after=np.array([0.9, 0.9, 0.899]),
        diverged=np.zeros(3, bool),
    )
    a = assignment(status, np.array([5, 5, 5]), np.array([0.1, 0.1, 0.1]))
    r = cost.chip_results(a, out, 0.9, grouped, test_target=0.9)
    assert r.meets_target.tolist() == [True, True, False]
    assert r.meets_target_test.tolist() == [True, True, False]
    assert r.grouped_meets_target.tolist() == [True, True, False]
    assert r.status.tolist() == ["ok", "ok", "missed_target"]


def test_a_chip_no_group_serves_never_meets_the_grouped_target():
    # Chip 1 is not retrained (group -1), though the model it runs reads above the target.
    status = [resilience.OK, resilience.ABOVE_GRID]
    out = outcome([0.5, 0.95], [0.95, 0.95], [0, 0], [False] * 2, [5, 0], [True, False])
    grouped = grouping.GroupedOutcome(
        retrainings=outcome([0.5], [0.95], [0], [False], [5], [True]),
        fused_pe_rate=np.zeros(1),
        fused_rate=np.zeros(1),
        split=np.zeros(1, bool),
        split_from=np.array([-1]),
        served_by=np.array([0, -1]),
        accuracy_after=np.array([0.95, 0.95]),
        diverged=np.zeros(2, bool),
    )
    r = cost.chip_results(assignment(status, np.array([5, 0]), np.array([0.1, 0.7])), out, 0.9,
                          grouped)  # fmt: skip
    assert r.grouped_meets_target.tolist() == [True, False]
    assert r.grouped_accuracy_after[0] == 0.95 and np.isnan(r.grouped_accuracy_after[1])


def test_cost_of_small_fractions_of_an_epoch_and_a_chip_given_zero_steps():
    # Chip 0 is served with 0 steps (it meets the target as it is), chip 1 with 2 steps, chip
    # 2 is unrecoverable. Fixed retraining is 0.25 epochs per chip: every total is below 1.
    status = [resilience.OK, resilience.OK, resilience.UNRECOVERABLE]
    out = outcome([0.95, 0.5, 0.1], [0.95, 0.95, 0.1], [0, 1, 0], [False] * 3, [0, 2, 0],
                  [True, True, False])  # fmt: skip
    r = cost.chip_results(assignment(status, np.array([0, 2, 0]), np.zeros(3)), out, 0.9)
    assert r.selected_steps.tolist() == [0, 2, -1]
    c = cost.summarize(r, fixed_epochs_per_chip=0.25, analysis_epochs=3, steps_per_epoch=SPE)
    assert c.reduce_steps == 3 and c.reduce_epochs == pytest.approx(0.3)
    assert c.reduce_planned_epochs == pytest.approx(0.2)
    assert c.fixed_epochs == 0.75 and c.fixed_epochs_recoverable == 0.5  # chips 0 and 1
    assert c.savings_fraction == pytest.approx(0.45 / 0.75)
    assert c.savings_recoverable == pytest.approx(0.2)
    assert c.savings_fraction_recoverable == pytest.approx(0.2 / 0.5)
    assert c.chips_unrecoverable == 1 and c.chips_meeting_target == 2
    # Plain Python numbers, as summary.json writes them.
    assert type(c.fixed_epochs_per_chip) is float and c.fixed_epochs_per_chip == 0.25
    assert type(c.analysis_epochs) is float and c.analysis_epochs == 3.0
    assert type(c.steps_per_epoch) is int and c.steps_per_epoch == SPE


def test_grouped_savings_fraction_is_against_the_fixed_policy():
    status = [resilience.OK, resilience.OK]
    per_chip = outcome([0.5] * 2, [0.95] * 2, [0, 0], [False] * 2, [5, 5], [True] * 2)
    grouped = grouping.GroupedOutcome(
        retrainings=outcome([0.5], [0.95], [2], [False], [6], [True]),
        fused_pe_rate=np.zeros(1),
        fused_rate=np.zeros(1),
        split=np.zeros(1, bool),
        split_from=np.array([-1]),
        served_by=np.array([0, 0]),
        accuracy_after=np.array([0.95, 0.95]),
        diverged=np.zeros(2, bool),
    )
    r = cost.chip_results(assignment(status, np.array([5, 5]), np.zeros(2)), per_chip, 0.9,
                          grouped)  # fmt: skip
    c = cost.summarize(r, 2.0, 12.0, SPE, grouped)
    # 8 grouped steps = 0.8 epochs against 2 chips x 2 epochs.
    assert c.grouped_epochs == pytest.approx(0.8)
    assert c.grouped_savings_fraction == pytest.approx((4.0 - 0.8) / 4.0)
    assert c.grouped_savings_vs_reduce == pytest.approx(1.0 - 0.8)


def test_no_chips_names_the_problem():
    with pytest.raises(ValueError, match="^no chips$"):
        cost.summarize(cost.ChipResults(*([np.zeros(0)] * 8)), 4.0, 30.0, SPE)
