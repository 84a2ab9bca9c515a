"""Chip records and cost accounting on hand-made results."""

import numpy as np
import pytest

from reduce_jax import cost, resilience

SPE = 10  # steps per epoch


def records(target=0.9):
    status = np.array(
        [
            resilience.OK,
            resilience.OK,
            resilience.OK,
            resilience.UNRECOVERABLE,
            resilience.ABOVE_GRID,
            resilience.OK,
        ]
    )
    budgets = np.array([5, 10, 20, 0, 0, 10])
    result = dict(
        accuracy_before=np.array([0.8, 0.7, 0.5, 0.2, 0.1, 0.6]),
        accuracy_after=np.array([0.95, 0.91, 0.85, 0.2, 0.1, 0.99]),
        topup_steps=np.array([0, 5, 10, 0, 0, 0]),
        diverged=np.array([False, False, False, False, False, True]),
    )
    pe = np.linspace(0.0, 0.5, 6)
    return cost.chip_records(dict(pe=pe, effective=pe * 0.9), status, budgets, result, target, SPE)


def test_chip_statuses_and_amounts():
    recs = records()
    assert [r["status"] for r in recs] == [
        "ok",
        "ok",
        "missed_target",
        "unrecoverable",
        "above_grid",
        "diverged",
    ]
    assert [r["meets_target"] for r in recs] == [True, True, False, False, False, False]
    assert [r["selected_epochs"] for r in recs] == [0.5, 1.0, 2.0, None, None, 1.0]
    assert [r["topup_epochs"] for r in recs] == [0.0, 0.5, 1.0, 0.0, 0.0, 0.0]
    assert set(r["status"] for r in recs) <= set(cost.CHIP_STATUSES)


def test_cost_summary_by_hand():
    c = cost.cost_summary(
        records(), fixed_epochs_per_chip=4.0, analysis_epochs=30.0, steps_per_epoch=SPE
    )
    # selected 5+10+20+10 = 45 steps, top-ups 15 steps: 6 epochs
    assert c["reduce_steps"] == 60 and c["reduce_epochs"] == pytest.approx(6.0)
    assert c["fixed_epochs"] == 24.0 and c["savings"] == pytest.approx(18.0)
    assert c["savings_fraction"] == pytest.approx(0.75)
    assert c["fixed_epochs_recoverable"] == 16.0  # the 4 retrained chips
    assert c["savings_recoverable"] == pytest.approx(10.0)
    assert c["topup_epochs"] == pytest.approx(1.5)
    assert (
        c["chips_meeting_target"],
        c["chips_unrecoverable"],
        c["chips_missing_target"],
        c["chips_diverged"],
    ) == (2, 2, 1, 1)
    # per chip: 4 - 6/6 = 3 epochs saved; 30 / 3 = 10 chips to break even
    assert c["break_even_chips"] == 10


def test_no_break_even_when_reduce_saves_nothing():
    c = cost.cost_summary(
        records(), fixed_epochs_per_chip=0.5, analysis_epochs=30.0, steps_per_epoch=SPE
    )
    assert c["savings"] < 0 and c["break_even_chips"] is None


def test_all_unrecoverable():
    recs = [
        dict(
            r,
            status="unrecoverable",
            selected_steps=None,
            selected_epochs=None,
            topup_steps=0,
            topup_epochs=0.0,
            meets_target=False,
        )
        for r in records()
    ]
    c = cost.cost_summary(recs, 4.0, 30.0, SPE)
    assert c["reduce_epochs"] == 0 and c["fixed_epochs_recoverable"] == 0
    assert c["savings_fraction_recoverable"] is None and c["chips_unrecoverable"] == len(recs)


def test_no_chips():
    with pytest.raises(ValueError):
        cost.cost_summary([], 4.0, 30.0, SPE)


def test_grouped_cost_counts_every_group_and_split():
    status = np.array([resilience.OK, resilience.OK, resilience.UNRECOVERABLE])
    result = dict(
        accuracy_before=np.array([0.5, 0.6, 0.1]),
        accuracy_after=np.array([0.95, 0.85, 0.1]),
        topup_steps=np.array([0, 10, 0]),
        diverged=np.zeros(3, bool),
    )
    grouped = dict(accuracy_after=np.array([0.93, 0.93, 0.1]), diverged=np.zeros(3, bool))
    recs = cost.chip_records(
        dict(pe=np.array([0.1, 0.2, 0.6])),
        status,
        np.array([5, 10, 0]),
        result,
        0.9,
        SPE,
        {0: 2, 1: 2},
        grouped,
    )
    assert [r["group"] for r in recs] == [2, 2, None]
    assert [r["grouped_meets_target"] for r in recs] == [True, True, False]
    assert [r["meets_target"] for r in recs] == [True, False, False]
    assert recs[2]["grouped_accuracy_after"] is None
    groups = [
        dict(amount_steps=10, topup_steps=5, split=True),  # a group that missed, then split
        dict(amount_steps=5, topup_steps=0, split=False),
        dict(amount_steps=10, topup_steps=0, split=False),
    ]
    c = cost.cost_summary(recs, 2.0, 12.0, SPE, groups)
    assert c["grouped_steps"] == 30 and c["grouped_epochs"] == pytest.approx(3.0)
    assert c["grouped_planned_epochs"] == pytest.approx(2.5)
    assert c["grouped_topup_epochs"] == pytest.approx(0.5)
    assert (c["groups"], c["groups_split"]) == (3, 1)
    assert c["reduce_epochs"] == pytest.approx(2.5)  # 5 + 10 selected, 10 top-up steps
    assert c["reduce_planned_epochs"] == pytest.approx(1.5)
    assert c["grouped_savings_vs_reduce"] == pytest.approx(-0.5)
    assert (c["chips_meeting_target"], c["grouped_chips_meeting_target"]) == (1, 2)
    plain = cost.cost_summary(records(), 2.0, 12.0, SPE)
    assert plain["grouped_epochs"] is None and plain["groups"] is None
