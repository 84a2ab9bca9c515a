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


def test_sample_chips_draws_distinct_chips_or_every_chip():
    key = jax.random.key(3)
    drawn = policies.sample_chips(64, 16, key)
    assert len(drawn) == 16 and len(set(drawn.tolist())) == 16
    assert np.all(np.diff(drawn) > 0) and drawn.min() >= 0 and drawn.max() < 64
    np.testing.assert_array_equal(drawn, policies.sample_chips(64, 16, key))
    for every in (0, 64, 100):
        np.testing.assert_array_equal(policies.sample_chips(64, every, key), np.arange(64))


def test_the_fixed_policy_on_a_sample_pays_for_every_chip_and_counts_the_sample():
    steps = [15]
    val = [[0.95], [0.5]]
    test = [[0.95], [0.95]]
    traj = trajectory(val, steps, test)
    fixed = policies.fixed_policy(traj, 15, TARGET, TARGET, chips=64)
    assert fixed == policies.Policy(64, 64 * 15, 64, 1, 2, 2, 1.0, 1)
    assert fixed.measured_chips == 2
    every = policies.fixed_policy(traj, 15, TARGET, TARGET)
    assert every == policies.Policy(2, 30, 2, 1, 2, None, 1.0, 1) and every.measured_chips == 2
    with pytest.raises(ValueError):
        policies.fixed_policy(traj, 15, TARGET, TARGET, chips=1)


def test_adaptive_verifies_at_0_every_increment_and_the_cap():
    np.testing.assert_array_equal(policies.adaptive_points(3, 10), [0, 3, 6, 9, 10])
    np.testing.assert_array_equal(policies.adaptive_points(5, 10), [0, 5, 10])
    np.testing.assert_array_equal(policies.adaptive_points(0, 10), [0])


def test_adaptive_counts_the_steps_evaluations_and_rounds_to_each_stop():
    # Chip 0 meets at 0; chip 1 after one increment of 5; chip 2 reaches the cap 12 (points
    # 0, 5, 10, 12) and misses; chip 3 diverged (stopped, counted as missing); chip 4 is
    # not served (the online map's skip): no steps, no evaluation, never meeting.
    out = policies.AdaptiveOutcome(
        steps=np.array([0, 5, 12, 5, 0]),
        eval_passes=np.array([1, 2, 2.5, 2, 0]),
        val=np.array([0.95, 0.91, 0.7, 0.0, np.nan]),
        test=np.array([0.95, 0.85, 0.7, 0.99, np.nan]),
        diverged=np.array([False, False, False, True, False]),
        met=np.array([True, True, False, False, False]),
        first=np.zeros(5, np.int64),
        verifications=np.array([1, 2, 4, 2, 0]),
        false_rejects=np.zeros(5, np.int64),
        served=np.array([True, True, True, True, False]),
    )
    adaptive = policies.adaptive_policy(out, TARGET)
    assert adaptive == policies.Policy(
        5, 0 + 5 + 12 + 5, 1 + 2 + 2.5 + 2, 2, 1, rounds_mean=9 / 5, rounds_max=4
    )
    # The test set is judged against the test target, apart from the decisions.
    assert policies.adaptive_policy(out, 0.8).chips_meeting_target_test == 2


def test_a_validation_margin_moves_the_fixed_policys_validation_count_not_its_test_count():
    traj = trajectory([[0.95, 0.95], [0.5, 0.91]], [0, 5], [[0.95, 0.95], [0.5, 0.905]])
    assert policies.fixed_policy(traj, 5, TARGET + 0.015, TARGET) == policies.Policy(
        2, 10, 2, 1, 2, None, 1.0, 1
    )
    assert policies.fixed_policy(traj, 5, TARGET, TARGET) == policies.Policy(
        2, 10, 2, 2, 2, None, 1.0, 1
    )


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
    # Rounds: 1 + 3 top-ups, 1, and none for the chip not served.
    assert policies.reduce_policy(chips, 3) == policies.Policy(3, 11, 2 + 3, 2, 1, None, 5 / 3, 4)


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
    assert out.cheapest == "adaptive" and out.break_even_vs_cheapest == n
    worse = policies.compare(dict(adaptive=reduce_, reduce=adaptive), analysis, compute)
    assert worse.break_even_vs_adaptive is None and worse.break_even_vs_cheapest is None


def _three_policies():
    """Per chip: Reduce 10 steps + 1 evaluation, adaptive 12 steps + 3 evaluations, fixed 40
    steps + 1 evaluation; an evaluation costs 10 steps' flops (an epoch is 10 steps)."""
    n = 8
    return dict(
        reduce=policies.Policy(n, 10 * n, n, n, n),
        fixed=policies.Policy(n, 40 * n, n, n, n, sampled_chips=2),
        adaptive=policies.Policy(n, 12 * n, 3 * n, n, n),
    )


def test_the_cheapest_policy_and_the_break_even_are_in_compute_epochs_evaluation_included():
    """Per chip in compute epochs: Reduce 2.0, adaptive 4.2, fixed 5.0; the analysis (one
    chip to 10 steps, evaluated twice) 3.0. Training only, adaptive would save 0.2 epochs a
    chip and break even at 5 chips; with evaluation it saves 2.2 and breaks even at 2."""
    compute = policies.Compute(step_flops=1.0, eval_flops=10.0, steps_per_epoch=10)
    analysis = trajectory(np.zeros((1, 2)), [0, 10])
    out = policies.compare(_three_policies(), analysis, compute)
    assert out.unit == "compute_epochs" and out.cheapest == "adaptive"
    assert out.per_chip(out.policies["adaptive"]) == pytest.approx(4.2)
    assert out.cost(out.analysis) == pytest.approx(3.0)
    assert out.break_even == {"fixed": 1, "adaptive": 2}
    assert out.break_even_vs_cheapest == 2
    # Without a flop count for evaluation, every figure is in training epochs, named so.
    blind = policies.compare(_three_policies(), analysis, compute._replace(eval_flops=float("nan")))
    assert blind.unit == "train_epochs" and blind.cheapest == "adaptive"
    assert blind.break_even == {"fixed": 1, "adaptive": 5}


def test_fixed_is_the_cheapest_when_adaptive_costs_more_per_chip():
    compute = policies.Compute(step_flops=1.0, eval_flops=10.0, steps_per_epoch=10)
    found = _three_policies()
    found["adaptive"] = found["adaptive"]._replace(train_steps=100 * 8)
    out = policies.compare(found, trajectory(np.zeros((1, 2)), [0, 10]), compute)
    assert out.cheapest == "fixed" and out.break_even_vs_cheapest == out.break_even["fixed"]
    alone = policies.compare(
        dict(reduce=found["reduce"]), trajectory(np.zeros((1, 2)), [0, 10]), compute
    )
    assert alone.cheapest is None and alone.break_even == {}


def test_the_recommended_policy_pays_the_analysis_for_the_runs_population():
    """8 chips: Reduce 16 + analysis 3 = 19 compute epochs, adaptive 33.6: Reduce is
    recommended; with an analysis of 30 epochs, adaptive is."""
    compute = policies.Compute(step_flops=1.0, eval_flops=10.0, steps_per_epoch=10)
    cheap = trajectory(np.zeros((1, 2)), [0, 10])
    assert policies.compare(_three_policies(), cheap, compute).recommended == "reduce"
    dear = trajectory(np.zeros((10, 2)), [0, 10])  # 10 chips to 10 steps, 20 passes: 30
    out = policies.compare(_three_policies(), dear, compute)
    assert out.total("reduce", 8) == pytest.approx(8 * 2.0 + 30)
    assert out.total("adaptive", 8) == pytest.approx(8 * 4.2)
    assert out.recommended == "adaptive"


def test_where_each_policy_wins_is_the_least_total_cost_in_every_cell():
    """Per chip (an epoch is 10 steps): Reduce 1 epoch + 1 pass, adaptive 1.2 + 3 passes,
    fixed 4 + 1 pass; the analysis 1 epoch + 2 passes. At e epochs a pass and n chips the
    table holds the least of n(1 + e) + 1 + 2e, n(1.2 + 3e) and n(4 + e)."""
    compute = policies.Compute(step_flops=1.0, eval_flops=10.0, steps_per_epoch=10)
    out = policies.compare(_three_policies(), trajectory(np.zeros((1, 2)), [0, 10]), compute)
    evals, chips = np.array([0.01, 0.1, 1.0]), np.array([1, 3, 10, 1000])
    regions = policies.where_each_wins(out, evals, chips)
    assert regions.measured_eval_epochs == pytest.approx(1.0)  # 10 flops / 10 steps of 1
    for i, e in enumerate(evals):
        for j, n in enumerate(chips):
            costs = dict(
                reduce=n * (1 + e) + 1 + 2 * e, adaptive=n * (1.2 + 3 * e), fixed=n * (4 + e)
            )
            assert regions.cheapest[i][j] == min(costs, key=costs.get)
    # Cheap evaluation and few chips: adaptive; many chips: Reduce (its analysis shared).
    assert regions.cheapest[0][0] == "adaptive" and regions.cheapest[0][-1] == "reduce"
    assert {c for row in regions.cheapest for c in row} <= {"reduce", "adaptive", "fixed"}


def _context(trainer, variables, data, chips_per_batch=8):
    return population.Context(trainer, variables, data, 41, chips_per_batch)


def test_measured_compute_matches_the_model_arithmetic(tiny_mlp, tiny_mlp_variables, digits_device):
    """MLP 64-16-10: a forward pass is about 2 * (64*16 + 16*10) flops per image."""
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 1e-3), 32)
    ctx = _context(trainer, tiny_mlp_variables, digits_device)
    c = policies.measure_compute(ctx, 32, 100, (8, 8))
    forward = 2 * (64 * 16 + 16 * 10)
    n_val = 200  # 144 images, in two batches of 100
    assert forward * n_val <= c.eval_flops <= 1.2 * forward * n_val
    assert 2 * forward * 32 <= c.step_flops <= 6 * forward * 32
    assert c.epochs(41, 0) == pytest.approx(1.0)


def test_the_fixed_policys_chips_equal_chips_retrained_alone(
    tiny_mlp, tiny_mlp_variables, digits_device
):
    """``run_fixed`` on a sample gives each sampled chip what retraining it alone gives."""
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    ctx = _context(trainer, tiny_mlp_variables, digits_device, 4)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(5), 3, 8, 8, 0.3))
    key = jax.random.key(9)
    fixed = policies.run_fixed(ctx, maps[1:], 6, key)
    assert fixed.accuracy.shape == (2, 1, 1) and fixed.amount_steps.tolist() == [6]
    states, masks = population.init_chunk(trainer, tiny_mlp_variables, maps[1:2], np.array([6]))
    states = population.run_phase(trainer, states, masks, digits_device, key, np.array([6]))
    for split, acc in (("val", fixed.accuracy), ("test", fixed.test_accuracy)):
        alone = population.evaluate(trainer, states, masks, digits_device, split)
        assert alone[0] == pytest.approx(acc[0, 0, 0], abs=1e-6)


def test_adaptive_stops_each_chip_where_its_continuous_retraining_first_meets_the_target(
    tiny_mlp, tiny_mlp_variables, digits_device
):
    """Adaptive equals one trajectory per chip (every chip retrained to the cap, evaluated
    at every increment) read at its first point at or above the target: a chip stopped
    there takes no more steps, and its accuracy is the trajectory's at that point."""
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    ctx = _context(trainer, tiny_mlp_variables, digits_device, 4)
    rates = np.array([0.0, 0.2, 0.4, 0.5, 0.6, 0.7])
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(2), len(rates), 8, 8, rates))
    key, points = jax.random.key(4), policies.adaptive_points(3, 7)
    traj = resilience.analyze(
        ctx, maps[:, None], points / 41, key, stage="trajectory", with_test=True
    )
    val, test = traj.accuracy[:, :, 0], traj.test_accuracy[:, :, 0]
    target = float(np.median(val[:, 1]))  # some chips meet it early, some late or never
    out = policies.run_adaptive(ctx, maps, 3, 7, target, key)
    meets = val >= target
    first = np.where(meets.any(1), np.argmax(meets, 1), len(points) - 1)
    rows = np.arange(len(maps))
    assert len(set(first.tolist())) > 1
    np.testing.assert_array_equal(out.steps, points[first])
    np.testing.assert_array_equal(out.eval_passes, first + 1)
    np.testing.assert_allclose(out.val, val[rows, first], atol=1e-6)
    np.testing.assert_allclose(out.test, test[rows, first], atol=1e-6)


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
    # A chip the map does not serve (above the grid, unrecoverable) never meets the target.
    served_chips = ~np.isin(ch.status, ("above_grid", "unrecoverable"))
    assert np.array_equal(
        ch.meets_target, served_chips & (ch.accuracy_after >= strict.decision_target)
    )
    assert np.array_equal(
        ch.meets_target_test, served_chips & (ch.test_accuracy_after >= strict.test_target)
    )
    # Adaptive follows each chip's same trajectory and stops no earlier with the margin.
    adaptive = {m: r.policies.policies["adaptive"] for m, r in runs.items()}
    assert adaptive[0.03].train_steps >= adaptive[0.0].train_steps
    assert adaptive[0.03].eval_passes >= adaptive[0.0].eval_passes


def test_a_chip_with_a_cap_and_a_start_of_its_own_is_verified_only_between_them(
    tiny_mlp, tiny_mlp_variables, digits_device
):
    """Points 0, 3, 6, 7 and a target no chip meets: each chip trains to its own cap (the
    first point at or past it), verified from its start on; a skipped chip is untouched."""
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 3e-3), 32)
    ctx = _context(trainer, tiny_mlp_variables, digits_device, 4)
    maps = np.asarray(faults.sample_fault_maps(jax.random.key(2), 4, 8, 8, 0.2))
    out = policies.run_adaptive(
        ctx, maps, 3, 7, 1.1, jax.random.key(4),
        first=np.array([0, 3, 6, 0]), last=np.array([7, 4, 100, 7]),
        skip=np.array([False, False, False, True]),
    )  # fmt: skip
    np.testing.assert_array_equal(out.steps, [7, 6, 7, 0])
    np.testing.assert_array_equal(out.verifications, [4, 2, 2, 0])
    np.testing.assert_array_equal(out.first, [0, 3, 6, 0])
    np.testing.assert_array_equal(out.served, [True, True, True, False])
    np.testing.assert_array_equal(out.eval_passes, [4, 2, 2, 0])
    assert not out.met.any() and np.isnan(out.val[3]) and np.isnan(out.test[3])
