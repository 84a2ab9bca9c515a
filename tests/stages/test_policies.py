"""Reduce against the fixed, adaptive and oracle policies; evaluation counted as compute."""

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reduce_jax import pipeline
from reduce_jax.engine import population, train
from reduce_jax.hardware import faults
from reduce_jax.stages import cost, policies, resilience

TARGET = 0.9


def trajectory(val, steps, test=None):
    """An ``Analysis`` of chips ``val[chips, P]`` (K = 1) evaluated after ``steps[P]``."""
    val = np.asarray(val, np.float64)
    test = val if test is None else np.asarray(test, np.float64)
    return resilience.Analysis(
        accuracy=val[:, :, None],
        diverged=np.zeros((len(val), 1), bool),
        amount_epochs=np.asarray(steps, np.float64) / 10,
        amount_steps=np.asarray(steps),
        test_accuracy=test[:, :, None],
    )


def test_trajectory_points_cover_every_increment_the_cap_and_the_fixed_amount():
    points = policies.trajectory_points(
        topup_steps=3, cap_steps=10, fixed_steps=8, steps_per_epoch=2
    )
    np.testing.assert_array_equal(points * 2, [0, 3, 6, 8, 9, 10])


def test_adaptive_stops_at_the_first_increment_that_meets_the_target_or_at_the_cap():
    val = np.array([[0.95, 0.5, 0.5], [0.5, 0.8, 0.92], [0.5, 0.6, 0.7], [0.1, 0.95, 0.5]])
    np.testing.assert_array_equal(policies.adaptive_stops(val, TARGET), [0, 2, 2, 1])


def test_fixed_and_adaptive_policies_count_training_evaluations_and_successes():
    steps = [0, 5, 10, 15]
    val = [[0.95, 0.95, 0.95, 0.95], [0.5, 0.91, 0.92, 0.93], [0.5, 0.6, 0.7, 0.95]]
    test = [[0.95, 0.95, 0.95, 0.95], [0.5, 0.85, 0.92, 0.93], [0.5, 0.6, 0.7, 0.95]]
    traj = trajectory(val, steps, test)
    fixed = policies.fixed_policy(traj, 15, TARGET, TARGET)
    assert fixed == policies.Policy(3, 45, 3, 3, 3)
    # Adaptive with the cap at 10: chip 0 stops at 0, chip 1 at 5, chip 2 at the cap (missed).
    adaptive = policies.adaptive_policy(traj, 10, TARGET, TARGET)
    assert adaptive == policies.Policy(3, 0 + 5 + 10, 1 + 2 + 3, 2, 1)


def test_a_validation_margin_moves_where_adaptive_stops_and_the_test_set_keeps_the_target():
    steps = [0, 5, 10, 15]
    val = [[0.95, 0.95, 0.95, 0.95], [0.5, 0.91, 0.92, 0.93], [0.5, 0.6, 0.7, 0.95]]
    test = [[0.95, 0.95, 0.95, 0.95], [0.5, 0.85, 0.905, 0.93], [0.5, 0.6, 0.7, 0.95]]
    traj = trajectory(val, steps, test)
    # Decisions require 0.915: chip 1 now stops at 10 (0.92), where its test accuracy 0.905
    # meets the target 0.9 that the test set is judged against.
    adaptive = policies.adaptive_policy(traj, 10, TARGET + 0.015, TARGET)
    assert adaptive == policies.Policy(3, 0 + 10 + 10, 1 + 3 + 3, 2, 2)
    fixed = policies.fixed_policy(traj, 5, TARGET + 0.015, TARGET)
    assert fixed == policies.Policy(3, 15, 3, 1, 1)


def test_reduce_policy_verifies_served_chips_after_each_top_up_round():
    chips = cost.ChipResults(
        status=np.array(["ok", "ok", "unrecoverable"]),
        selected_steps=np.array([4, 0, -1]),
        topup_steps=np.array([7, 0, 0]),  # 3 rounds of at most 3 steps
        accuracy_before=np.zeros(3),
        accuracy_after=np.array([0.95, 0.92, 0.1]),
        meets_target=np.array([True, True, False]),
        test_accuracy_after=np.array([0.95, 0.85, 0.1]),
        meets_target_test=np.array([True, False, False]),
    )
    assert policies.reduce_policy(chips, 3) == policies.Policy(3, 11, 2 + 3, 2, 1)


@given(
    one_off=st.floats(0.1, 1e4),
    reduce_steps=st.integers(0, 10_000),
    extra=st.integers(1, 10_000),
    evals=st.integers(0, 50),
    chips=st.integers(1, 300),
)
def test_break_even_against_adaptive_is_the_least_population_that_pays(
    one_off, reduce_steps, extra, evals, chips
):
    """With ``n = break_even`` and per-chip saving ``s``: ``n*s >= A`` and ``(n-1)*s < A``."""
    compute = policies.Compute(step_flops=3.0, eval_flops=7.0, steps_per_epoch=10)
    reduce_ = policies.Policy(chips, reduce_steps, evals, 0, 0)
    adaptive = policies.Policy(chips, reduce_steps + extra, evals, 0, 0)
    analysis = trajectory(np.zeros((1, 2)), [0, 10])
    out = policies.compare(dict(adaptive=adaptive, reduce=reduce_), analysis, compute)
    a = compute.epochs(policies.analysis_policy(analysis).train_steps, 2)
    s = compute.epochs(extra, 0) / chips
    n = out.break_even_vs_adaptive
    assert n * s >= a * (1 - 1e-9) and (n - 1) * s < a
    worse = policies.compare(dict(adaptive=reduce_, reduce=adaptive), analysis, compute)
    assert worse.break_even_vs_adaptive is None


def test_measured_compute_matches_the_model_arithmetic(tiny_mlp, tiny_mlp_variables, digits_device):
    """MLP 64-16-10: a forward pass is about 2 * (64*16 + 16*10) flops per image."""
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 1e-3), 32)
    ctx = population.Context(trainer, tiny_mlp_variables, digits_device, 41, 8)
    c = policies.measure_compute(ctx, 32, 100)
    forward = 2 * (64 * 16 + 16 * 10)
    n_val = 200  # 144 images, in two batches of 100
    assert forward * n_val <= c.eval_flops <= 1.2 * forward * n_val
    assert 2 * forward * 32 <= c.step_flops <= 6 * forward * 32
    assert c.epochs(41, 0) == pytest.approx(1.0)


def test_a_chip_stopped_where_adaptive_stops_equals_its_trajectory(
    tiny_mlp, tiny_mlp_variables, digits_device
):
    """The trajectory stands in for every policy because a chip's trajectory does not depend
    on when it is stopped: retraining it alone to a point gives the trajectory's accuracy."""
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    ctx = population.Context(trainer, tiny_mlp_variables, digits_device, 41, 4)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(5), 3, 8, 8, 0.3))
    key = jax.random.key(9)
    traj = policies.run_trajectory(ctx, maps, np.array([0, 3, 6, 9]) / 41, key)
    states, masks = population.init_chunk(trainer, tiny_mlp_variables, maps[1:2], np.array([6]))
    states = population.run_phase(trainer, states, masks, digits_device, key, np.array([6]))
    for split, acc in (("val", traj.accuracy), ("test", traj.test_accuracy)):
        alone = population.evaluate(trainer, states, masks, digits_device, split)
        assert alone[0] == pytest.approx(acc[1, 2, 0], abs=1e-6)


@pytest.mark.slow
def test_a_validation_margin_raises_what_decisions_require_and_not_the_test_target(
    tmp_path, small_run_config
):
    """The same run with and without ``--validation_margin``: the analysis does not depend
    on the target, so the map can only ask more of every chip; every chip Reduce calls met
    reached the target plus the margin on validation; the test set keeps the target."""
    runs = {}
    for margin in (0.0, 0.03):
        cfg = small_run_config(str(tmp_path / f"m{margin}"), validation_margin=margin)
        runs[margin] = pipeline.run(cfg)
    plain, strict = runs[0.0], runs[0.03]
    assert strict.test_target == plain.test_target and plain.decision_target == plain.test_target
    assert strict.decision_target == pytest.approx(strict.test_target + 0.03)
    np.testing.assert_array_equal(strict.analysis.accuracy, plain.analysis.accuracy)
    assert np.all(strict.rmap.required_steps >= plain.rmap.required_steps)
    served = strict.assignment.ok & plain.assignment.ok
    assert np.all(strict.assignment.steps[served] >= plain.assignment.steps[served])
    ch = strict.chips
    ok = ch.status == "ok"
    assert np.all(ch.accuracy_after[ok] >= strict.decision_target)
    assert np.array_equal(ch.meets_target, (ch.accuracy_after >= strict.decision_target))
    assert np.array_equal(ch.meets_target_test, (ch.test_accuracy_after >= strict.test_target))
    # Adaptive follows each chip's same trajectory and stops no earlier with the margin.
    adaptive = {m: r.policies.policies["adaptive"] for m, r in runs.items()}
    assert adaptive[0.03].train_steps >= adaptive[0.0].train_steps
    assert adaptive[0.03].eval_passes >= adaptive[0.0].eval_passes
