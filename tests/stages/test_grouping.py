"""Fusion of fault maps, rewards and the grouping search (eFAT), on hand-made maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reduce_jax import pipeline
from reduce_jax.engine import population, train
from reduce_jax.hardware import systolic
from reduce_jax.nets import models
from reduce_jax.stages import grouping, resilience, retraining

ROWS = COLS = 4
W_PE = np.full((ROWS, COLS), 1.0 / (ROWS * COLS))


def single_fault_maps(positions):
    """One map per position, with that one PE faulty."""
    maps = np.zeros((len(positions), ROWS, COLS), bool)
    for i, (r, c) in enumerate(positions):
        maps[i, r, c] = True
    return maps


def test_fuse_is_the_union_and_a_superset_of_every_member():
    maps = np.random.default_rng(0).random((5, ROWS, COLS)) < 0.2
    fused = np.asarray(grouping.fuse(maps))
    np.testing.assert_array_equal(fused, maps.any(0))
    for m in maps:
        assert not (m & ~fused).any()


def test_group_reward_by_hand():
    assert grouping.group_reward(np.array([3.0, 3.0]), 4.0) == 2.0
    assert grouping.group_reward(np.array([1.0, 1.0]), 4.0) == -2.0
    assert grouping.group_reward(np.array([3.0, 3.0]), np.inf) == -np.inf


def test_amount_fn_reads_the_map():
    grid = np.array([0.0, 0.1, 0.2, 0.3])
    amount = grouping.amount_fn(grid, np.array([0.0, 2.0, 5.0, np.inf]), "conservative")
    np.testing.assert_array_equal(
        amount(np.array([0.0, 0.05, 0.1, 0.15, 0.25, 0.35])), [0, 2, 2, 5, np.inf, np.inf]
    )


def test_rewards_on_a_hand_made_map():
    # 1, 2, 3 faulty PEs of 16 need 4, 4, 4 steps; 4 or more are unrecoverable.
    grid = np.arange(5) / 16
    amount = grouping.amount_fn(grid, np.array([0, 4, 4, 4, np.inf]), "conservative")
    maps = single_fault_maps([(0, 0), (1, 1), (2, 2), (3, 3)])
    rates = grouping.fused_rates(maps, W_PE, [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 0]])
    np.testing.assert_allclose(rates, [1 / 16, 2 / 16, 3 / 16, 4 / 16, 1 / 16])
    fused = amount(rates)
    assert grouping.group_reward(np.array([4, 4]), fused[1]) == 4
    assert grouping.group_reward(np.array([4, 4, 4]), fused[2]) == 8
    assert grouping.group_reward(np.array([4, 4, 4, 4]), fused[3]) == -np.inf
    # Overlapping maps fuse to less than the sum of their rates.
    overlap = single_fault_maps([(0, 0), (0, 0)])
    assert grouping.fused_rates(overlap, W_PE, [[0, 1]])[0] == pytest.approx(1 / 16)


def test_greedy_packs_groups_up_to_the_largest_servable_rate():
    grid = np.arange(5) / 16
    required = np.array([0, 4, 4, 4, np.inf])
    amount = grouping.amount_fn(grid, required, "conservative")
    maps = single_fault_maps([(0, 0), (1, 1), (2, 2), (3, 3), (0, 1), (1, 0)])
    groups = grouping.greedy_groups(maps, W_PE, amount, required, max_group_size=8)
    assert sorted(len(g) for g in groups) == [3, 3]  # a 4th fault is unrecoverable
    assert grouping.plan_steps(maps, W_PE, amount, groups) == 8  # vs 24 per chip
    # The size cap holds.
    capped = grouping.greedy_groups(maps, W_PE, amount, required, max_group_size=2)
    assert sorted(len(g) for g in capped) == [2, 2, 2]


def test_greedy_looks_past_a_merge_that_saves_nothing():
    # Two chips fuse to a map needing 8 = 4 + 4: no saving; the third chip rides free.
    grid = np.arange(5) / 16
    required = np.array([0, 4, 8, 8, np.inf])
    amount = grouping.amount_fn(grid, required, "conservative")
    maps = single_fault_maps([(0, 0), (1, 1), (2, 2)])
    groups = grouping.greedy_groups(maps, W_PE, amount, required, max_group_size=8)
    assert groups == [[0, 1, 2]]
    assert grouping.plan_steps(maps, W_PE, amount, groups) == 8  # vs 12 per chip


def test_chips_needing_nothing_stay_alone():
    grid = np.arange(5) / 16
    required = np.array([0, 0, 4, 4, np.inf])
    amount = grouping.amount_fn(grid, required, "conservative")
    maps = single_fault_maps([(0, 0), (1, 1), (2, 2)])  # each needs 0
    groups = grouping.greedy_groups(maps, W_PE, amount, required, max_group_size=8)
    assert groups == [[0], [1], [2]]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    chips=st.integers(1, 24),
    rate=st.floats(0.0, 0.3),
    steps=st.lists(st.integers(0, 6), min_size=5, max_size=5),
    unrecoverable_from=st.integers(2, 5),
    max_group_size=st.integers(1, 6),
    interpolation=st.sampled_from(["conservative", "linear"]),
)
def test_greedy_plan_never_costs_more_than_per_chip(
    seed, chips, rate, steps, unrecoverable_from, max_group_size, interpolation
):
    rng = np.random.default_rng(seed)
    grid = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    required = np.cumsum(steps).astype(np.float64)  # non-decreasing, like a map
    required[unrecoverable_from:] = np.inf
    amount = grouping.amount_fn(grid, required, interpolation)
    maps = rng.random((chips, ROWS, COLS)) < rate
    weights = rng.random((ROWS, COLS))
    weights /= weights.sum()
    servable = np.isfinite(amount(np.asarray(systolic.fault_rate(weights, maps), np.float64)))
    maps = maps[servable]
    groups = grouping.greedy_groups(maps, weights, amount, required, max_group_size)
    # A partition of the chips.
    assert sorted(i for g in groups for i in g) == list(range(len(maps)))
    assert all(1 <= len(g) <= max(max_group_size, 1) for g in groups)
    fused = amount(grouping.fused_rates(maps, weights, groups))
    assert np.all(np.isfinite(fused))  # never an unrecoverable or above-grid group
    per_chip = grouping.plan_steps(maps, weights, amount, [[i] for i in range(len(maps))])
    assert fused.sum() <= per_chip + 1e-9
    for g, f in zip(groups, fused, strict=True):  # every group of 2+ saves something
        if len(g) > 1:
            assert (
                grouping.group_reward(
                    amount(grouping.fused_rates(maps, weights, [[i] for i in g])), f
                )
                > 0
            )


def test_model_retrained_on_fused_map_gives_identical_outputs_on_every_member(
    digits, digits_device
):
    rng = np.random.default_rng(1)
    maps = rng.random((3, 8, 8)) < 0.15
    fused = np.asarray(grouping.fuse(maps))
    model = models.MLP(num_classes=10, hidden=(16,))  # kernels [64, 16] and [16, 10]
    variables = jax.tree.map(
        np.asarray, models.init_variables(model, jax.random.key(0), digits.image_shape)
    )
    trainer = train.make_trainer(model, train.make_optimizer("adam", 3e-3), 32)
    states, masks = population.init_chunk(trainer, variables, fused[None], np.array([20]))
    data = digits_device
    states = trainer.run(
        states, masks, data.train_images, data.train_labels, jax.random.key(2), 0, 20
    )
    trained = jax.tree.map(lambda x: x[0], states.params)
    x = jnp.asarray(digits.test_images[:64])

    def outputs(fault_map):
        mask = systolic.weight_masks(trained, jnp.asarray(fault_map))
        return np.asarray(model.apply({"params": train.apply_mask(trained, mask)}, x))

    # Retraining moved the weights, and the fused map's weights are still exactly zero.
    fused_mask = systolic.weight_masks(trained, jnp.asarray(fused))
    for w, w0, m in zip(
        jax.tree.leaves(trained),
        jax.tree.leaves(variables["params"]),
        jax.tree.leaves(fused_mask),
        strict=True,
    ):
        assert np.all(np.asarray(w)[np.asarray(m) == 0] == 0)
        assert not np.allclose(
            np.asarray(w)[np.asarray(m) == 1], np.asarray(w0)[np.asarray(m) == 1]
        )
    on_fused = outputs(fused)
    for m in maps:
        np.testing.assert_array_equal(outputs(m), on_fused)


def outcome(groups, steps, topup, meets, retrained=True):
    """A hand-made ``ChipOutcome`` of units ``groups`` (lists of chip ids)."""
    n, width = len(groups), max(len(g) for g in groups)
    members = np.full((n, width), -1)
    for i, g in enumerate(groups):
        members[i, : len(g)] = g
    meets = np.broadcast_to(meets, (n,))
    acc = np.where(meets, 0.95, 0.5)
    return retraining.ChipOutcome(
        members=members,
        steps=np.where(retrained, steps, 0),
        retrained=np.broadcast_to(retrained, (n,)).copy(),
        accuracy_before=np.full(n, 0.1),
        accuracy_after=acc,
        test_accuracy_after=acc - 0.01,
        topup_steps=np.asarray(topup),
        diverged=np.zeros(n, bool),
        member_accuracy=np.where(members >= 0, acc[:, None], np.nan),
        meets_target=meets.copy(),
    )


def run_grouped_with(monkeypatch, groups, group_outcome, per_chip, num_chips):
    """``grouping.run_grouped`` with the groups' retraining replaced by ``group_outcome``."""
    calls = []

    def retrain(ctx, policy, units, chip_maps, key, store=None, stage="retrain", sink=None):
        calls.append((units.members.tolist(), units.steps.tolist(), stage))
        return group_outcome

    monkeypatch.setattr(retraining, "retrain", retrain)
    plan = grouping.GroupPlan(groups, np.array([6, 5][: len(groups)]))
    maps = np.zeros((num_chips, ROWS, COLS), bool)
    rmap = resilience.ResilienceMap({"pe": W_PE}, {}, "pe", None, None, None, None, None)
    out = grouping.run_grouped(None, None, maps, plan, per_chip, rmap, None)
    return out, calls


def test_a_group_that_misses_the_target_is_split_and_its_chips_serve_alone(monkeypatch):
    groups = [[0, 2], [3, 4]]
    group_outcome = outcome(groups, [6, 5], [4, 0], [False, True])
    per_chip = outcome(
        [[c] for c in range(6)],
        [3, 3, 4, 3, 3, 0],
        [0, 2, 0, 0, 0, 0],
        True,
        retrained=np.array([True] * 5 + [False]),  # chip 5: the map cannot serve it
    )
    out, calls = run_grouped_with(monkeypatch, groups, group_outcome, per_chip, 6)
    assert calls == [([[0, 2], [3, 4]], [6, 5], "grouped")]  # groups of 2+ only, once
    t = out.retrainings
    members = [m[m >= 0].tolist() for m in t.members]
    assert members == [[0, 2], [3, 4], [0], [1], [2]]  # chip 5 is not retrained
    assert out.split.tolist() == [True, False, False, False, False]
    assert out.split_from.tolist() == [-1, -1, 0, -1, 0]
    # Every retraining counts: the failed group, the members that then served alone.
    assert int((t.steps + t.topup_steps).sum()) == (6 + 4) + 5 + 3 + (3 + 2) + 4
    assert out.served_by.tolist() == [2, 3, 4, 1, 1, -1]
    assert t.topup_steps.tolist() == [4, 0, 0, 2, 0]


def test_chips_are_served_by_their_group_or_their_own_retraining(monkeypatch):
    groups = [[0, 2], [3, 4]]
    group_outcome = outcome(groups, [6, 5], [4, 0], [False, True])
    group_outcome.member_accuracy[1] = [0.97, 0.96]  # chips 3 and 4 on group 1's model
    per_chip = outcome([[c] for c in range(5)], [3] * 5, [0] * 5, True)
    out, _ = run_grouped_with(monkeypatch, groups, group_outcome, per_chip, 5)
    assert out.served_by.tolist() == [2, 3, 4, 1, 1]
    assert out.accuracy_after.tolist() == [0.95, 0.95, 0.95, 0.97, 0.96]
    assert out.retrainings.member_accuracy.shape == (5, 2)  # widened to the widest group
    assert np.isnan(out.retrainings.member_accuracy[2:, 1]).all()


def test_plan_groups_maps_back_to_chip_ids_around_unservable_chips():
    grid = np.arange(5) / 16
    required = np.array([0, 4, 4, 4, np.inf])
    amount = grouping.amount_fn(grid, required, "conservative")
    maps = single_fault_maps([(0, 0), (0, 0), (1, 1), (2, 2), (3, 3)])
    maps[1] = True  # chip 1: every PE faulty, cannot be served
    ok = np.array([True, False, True, True, True])
    plan = grouping.plan_groups(maps, ok, W_PE, amount, required, 8)
    assert plan.groups == [[0, 2, 3]]  # 3 faults fit, a 4th would not; 1 and 4 alone
    assert plan.steps.tolist() == [4]
    assert grouping.plan_groups(maps, ok, W_PE, amount, required, 2).groups == [[0, 2], [3, 4]]


@pytest.mark.slow
def test_groups_that_miss_the_target_are_split_end_to_end(tmp_path, monkeypatch, small_run_config):
    """Sabotaged group retraining (it diverges): every group is split, its chips are served
    by their own retraining, and the failed groups' steps still count."""
    cfg = small_run_config(
        str(tmp_path / "w"), chip_fault_rate=0.1, baseline_epochs=10, grouping="greedy"
    )
    original_retrain, original_init = retraining.retrain, population.init_chunk

    def diverging_init(trainer, variables, maps, budgets):
        states, masks = original_init(trainer, variables, maps, budgets)
        lr = states.opt_state.hyperparams["learning_rate"]
        states.opt_state.hyperparams["learning_rate"] = lr * 0 + 1e30
        return states, masks

    def retrain(*args, stage="retrain", **kwargs):
        if stage == "grouped":
            monkeypatch.setattr(population, "init_chunk", diverging_init)
        try:
            return original_retrain(*args, stage=stage, **kwargs)
        finally:
            monkeypatch.setattr(population, "init_chunk", original_init)

    monkeypatch.setattr(retraining, "retrain", retrain)
    s = pipeline.run(cfg).to_json()
    groups, chips, cost = s["groups"], s["chips"], s["cost"]
    multi = [g for g in groups if len(g["members"]) > 1]
    assert multi and all(g["split"] and g["diverged"] for g in multi)
    assert cost["groups_split"] == len(multi)
    for g in multi:
        for chip in g["members"]:
            serving = groups[chips[chip]["group"]]
            assert serving["members"] == [chip] and serving["split_from"] == g["group"]
            assert chips[chip]["grouped_meets_target"] == chips[chip]["meets_target"]
    assert cost["grouped_chips_meeting_target"] == cost["chips_meeting_target"]
    total = sum(g["amount_steps"] + g["topup_steps"] for g in groups)
    assert cost["grouped_steps"] == total
    wasted = sum(g["amount_steps"] for g in multi)
    assert cost["grouped_steps"] == cost["reduce_steps"] + wasted


def test_groups_of_mixed_sizes_serve_their_members_from_the_first_group_on(monkeypatch):
    # A group of three (the first: unit 0), a group of two; chip 5 alone. Chip 1 diverged in
    # its own retraining, which the group replaces.
    groups = [[0, 1, 2], [3, 4]]
    maps = np.zeros((6, ROWS, COLS), bool)
    for chip, (r, c) in enumerate([(0, 0), (0, 1), (1, 1), (2, 2), (2, 3), (3, 3)]):
        maps[chip, r, c] = True
    group_outcome = outcome(groups, [6, 5], [0, 2], [True, True])
    group_outcome.member_accuracy[0] = [0.91, 0.92, 0.93]
    group_outcome.member_accuracy[1, :2] = [0.94, 0.96]
    per_chip = outcome([[c] for c in range(6)], [3] * 6, [0] * 6, True)
    per_chip.diverged[1] = True
    alone_accuracy = per_chip.accuracy_after.copy()
    calls, key, store = [], object(), object()

    def retrain(ctx, policy, units, chip_maps, k, s=None, stage="retrain", sink=None):
        calls.append((chip_maps, k, s, units.members.tolist(), stage))
        return group_outcome

    monkeypatch.setattr(retraining, "retrain", retrain)
    plan = grouping.GroupPlan(groups, np.array([6, 5]))
    weights = {"pe": W_PE, "half": np.where(np.arange(ROWS)[:, None] < 2, 1 / 8, 0.0) + 0 * W_PE}
    rmap = resilience.ResilienceMap(weights, {}, "half", None, None, None, None, None)
    out = grouping.run_grouped(None, None, maps, plan, per_chip, rmap, key, store)
    ((chip_maps, k, s, members, stage),) = calls
    assert chip_maps is maps and k is key and s is store and stage == "grouped"
    assert members == [[0, 1, 2], [3, 4, -1]]
    assert out.served_by.tolist() == [0, 0, 0, 1, 1, 2]
    np.testing.assert_allclose(out.accuracy_after, [0.91, 0.92, 0.93, 0.94, 0.96, 0.95])
    assert out.diverged.tolist() == [False] * 6  # chip 1 is served by its group
    np.testing.assert_array_equal(per_chip.accuracy_after, alone_accuracy)  # not written to
    assert out.retrainings.members.shape == (3, 3)
    np.testing.assert_allclose(out.fused_pe_rate, [3 / 16, 2 / 16, 1 / 16])
    np.testing.assert_allclose(out.fused_rate, [3 / 8, 0.0, 0.0])  # rows 0-1 count only
    assert out.split.tolist() == [False] * 3 and out.split_from.tolist() == [-1] * 3


def test_a_chip_needing_nothing_never_joins_a_group_even_for_free():
    # Chip 2 has no fault: adding it to the group of chips 0 and 1 changes nothing (its rate
    # is 0), but it needs no retraining, so it stays alone.
    grid = np.arange(5) / 16
    required = np.array([0, 4, 4, 4, np.inf])
    amount = grouping.amount_fn(grid, required, "conservative")
    maps = single_fault_maps([(0, 0), (1, 1), (0, 0)])
    maps[2] = False
    assert grouping.greedy_groups(maps, W_PE, amount, required, max_group_size=8) == [[0, 1], [2]]


def test_chips_needing_a_single_step_are_grouped():
    grid = np.arange(5) / 16
    required = np.array([0, 1, 1, 1, np.inf])
    amount = grouping.amount_fn(grid, required, "conservative")
    maps = single_fault_maps([(0, 0), (1, 1)])
    groups = grouping.greedy_groups(maps, W_PE, amount, required, max_group_size=8)
    assert groups == [[0, 1]] and grouping.plan_steps(maps, W_PE, amount, groups) == 1


def test_amount_fn_gives_float64_steps_and_inf_where_not_served():
    amount = grouping.amount_fn(np.array([0.0, 0.1]), np.array([3.0, np.inf]), "linear")
    steps = amount(np.array([0.0, 0.05, 0.2]))
    assert steps.dtype == np.float64
    np.testing.assert_array_equal(steps, [3.0, np.inf, np.inf])
