"""Resilience map and per-chip interpolation on hand-made tables."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reduce_jax.engine import population, train
from reduce_jax.engine.progress import ProgressStore
from reduce_jax.stages import resilience

AMOUNTS = np.array([0.0, 0.5, 1.0, 2.0])


def table(stat_rows, spread=0.0):
    """accuracy[F, A, K=3] whose samples are stat +- spread."""
    s = np.asarray(stat_rows, float)[..., None]
    return np.concatenate([s - spread, s, s + spread], axis=-1)


def test_map_min_statistic_picks_first_amount_meeting_target():
    acc = table(
        [[0.95, 0.95, 0.95, 0.95], [0.80, 0.91, 0.95, 0.96], [0.5, 0.7, 0.85, 0.92]], spread=0.01
    )
    required, stat = resilience.required_amounts(acc, AMOUNTS, target=0.905, statistic="min")
    # min over samples = value - 0.01
    np.testing.assert_allclose(
        stat, table([[0.95] * 4, [0.80, 0.91, 0.95, 0.96], [0.5, 0.7, 0.85, 0.92]])[..., 0] - 0.01
    )
    np.testing.assert_array_equal(required, [0.0, 1.0, 2.0])


def test_map_mean_and_quantile_statistics():
    acc = np.array([[[0.85, 0.95, 0.96], [0.89, 0.97, 0.97]]])  # F=1, A=2, K=3
    amounts = np.array([0.0, 1.0])
    assert resilience.required_amounts(acc, amounts, 0.9, "mean")[0][0] == 0.0  # mean 0.92
    assert resilience.required_amounts(acc, amounts, 0.9, "min")[0][0] == np.inf  # 0.85, 0.89
    assert resilience.required_amounts(acc, amounts, 0.9, "quantile:0.5")[0][0] == 0.0
    assert resilience.required_amounts(acc, amounts, 0.9, "quantile:0")[0][0] == np.inf


def test_map_is_non_decreasing_and_unrecoverable_propagates():
    # Rate 0.2 happens to recover faster than rate 0.1 (noise): the map must not decrease.
    acc = table(
        [
            [0.95] * 4,
            [0.5, 0.8, 0.8, 0.95],
            [0.5, 0.95, 0.95, 0.95],
            [0.3, 0.4, 0.5, 0.6],
            [0.5, 0.6, 0.95, 0.95],
        ]
    )
    required, _ = resilience.required_amounts(acc, AMOUNTS, 0.9, "min")
    np.testing.assert_array_equal(required, [0.0, 2.0, 2.0, np.inf, np.inf])
    assert np.all(np.diff(required[np.isfinite(required)]) >= 0)


@pytest.mark.parametrize("bad", ["max", "quantile:2", "quantile:x", ""])
def test_bad_statistic(bad):
    with pytest.raises(ValueError, match="--statistic"):
        resilience.parse_statistic(bad)


GRID = jnp.array([0.0, 0.1, 0.2, 0.4])
REQ = jnp.array([0.0, 8.0, 24.0, 64.0])


@pytest.mark.parametrize("mode", ["conservative", "linear"])
def test_exact_at_grid_points(mode):
    steps, status = resilience.retraining_amount(GRID, REQ, GRID, mode)
    np.testing.assert_array_equal(steps, REQ)
    np.testing.assert_array_equal(status, resilience.OK)


def test_conservative_takes_next_grid_rate_and_linear_interpolates_rounding_up():
    rates = jnp.array([0.05, 0.15, 0.3, 0.101])
    cons, _ = resilience.retraining_amount(GRID, REQ, rates, "conservative")
    lin, _ = resilience.retraining_amount(GRID, REQ, rates, "linear")
    np.testing.assert_array_equal(cons, [8, 24, 64, 24])
    np.testing.assert_array_equal(lin, [4, 16, 44, 9])  # 8.16 rounds up to 9


def test_out_of_grid_and_unrecoverable_flagged_not_clipped():
    req = jnp.array([0.0, 8.0, jnp.inf, jnp.inf])
    rates = jnp.array([0.05, 0.15, 0.45, 1.0])
    for mode in resilience.INTERPOLATIONS:
        steps, status = resilience.retraining_amount(GRID, req, rates, mode)
        np.testing.assert_array_equal(
            status,
            [resilience.OK, resilience.UNRECOVERABLE, resilience.ABOVE_GRID, resilience.ABOVE_GRID],
        )
        assert np.isfinite(steps[0]) and not np.isfinite(steps[1:]).any()


def test_interpolation_is_jittable():
    f = jax.jit(resilience.retraining_amount, static_argnums=3)
    steps, _ = f(GRID, REQ, jnp.array([0.05, 0.2]), "linear")
    np.testing.assert_array_equal(steps, [4, 24])


# Jitted, with 12 chips' rates: one compile per grid length and mode (2 to 6 points), not
# one per example and operation.
_AMOUNT = jax.jit(resilience.retraining_amount, static_argnums=3)


@settings(max_examples=40, deadline=None)
@given(
    increments=st.lists(st.integers(0, 20), min_size=2, max_size=6),
    rates=st.lists(st.floats(0.0, 0.6), min_size=12, max_size=12),
)
def test_monotone_and_conservative_dominates_linear(increments, rates):
    grid = np.linspace(0.0, 0.6, len(increments), dtype=np.float32)
    req = np.cumsum(np.array(increments, np.float32))
    rates = np.sort(np.array(rates, np.float32))
    cons, s1 = _AMOUNT(grid, req, rates, "conservative")
    lin, s2 = _AMOUNT(grid, req, rates, "linear")
    ok = (s1 == resilience.OK) & (s2 == resilience.OK)
    assert bool(jnp.all(lin[ok] <= cons[ok]))
    assert bool(jnp.all(jnp.diff(cons[ok]) >= 0)) and bool(jnp.all(jnp.diff(lin[ok]) >= 0))
    assert bool(jnp.all(lin[ok] == jnp.ceil(lin[ok])))  # whole steps


def test_typed_map_and_assignment_read_the_rates_in_the_maps_measure():
    """``resilience_map`` measures the grid's rates in every measure and reads the map in
    one; ``assign`` reads each chip's rate in the same measure."""
    rows = cols = 4
    weights = dict(pe=np.full((rows, cols), 1 / 16), half=np.zeros((rows, cols)))
    weights["half"][:2] = 1 / 8  # only the top half of the array counts
    grid = np.zeros((3, 2, rows, cols), bool)
    grid[1, :, 0, :2] = True  # 2 PEs: pe 0.125, half 0.25
    grid[2, :, 0, :] = True  # 4 PEs: pe 0.25, half 0.5
    acc = np.array([[0.95, 0.95, 0.95], [0.5, 0.95, 0.95], [0.5, 0.5, 0.95]])
    analysis = resilience.Analysis(
        accuracy=np.repeat(acc[..., None], 2, -1),
        diverged=np.zeros((3, 2), bool),
        amount_epochs=np.array([0.0, 0.5, 1.0]),
        amount_steps=np.array([0, 5, 10]),
    )
    rmap = resilience.resilience_map(analysis, grid, weights, 0.9, "min", "half", 10)
    np.testing.assert_allclose(rmap.measured_rates, [0.0, 0.25, 0.5])
    np.testing.assert_allclose(rmap.grid_rates["pe"], [0.0, 0.125, 0.25])
    np.testing.assert_array_equal(rmap.required_steps, [0, 5, 10])
    chips = np.zeros((3, rows, cols), bool)
    chips[1, 0, 0] = True  # half 0.125: between grid points 0 and 0.25
    chips[2, 3, :] = True  # bottom row only: half 0 although 4 PEs are faulty
    a = resilience.assign(rmap, chips)
    np.testing.assert_allclose(a.rates["half"], [0.0, 0.125, 0.0])
    assert a.budgets.tolist() == [0, 5, 0] and a.ok.all()


def test_amount_axis_adds_every_eval_every_and_keeps_one_amount_per_step_count():
    epochs, steps = resilience.amount_axis([0.0, 0.25, 1.0], 0.125, 10)
    np.testing.assert_allclose(epochs, [0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    np.testing.assert_array_equal(steps, [0, 2, 3, 4, 5, 7, 8, 9, 10])
    # Amounts that round up to the same step count are evaluated once.
    epochs, steps = resilience.amount_axis([0.0, 0.25, 1.0], 0.125, 4)
    np.testing.assert_array_equal(steps, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(epochs, [0, 0.125, 0.375, 0.625, 0.875])
    epochs, steps = resilience.amount_axis([0.0, 0.5, 2.0], 0.0, 10)  # the grid only
    np.testing.assert_array_equal(steps, [0, 5, 20])


def test_analyze_refuses_amounts_that_do_not_increase_in_steps():
    ctx = population.Context(None, None, None, 10, 4)  # nothing is computed
    maps = np.zeros((2, 1, 4, 4), bool)
    for amounts in ([0.0, 0.5, 0.5], [0.0, 0.52, 0.5], [-0.5, 0.0, 0.5], [0.0, 0.51, 0.55]):
        with pytest.raises(ValueError, match="non-negative and increasing in steps"):
            resilience.analyze(ctx, maps, np.array(amounts), jax.random.key(0))


def test_required_amounts_default_to_the_min_statistic():
    # The mean meets the target one amount earlier than the worst sample (mean - 0.04).
    acc = table([[0.92, 0.95, 0.95, 0.95], [0.5, 0.92, 0.95, 0.95]], spread=0.04)
    required, stat = resilience.required_amounts(acc, AMOUNTS, 0.9)
    np.testing.assert_array_equal(required, [0.5, 1.0])
    np.testing.assert_allclose(stat[0], [0.88, 0.91, 0.91, 0.91])
    mean, _ = resilience.required_amounts(acc, AMOUNTS, 0.9, "mean")
    np.testing.assert_array_equal(mean, [0.0, 0.5])


def test_a_map_keeps_unrecoverable_rates_infinite_in_steps_and_the_analysis_amounts():
    acc = np.array([[0.95, 0.95, 0.95], [0.5, 0.95, 0.95], [0.5, 0.5, 0.5]])
    analysis = resilience.Analysis(
        accuracy=np.repeat(acc[..., None], 2, -1),
        diverged=np.zeros((3, 2), bool),
        amount_epochs=np.array([0.0, 0.5, 1.0]),
        amount_steps=np.array([0, 5, 10]),
    )
    grid = np.zeros((3, 2, 4, 4), bool)
    grid[1, :, 0, 0] = grid[2, :, 0, :2] = True
    rmap = resilience.resilience_map(analysis, grid, {"pe": np.full((4, 4), 1 / 16)}, 0.9,
                                     "min", "pe", 10)  # fmt: skip
    assert rmap.required_steps.dtype == np.float64
    np.testing.assert_array_equal(rmap.required_steps, [0, 5, np.inf])
    np.testing.assert_array_equal(rmap.required_epochs, [0, 0.5, np.inf])
    np.testing.assert_array_equal(rmap.amount_epochs, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(rmap.amount_steps, [0, 5, 10])


def test_a_chip_that_diverges_in_the_analysis_counts_as_0_from_then_on(
    tiny_mlp, tiny_mlp_variables, digits_device, tmp_path, caplog, monkeypatch
):
    """A learning rate no chip survives: every chip of the analysis diverges on its first
    steps, is flagged and logged, and reads 0 at every amount after; before any training it
    reads its masked baseline's accuracy. The analysis' chunks are saved in the store: a
    second call reads them back and computes nothing."""
    trainer = train.make_trainer(tiny_mlp, train.make_optimizer("adam", 1e30), 32)
    ctx = population.Context(trainer, tiny_mlp_variables, digits_device, 41, 2)
    maps = np.zeros((2, 1, 8, 8), bool)
    maps[1, 0, :2] = True
    store = ProgressStore(str(tmp_path), {"run": 1}, overwrite=False)
    with caplog.at_level(logging.WARNING):
        out = resilience.analyze(
            ctx, maps, np.array([0.0, 2 / 41, 4 / 41]), jax.random.key(0), store, with_test=True
        )
    assert out.diverged.tolist() == [[True], [True]]
    assert (out.accuracy[:, 1:] == 0).all() and (out.test_accuracy[:, 1:] == 0).all()
    assert (out.accuracy[:, 0] > 0).all()  # the (untrained) baseline, not yet retrained
    np.testing.assert_array_equal(out.amount_epochs, [0.0, 2 / 41, 4 / 41])
    np.testing.assert_array_equal(out.amount_steps, [0, 2, 4])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"analysis chip {c}: loss or weights became non-finite; its accuracy counts as 0 from "
        "then on"
        for c in (0, 1)
    ]

    def no_compute(*args, **kwargs):
        raise AssertionError("a saved chunk was computed again")

    monkeypatch.setattr(population, "init_chunk", no_compute)
    again = resilience.analyze(
        ctx, maps, np.array([0.0, 2 / 41, 4 / 41]), jax.random.key(0), store, with_test=True
    )
    np.testing.assert_array_equal(again.accuracy, out.accuracy)


def test_an_unknown_interpolation_names_the_allowed_ones():
    with pytest.raises(
        ValueError, match=r"^--interpolation='cubic'; allowed: conservative, linear$"
    ):
        resilience.retraining_amount(GRID, REQ, jnp.array([0.1]), "cubic")
