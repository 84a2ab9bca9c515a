"""What Reduce would spend per chip, and choosing the map's statistic and interpolation."""

import numpy as np

from reduce_jax.stages import calibration, resilience, retraining

STEPS = np.array([0, 2, 4, 6, 8, 10, 12])


def test_reduce_totals_add_the_top_ups_each_chip_needs():
    curves = np.array(
        [
            [0.5, 0.5, 0.5, 0.5, 0.95, 0.95, 0.95],  # meets at 8
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # never
            [0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95],  # already at 0
            [0.5, 0.5, 0.5, 0.5, 0.95, 0.95, 0.95],  # not served
        ]
    )
    selected = np.array([4.0, 4.0, 2.0, np.inf])
    total, met = calibration.reduce_totals(curves, STEPS, selected, 0.9, increment=3, cap=6)
    # Chip 0: 4 -> top-up to 7, read at 8 (the first evaluated amount at or above): met.
    np.testing.assert_array_equal(total, [7, 10, 2, 0])
    np.testing.assert_array_equal(met, [True, False, True, False])
    total, met = calibration.reduce_totals(curves, STEPS, selected, 0.9, increment=3, cap=0)
    np.testing.assert_array_equal(total, [4, 4, 2, 0])
    np.testing.assert_array_equal(met, [False, False, True, False])


def _policy(topup=2, cap=4):
    return retraining.Verification(0.9, 0.9, topup, cap)


def _analysis(curves_per_rate):
    """``Analysis`` from ``curves_per_rate[F][K][A]`` over ``STEPS``."""
    acc = np.asarray(curves_per_rate, np.float64).transpose(0, 2, 1)
    return resilience.Analysis(
        accuracy=acc,
        diverged=np.zeros(acc.shape[::2], bool),
        amount_epochs=STEPS / 10,
        amount_steps=STEPS,
    )


def _curve(first_ok):
    return [0.95 if s >= first_ok else 0.5 for s in STEPS]


def test_choose_prefers_a_looser_statistic_when_one_chip_drives_min():
    # Every rate has one slow chip; the others recover early. min pays the slow one's amount
    # for every chip; the median selects less, and top-ups serve the slow chip.
    slow = lambda a, b: [_curve(a), _curve(a), _curve(a), _curve(b)]  # noqa: E731
    analysis = _analysis([slow(0, 0), slow(2, 6), slow(4, 8), slow(6, 10), slow(8, 12)])
    rates = np.repeat(np.array([0.0, 0.1, 0.2, 0.3, 0.4])[:, None], 4, 1)
    grid = rates[:, 0]
    choice = calibration.choose(
        _policy(), 10, analysis, rates, grid, interpolations=("conservative",)
    )
    by = {c["statistic"]: c for c in choice.scores}
    assert by["quantile:0.5"]["total_epochs"] < by["min"]["total_epochs"]
    assert by["quantile:0.5"]["missed"] == by["min"]["missed"] == 0
    assert choice.statistic != "min" and choice.chips == 3 * 4
    assert choice.scores[0]["statistic"] == "min"  # the reference is scored first


def test_choose_keeps_min_when_a_looser_statistic_would_miss():
    # Without top-ups a chip given less than it needs misses the target.
    slow = lambda a, b: [_curve(a), _curve(a), _curve(a), _curve(b)]  # noqa: E731
    analysis = _analysis([slow(0, 0), slow(2, 8), slow(4, 10), slow(6, 12), slow(8, 12)])
    rates = np.repeat(np.array([0.0, 0.1, 0.2, 0.3, 0.4])[:, None], 4, 1)
    choice = calibration.choose(_policy(topup=2, cap=0), 10, analysis, rates, rates[:, 0])
    assert (choice.statistic, choice.interpolation)[0] == "min"
    missed = {(c["statistic"], c["interpolation"]): c["missed"] for c in choice.scores}
    assert missed[("quantile:0.5", "conservative")] > missed[("min", "conservative")]


def test_choose_takes_an_upper_quantile_when_fine_top_ups_serve_the_slow_chips():
    # At every rate two chips recover 2 steps before the other two. A top-up of 2 steps
    # carries a chip given the early amount to the late one, so selecting the early amount
    # (the 0.75 quantile of accuracy meets the target there, the median does not) costs
    # least and misses nothing.
    fast = lambda a: [_curve(a), _curve(a), _curve(a + 2), _curve(a + 2)]  # noqa: E731
    analysis = _analysis([fast(0), fast(2), fast(4), fast(6), fast(8)])
    rates = np.repeat(np.array([0.0, 0.1, 0.2, 0.3, 0.4])[:, None], 4, 1)
    choice = calibration.choose(
        _policy(topup=2, cap=4), 10, analysis, rates, rates[:, 0], interpolations=("conservative",)
    )
    by = {c["statistic"]: c for c in choice.scores}
    assert by["quantile:0.75"]["missed"] == by["quantile:0.5"]["missed"] == 0
    assert by["quantile:0.75"]["total_epochs"] < by["quantile:0.5"]["total_epochs"]
    assert choice.statistic == "quantile:0.75"


def test_reduce_totals_with_a_cap_that_is_not_a_whole_number_of_increments():
    # Increment 4, cap 6: the rounds add 4, then 2 more (6 in all), never 8.
    curves = np.array(
        [
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.9, 0.9],  # meets at 10 = 4 + 6 (the capped round)
            [0.5, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9],  # meets at 8 = 4 + 4
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.9],  # meets at 12 only: beyond the cap
            [0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9],  # exactly the target at its own amount
        ]
    )
    selected = np.array([4.0, 4.0, 4.0, 4.0])
    total, met = calibration.reduce_totals(curves, STEPS, selected, 0.9, increment=4, cap=6)
    np.testing.assert_array_equal(total, [10, 8, 10, 4])
    np.testing.assert_array_equal(met, [True, True, False, True])
    # An amount between evaluated ones reads the next one up; beyond the curve, the last.
    total, met = calibration.reduce_totals(
        curves[:1], STEPS, np.array([9.0]), 0.9, increment=5, cap=5
    )
    np.testing.assert_array_equal(total, [9])  # read at 10
    np.testing.assert_array_equal(met, [True])
    total, met = calibration.reduce_totals(
        curves[2:3], STEPS, np.array([11.0]), 0.9, increment=5, cap=5
    )
    np.testing.assert_array_equal(total, [11])  # 11 reads 12: met without a top-up
    total, met = calibration.reduce_totals(
        np.full((1, 7), 0.5), STEPS, np.array([11.0]), 0.9, increment=5, cap=5
    )
    np.testing.assert_array_equal(total, [16])  # past the curve: missed after the cap
    np.testing.assert_array_equal(met, [False])


def test_reduce_totals_without_an_increment_tops_nothing_up():
    curves = np.array([[0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], [0.5] * 7])
    for increment, cap in ((0, 6), (4, 0)):
        total, met = calibration.reduce_totals(
            curves, STEPS, np.array([0.0, 2.0]), 0.9, increment, cap
        )
        np.testing.assert_array_equal(total, [0, 2])
        np.testing.assert_array_equal(met, [False, False])


def test_choose_always_scores_the_reference_and_breaks_ties_toward_it():
    # Every chip recovers at once: every candidate costs nothing and misses nothing.
    analysis = _analysis([[_curve(0)] * 2] * 4)
    rates = np.repeat(np.array([0.0, 0.1, 0.2, 0.3])[:, None], 2, 1)
    choice = calibration.choose(
        _policy(), 10, analysis, rates, rates[:, 0], statistics=("mean",),
        interpolations=("linear",),
    )  # fmt: skip
    assert [(c["statistic"], c["interpolation"]) for c in choice.scores] == [
        ("min", "conservative"),
        ("mean", "linear"),
    ]
    assert (choice.statistic, choice.interpolation) == ("min", "conservative")
    assert choice.chips == 2 * 2  # the two inner rates' chips
    assert all(c["total_epochs"] == 0 and c["missed"] == 0 for c in choice.scores)


def test_choose_counts_a_held_out_chip_the_map_does_not_serve_as_missed():
    # Without rate 2, the map is unrecoverable from rate 3 on, and the held-out chips of rate
    # 2 read their amount there (conservative): not served, though 4 steps met the target.
    curves = [[_curve(0)] * 2, [_curve(2)] * 2, [_curve(4)] * 2, [[0.5] * 7] * 2, [[0.5] * 7] * 2]
    analysis = _analysis(curves)
    rates = np.repeat(np.array([0.0, 0.1, 0.2, 0.3, 0.4])[:, None], 2, 1)
    choice = calibration.choose(
        _policy(topup=2, cap=4), 10, analysis, rates, rates[:, 0], statistics=("min",),
        interpolations=("conservative",),
    )  # fmt: skip
    (score,) = choice.scores
    # Rate 1 (held out): the map without it gives rate 2's 4 steps, met: 0.4 epochs per chip.
    # Rate 2: not served (missed). Rate 3: not served, never met (missed).
    assert score["missed"] == 4
    assert score["total_epochs"] == 2 * 0.4


def test_an_amount_on_an_evaluated_point_is_read_there_not_at_the_next():
    curves = np.array([[0.5, 0.5, 0.95, 0.5, 0.5, 0.5, 0.5]])  # meets at 4 only
    total, met = calibration.reduce_totals(curves, STEPS, np.array([4.0]), 0.9, 2, 4)
    np.testing.assert_array_equal(total, [4])
    np.testing.assert_array_equal(met, [True])


def test_choose_on_a_grid_of_two_rates_holds_nothing_out():
    analysis = _analysis([[_curve(0)] * 3, [_curve(4)] * 3])
    rates = np.repeat(np.array([0.0, 0.1])[:, None], 3, 1)
    choice = calibration.choose(_policy(), 10, analysis, rates, rates[:, 0])
    assert choice.chips == 0 and (choice.statistic, choice.interpolation) == calibration.REFERENCE
    assert all(c["total_epochs"] == 0 and c["missed"] == 0 for c in choice.scores)
