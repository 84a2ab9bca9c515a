"""Rate measures (importance-weighted) and the predictor study, on hand-made values."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reduce_jax.hardware import systolic
from reduce_jax.stages import predictor, resilience


def two_layer_params(rng=None):
    rng = rng or np.random.default_rng(0)
    return {
        "a": {"kernel": rng.normal(size=(6, 3)).astype(np.float32), "bias": np.ones(3, np.float32)},
        "b": {"kernel": rng.normal(size=(3, 3, 1, 2)).astype(np.float32)},
    }


def test_importance_weights_by_hand():
    # One 2x2 kernel on a 2x2 array: each weight on its own PE.
    params = {"d": {"kernel": np.array([[1.0, -3.0], [0.0, 4.0]], np.float32)}}
    np.testing.assert_allclose(
        systolic.pe_weights(params, 2, 2, "importance"), [[1 / 8, 3 / 8], [0, 4 / 8]]
    )
    # Two kernels count equally, however many weights they have.
    params = {
        "small": {"kernel": np.array([[2.0]], np.float32)},  # on PE (0, 0)
        "large": {"kernel": np.ones((2, 2), np.float32)},  # one weight per PE
    }
    np.testing.assert_allclose(
        systolic.pe_weights(params, 2, 2, "importance"),
        [[(1 + 0.25) / 2, 0.25 / 2], [0.25 / 2, 0.25 / 2]],
    )
    np.testing.assert_allclose(systolic.pe_weights(params, 2, 2, "pe"), np.full((2, 2), 0.25))
    np.testing.assert_allclose(
        systolic.pe_weights(params, 2, 2, "effective"), [[0.4, 0.2], [0.2, 0.2]]
    )
    with pytest.raises(ValueError, match="unknown rate measure"):
        systolic.pe_weights(params, 2, 2, "area")


@pytest.mark.parametrize("measure", systolic.RATE_MEASURES)
def test_every_measure_is_zero_fault_free_and_one_all_faulty(measure):
    params = two_layer_params()
    w = systolic.pe_weights(params, 4, 5, measure)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert float(systolic.fault_rate(w, jnp.zeros((4, 5), bool))) == 0.0
    assert float(systolic.fault_rate(w, jnp.ones((4, 5), bool))) == pytest.approx(1.0)


def test_importance_is_the_share_of_magnitude_bypassed():
    params = two_layer_params()
    fault = np.random.default_rng(3).random((4, 5)) < 0.3
    masks = systolic.weight_masks(params, jnp.asarray(fault))
    shares = []
    for name in ("a", "b"):
        mag = np.abs(params[name]["kernel"])
        shares.append(mag[np.asarray(masks[name]["kernel"]) == 0].sum() / mag.sum())
    w = systolic.pe_weights(params, 4, 5, "importance")
    assert float(systolic.fault_rate(w, jnp.asarray(fault))) == pytest.approx(np.mean(shares))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.0, 1.0), q=st.floats(0.0, 1.0))
def test_importance_is_monotone_in_the_set_of_faulty_pes(seed, p, q):
    rng = np.random.default_rng(seed)
    params = two_layer_params(rng)
    a = rng.random((4, 5)) < p
    b = a | (rng.random((4, 5)) < q)  # a superset of a
    w = systolic.pe_weights(params, 4, 5, "importance")
    assert float(systolic.fault_rate(w, b)) >= float(systolic.fault_rate(w, a)) - 1e-7


def test_needed_steps_by_hand():
    acc = np.array([[0.5, 0.8, 0.95], [0.96, 0.97, 0.99], [0.2, 0.3, 0.4], [0.9, 0.85, 0.92]])
    np.testing.assert_array_equal(
        predictor.needed_steps(acc, np.array([0, 5, 10]), 0.9), [10, 0, np.inf, 0]
    )


def test_rank_correlation():
    assert predictor.rank_correlation([1, 2, 3, 4], [10, 20, 30, np.inf]) == pytest.approx(1.0)
    assert predictor.rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert predictor.rank_correlation([1, 1, 1], [1, 2, 3]) is None


def test_score_measure_counts_by_hand():
    ok, unrec = resilience.OK, resilience.UNRECOVERABLE
    needed = np.array([0, 5, 10, 10, np.inf, 5])
    predicted = np.array([0, 10, 5, 10, 10, np.inf])
    status = np.array([ok, ok, ok, ok, ok, unrec])
    score = predictor.score_measure(np.arange(6.0), predicted, status, needed, steps_per_epoch=5)
    assert (score["exact"], score["under"], score["over"]) == (2, 2, 1)
    assert (score["flagged"], score["flagged_recoverable"]) == (1, 1)
    assert score["excess_epochs"] == pytest.approx(1.0)  # chip 1: 5 steps too many
    assert score["shortfall_epochs"] == pytest.approx(1.0)  # chip 2: 5 steps short


def test_study_scores_every_measure_and_picks_the_best():
    grid = {"good": np.array([0.0, 0.1, 0.2]), "bad": np.array([0.0, 0.1, 0.2])}
    required = np.array([0.0, 5.0, 10.0])
    needed = np.array([0.0, 5.0, 10.0, 10.0])
    rates = {"good": np.array([0.0, 0.08, 0.15, 0.2]), "bad": np.array([0.2, 0.15, 0.0, 0.08])}
    out = predictor.study(rates, grid, required, needed, "conservative", steps_per_epoch=5)
    assert out["best_measure"] == "good"
    good = out["measures"]["good"]
    assert (good["exact"], good["under"], good["over"]) == (4, 0, 0)
    assert good["predicted_epochs"] == [0.0, 1.0, 2.0, 2.0]
    assert out["measures"]["bad"]["spearman_rate"] < 0


def test_study_skips_a_measure_whose_grid_does_not_increase():
    grid = {"ok": np.array([0.0, 0.1, 0.2]), "flat": np.array([0.0, 0.1, 0.1])}
    rates = {"ok": np.array([0.0, 0.15]), "flat": np.array([0.0, 0.15])}
    out = predictor.study(
        rates,
        grid,
        np.array([0.0, 5.0, 10.0]),
        np.array([0.0, 10.0]),
        "conservative",
        steps_per_epoch=5,
    )
    assert "skipped" in out["measures"]["flat"] and "spearman_rate" not in out["measures"]["flat"]
    assert out["best_measure"] == "ok"
