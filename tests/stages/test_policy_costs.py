"""Each policy's cost in one unit, with finite flop counts, worked out by hand."""

import jax
import numpy as np
import pytest

from reduce_jax.engine import population, train
from reduce_jax.engine.progress import ProgressStore
from reduce_jax.stages import cost, grouping, policies, predictor, resilience, retraining

SPE = 10


def _analysis(f=2, a=3, k=2, max_steps=10):
    return resilience.Analysis(
        accuracy=np.full((f, a, k), 0.9),
        diverged=np.zeros((f, k), bool),
        amount_epochs=np.linspace(0, max_steps / SPE, a),
        amount_steps=np.linspace(0, max_steps, a).astype(np.int64),
    )


def test_a_training_step_and_an_evaluation_pass_in_flops_and_epochs():
    c = policies.Compute(step_flops=4.0, eval_flops=10.0, steps_per_epoch=SPE)
    assert c.flops(3, 2) == 3 * 4.0 + 2 * 10.0
    assert c.flops(0, 0.5) == 5.0  # a verification that stopped half way
    # One epoch of training is 40 flops: 3 steps and 2 passes are 32 / 40 epochs.
    assert c.epochs(3, 2) == pytest.approx(32 / 40)
    assert c.epochs(SPE, 0) == 1.0


def test_compare_with_finite_flops_costs_evaluation_too():
    compute = policies.Compute(step_flops=1.0, eval_flops=5.0, steps_per_epoch=SPE)
    found = dict(
        reduce=policies.Policy(4, 20, 6, 4, 4),  # (20 + 30) / 10 = 5 epochs, 1.25 a chip
        adaptive=policies.Policy(4, 16, 12, 4, 4),  # (16 + 60) / 10 = 7.6, 1.9 a chip
        fixed=policies.Policy(4, 40, 4, 4, 4),  # (40 + 20) / 10 = 6, 1.5 a chip
    )
    analysis = _analysis()  # 4 chips to 10 steps, 3 evaluations each: (40 + 60) / 10
    out = policies.compare(found, analysis, compute)
    assert out.unit == "compute_epochs"
    assert out.cost(out.analysis) == pytest.approx(10.0)
    assert [out.per_chip(found[n]) for n in ("reduce", "adaptive", "fixed")] == pytest.approx(
        [1.25, 1.9, 1.5]
    )
    assert out.cheapest == "fixed"
    # 10 epochs of analysis over 0.65 (adaptive) and 0.25 (fixed) saved a chip.
    assert out.break_even == {"adaptive": 16, "fixed": 40}
    assert out.break_even_vs_cheapest == 40 and out.break_even_vs_adaptive == 16
    assert out.total("reduce", 100) == pytest.approx(10.0 + 125.0)
    assert out.total("fixed", 100) == pytest.approx(150.0)
    assert out.recommended == "fixed"  # for the run's 4 chips the analysis does not pay
    # Without a flop count for evaluation: training epochs only.
    nan = policies.compare(found, analysis, compute._replace(eval_flops=float("nan")))
    assert nan.unit == "train_epochs" and nan.cost(found["adaptive"]) == pytest.approx(1.6)
    assert nan.cheapest == "adaptive"


def test_where_each_wins_never_picks_the_oracle_however_cheap():
    compute = policies.Compute(step_flops=1.0, eval_flops=5.0, steps_per_epoch=SPE)
    found = dict(
        adaptive=policies.Policy(4, 16, 12, 4, 4),
        oracle=policies.Policy(4, 1, 0, 4, 4),
    )
    out = policies.compare(found, _analysis(), compute)
    regions = policies.where_each_wins(out, np.array([0.1, 1.0]), np.array([10, 1000]))
    assert regions.cheapest == [["adaptive", "adaptive"], ["adaptive", "adaptive"]]
    assert regions.chips.dtype == np.int64 and regions.eval_epochs.dtype == np.float64
    assert out.recommended == "adaptive"


def test_reduce_policy_with_top_ups_that_are_not_whole_increments():
    chips = cost.ChipResults(
        status=np.array(["ok", "missed_target", "above_grid", "ok"], object),
        selected_steps=np.array([5, 10, -1, 0]),
        topup_steps=np.array([7, 3, 0, 0]),
        accuracy_before=np.zeros(4),
        accuracy_after=np.zeros(4),
        meets_target=np.array([True, False, False, True]),
        test_accuracy_after=np.zeros(4),
        meets_target_test=np.array([True, False, False, False]),
    )
    p = policies.reduce_policy(chips, increment=3)
    # Top-ups of 7 and 3 steps in rounds of 3: 3 rounds and 1; a chip given 0 steps is
    # verified once; the chip above the grid is neither trained nor verified.
    assert p.train_steps == 5 + 10 + 0 + 7 + 3
    assert p.eval_passes == 3 + (3 + 1)
    assert (p.rounds_mean, p.rounds_max) == (pytest.approx((4 + 2 + 0 + 1) / 4), 4)
    assert (p.chips, p.chips_meeting_target, p.chips_meeting_target_test) == (4, 2, 1)
    np.testing.assert_array_equal(policies.topup_rounds(np.array([7, 3, 0]), 0), [0, 0, 0])
    np.testing.assert_array_equal(policies.topup_rounds(np.array([7, 3, 0]), 7), [1, 1, 0])


def test_the_grouped_policy_verifies_each_group_on_every_member():
    # A group of three, a group of two, a chip alone (topped up twice in rounds of 2).
    table = retraining.ChipOutcome(
        members=np.array([[0, 1, 2], [3, 4, -1], [5, -1, -1]]),
        steps=np.array([6, 4, 3]),
        retrained=np.array([True, True, True]),
        accuracy_before=np.zeros(3),
        accuracy_after=np.zeros(3),
        test_accuracy_after=np.zeros(3),
        topup_steps=np.array([0, 1, 4]),
        diverged=np.zeros(3, bool),
        member_accuracy=np.zeros((3, 3)),
        meets_target=np.ones(3, bool),
    )
    grouped = grouping.GroupedOutcome(
        retrainings=table,
        fused_pe_rate=np.zeros(3),
        fused_rate=np.zeros(3),
        split=np.zeros(3, bool),
        split_from=np.full(3, -1),
        served_by=np.array([0, 0, 0, 1, 1, 2]),
        accuracy_after=np.zeros(6),
        diverged=np.zeros(6, bool),
    )
    chips = cost.ChipResults(*([np.zeros(6)] * 8))._replace(
        status=np.array(["ok"] * 6, object), grouped_meets_target=np.array([1, 1, 1, 0, 0, 1], bool)
    )
    p = policies.grouped_policy(grouped, chips, increment=2)
    assert p.train_steps == 6 + 4 + 3 + 1 + 4
    # One verification per retraining, its top-up rounds (1 and 2), and each member of a
    # group on the group's model (3 + 2).
    assert p.eval_passes == 3 + (1 + 2) + (3 + 2)
    assert (p.chips, p.chips_meeting_target) == (6, 4)


def test_the_oracle_and_the_analysis_as_policies():
    analysis = resilience.Analysis(
        accuracy=np.full((3, 3, 1), 0.9),
        diverged=np.zeros((3, 1), bool),
        amount_epochs=np.array([0.0, 0.5, 1.0]),
        amount_steps=np.array([0, 5, 10]),
        test_accuracy=np.array([[[0.95], [0.95], [0.95]], [[0.5], [0.85], [0.9]], [[0.5]] * 3]),
    )
    study = predictor.PredictorStudy(
        requested_rates=np.array([0.0, 0.1, 0.3]),
        analysis=analysis,
        needed_steps=np.array([0.0, 5.0, np.inf]),
        scores=dict(measures={}, best_measure=None),
    )
    p = policies.oracle_policy(study, test_target=0.86)
    assert (p.chips, p.train_steps, p.eval_passes, p.chips_meeting_target) == (3, 5, 0, 2)
    assert p.chips_meeting_target_test == 1  # chip 1 reads 0.85 on the test set at 5 steps
    # Read at each chip's own amount: chip 1 at 5 steps (0.85), not at 0 (0.5).
    assert policies.oracle_policy(study, test_target=0.8).chips_meeting_target_test == 2
    one_off = policies.analysis_policy(_analysis(f=3, a=4, k=2, max_steps=12))
    assert (one_off.chips, one_off.train_steps, one_off.eval_passes) == (6, 6 * 12, 6 * 4)


def test_adaptive_verifies_at_the_cap_when_it_is_not_a_whole_number_of_increments():
    np.testing.assert_array_equal(policies.adaptive_points(3, 7), [0, 3, 6, 7])
    np.testing.assert_array_equal(policies.adaptive_points(3, 6), [0, 3, 6])
    np.testing.assert_array_equal(policies.adaptive_points(0, 7), [0])
    assert policies.rounds(np.array([], np.int64)) == dict(rounds_mean=0.0, rounds_max=0)


def test_adaptive_stops_a_chip_that_diverges_and_never_counts_it(
    tiny_mlp, tiny_mlp_variables, digits_device, tmp_path, monkeypatch
):
    """A learning rate no chip survives: each chip is stopped at the first verification
    after it diverged (validation 0, not met), and the policy counts none of them."""
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 1e30), 32)
    ctx = population.Context(trainer, tiny_mlp_variables, digits_device, 41, 2)
    maps = np.zeros((2, 8, 8), bool)
    store = ProgressStore(str(tmp_path), {"run": 1}, overwrite=False)
    run = lambda: policies.run_adaptive(  # noqa: E731
        ctx, maps, 2, 6, 0.0, jax.random.key(0), store, first=np.array([2, 2])
    )
    out = run()
    assert out.diverged.dtype == bool and out.diverged.tolist() == [True, True]
    assert out.steps.tolist() == [2, 2] and out.val.tolist() == [0.0, 0.0]
    assert not out.met.any() and out.verifications.tolist() == [1, 1]
    p = policies.adaptive_policy(out, test_target=0.0)
    assert (p.chips_meeting_target, p.chips_meeting_target_test) == (0, 0)
    assert p.train_steps == 4 and p.eval_passes == 2.0

    def no_compute(*args, **kwargs):
        raise AssertionError("a saved chunk was computed again")

    monkeypatch.setattr(population, "init_chunk", no_compute)
    again = run()  # read back from the store
    for a, b in zip(again, out, strict=True):
        np.testing.assert_array_equal(a, b)
