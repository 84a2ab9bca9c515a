"""Top-ups: increments until the target is met, up to the cap, never past it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reduce_jax import data as data_lib
from reduce_jax.engine import population, train
from reduce_jax.hardware import faults
from reduce_jax.stages import retraining


@pytest.mark.parametrize(
    "size, calls",
    [
        # Every chip still below the target fits in one batch: one call per round.
        (6, [([0, 1, 2, 5], 2), ([1, 2], 2), ([1, 2], 2), ([2], 1)]),
        # Batches of 2: round 0 takes two calls, then the two chips left fill one.
        (2, [([0, 1], 2), ([2, 5], 2), ([1, 2], 2), ([1, 2], 2), ([2], 1)]),
    ],
)
def test_top_ups_stop_at_the_first_increment_that_meets_the_target(monkeypatch, size, calls):
    """Chip 0 meets the target after 1 increment, chip 1 after 3, chip 2 never (it stops
    at the cap, the last increment cut to fit), chip 3 already meets it, chip 4 is not
    retrained, and chip 5 diverges in its first increment. Each round gives every chip
    still below the target one increment, ``size`` chips at a time."""
    need = np.array([2, 6, 100, 0, 0, 100])  # steps of top-up each chip needs
    runs = []

    def run_phase(trainer, states, masks, data, key, phase_steps, **kwargs):
        chip = np.asarray(states.params["chip"])
        steps = np.asarray(phase_steps)
        assert (steps == steps[0]).all() and len(chip) in (1, 4, size)
        runs.append((sorted(set(chip.tolist())), int(steps[0])))
        return states.replace(
            step=states.step + jnp.asarray(phase_steps, jnp.int32),
            diverged=states.diverged | jnp.asarray(chip == 5),
        )

    def evaluate(trainer, states, masks, data, ids=None):
        chip = np.asarray(states.params["chip"])
        acc = np.where(np.asarray(states.step) >= need[chip], 0.95, 0.5)
        return acc if ids is None else acc[ids]

    monkeypatch.setattr(population, "run_phase", run_phase)
    monkeypatch.setattr(population, "evaluate", evaluate)
    n = len(need)
    states = train.ChipState(
        params={"chip": jnp.arange(n)},
        batch_stats={},
        opt_state={},
        step=jnp.zeros(n, jnp.int32),
        budget=jnp.zeros(n, jnp.int32),
        diverged=jnp.zeros(n, bool),
    )
    ctx = population.Context(None, None, None, 10, n)
    policy = retraining.Verification(0.9, 0.9, topup_steps=2, max_topup_steps=7)
    after = np.array([0.5, 0.5, 0.5, 0.95, 0.5, 0.5])
    retrained = np.array([True, True, True, True, False, True])
    key = jax.random.key(0)
    states, after, topup = retraining.top_up(ctx, policy, states, None, after, retrained, key, size)
    assert runs == calls
    assert topup.tolist() == [2, 6, 7, 0, 0, 2]
    assert after.tolist() == [0.95, 0.95, 0.5, 0.95, 0.5, 0.5]
    assert np.asarray(states.budget).tolist() == [2, 6, 7, 0, 0, 2]
    assert np.asarray(states.params["chip"]).tolist() == list(range(n))  # back in place


KEY = jax.random.key(11)  # the top-ups' batch order


def _topup_setup(trainer, params, data, increments, inc):
    """One faulty chip of the tiny MLP; its accuracy after each of ``increments`` top-up
    increments of ``inc`` steps, run as ``top_up`` runs them (round r: ``fold_in(key, r)``)."""
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(5), 1, 8, 8, 0.2))
    states, masks = population.init_chunk(trainer, params, maps, np.zeros(1, np.int64))
    acc = [population.evaluate(trainer, states, masks, data)[0]]
    for r in range(increments):
        states = states.replace(budget=states.budget + inc)
        key = jax.random.fold_in(KEY, r)
        states = population.run_phase(trainer, states, masks, data, key, np.full(1, inc))
        acc.append(population.evaluate(trainer, states, masks, data)[0])
    return maps, np.array(acc)


def test_top_ups_of_a_trained_chip_stop_once_it_meets_the_target(
    digits, tiny_mlp, tiny_mlp_variables
):
    """A real chip (tiny MLP on digits, from an untrained start): with the target between
    its accuracy after 1 and after 2 increments, it gets exactly 2; with a target it never
    reaches, it stops at the cap."""
    data = population.DeviceData.from_dataset(data_lib.split_validation(digits, 0.1))
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    inc = 4
    maps, acc = _topup_setup(trainer, tiny_mlp_variables, data, 3, inc)
    assert acc[2] > acc[1] > acc[0], acc  # training helps, so a target fits in between
    for target, rounds in [((acc[1] + acc[2]) / 2, 2), ((acc[0] + acc[1]) / 2, 1), (1.01, 3)]:
        ctx = population.Context(trainer, tiny_mlp_variables, data, 45, 1)
        policy = retraining.Verification(target, target, inc, 3 * inc)
        states, masks = population.init_chunk(trainer, tiny_mlp_variables, maps, np.zeros(1))
        states, after, topup = retraining.top_up(
            ctx, policy, states, masks, acc[:1], np.array([True]), KEY
        )
        assert topup.tolist() == [rounds * inc], (target, acc)
        np.testing.assert_allclose(after, acc[rounds], atol=1e-9)
        np.testing.assert_array_equal(states.step, rounds * inc)


def test_retrain_evaluates_chips_without_steps_once(digits, tiny_mlp, tiny_mlp_variables):
    """Chips selected for 0 steps, or not retrained, keep their accuracy before; the others'
    accuracy after is their trained model's (evaluated on the chunk's trained chips only)."""
    data = population.DeviceData.from_dataset(data_lib.split_validation(digits, 0.1))
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(8), 5, 8, 8, 0.3))
    ctx = population.Context(trainer, tiny_mlp_variables, data, 45, 5)
    policy = retraining.Verification(0.0, 0.0, 4, 0)
    steps = np.array([0, 6, 0, 3, 6])
    retrain = np.array([True, True, False, True, True])
    units = retraining.Units.of_groups([[i] for i in range(5)], steps, retrain)
    out = retraining.retrain(ctx, policy, units, maps, KEY)
    idle = units.steps == 0
    np.testing.assert_array_equal(out.accuracy_after[idle], out.accuracy_before[idle])
    states, masks = population.init_chunk(trainer, tiny_mlp_variables, maps, units.steps)
    keys = jax.random.split(KEY)
    states = population.run_phase(trainer, states, masks, data, keys[0], units.steps)
    every = population.evaluate(trainer, states, masks, data)
    np.testing.assert_allclose(out.accuracy_after[~idle], every[~idle], atol=1e-6)
    assert (out.accuracy_after[~idle] != out.accuracy_before[~idle]).any()


def test_pooled_top_ups_equal_top_ups_chunk_by_chunk(digits, tiny_mlp, tiny_mlp_variables):
    """Top-ups pooled over 3 chunks of 2 chips give every chip the same top-ups and the same
    accuracies as top-ups chunk by chunk: a chip's ``r``-th increment runs on the batches of
    ``fold_in(key, r)``, whichever chips share its batch."""
    data = population.DeviceData.from_dataset(data_lib.split_validation(digits, 0.1))
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(9), 6, 8, 8, 0.3))
    units = retraining.Units.of_groups([[i] for i in range(6)], np.full(6, 2), True)

    def run(target, pool):
        ctx = population.Context(trainer, tiny_mlp_variables, data, 45, 2)
        policy = retraining.Verification(target, target, 2, 8, pool)
        return retraining.retrain(ctx, policy, units, maps, KEY)

    # A target between the chips' accuracies after their 2 steps: some need top-ups.
    target = float(np.median(run(0.0, 1).accuracy_after)) + 1e-9
    chunked = run(target, 1)
    assert 0 < (chunked.topup_steps > 0).sum() < 6, chunked.topup_steps
    # One pool of 3 chunks; pools of 2 chunks (the second one padded to whole chunks).
    for pooled in (run(target, 3), run(target, 2)):
        np.testing.assert_array_equal(pooled.topup_steps, chunked.topup_steps)
        np.testing.assert_array_equal(pooled.accuracy_after, chunked.accuracy_after)
        np.testing.assert_array_equal(pooled.test_accuracy_after, chunked.test_accuracy_after)


def test_fused_maps_are_the_union_of_the_members_maps():
    chip_maps = np.zeros((3, 2, 2), bool)
    chip_maps[0, 0, 0] = chip_maps[1, 1, 1] = chip_maps[2, 0, 1] = True
    members = np.array([[0, 1], [2, -1], [-1, -1]])
    fused = retraining.fused_maps(chip_maps, members)
    np.testing.assert_array_equal(fused[0], chip_maps[0] | chip_maps[1])
    np.testing.assert_array_equal(fused[1], chip_maps[2])
    assert not fused[2].any()  # no members: fault-free (a padding unit)
