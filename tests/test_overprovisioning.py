"""Reduce over the oracle for every way of building the map, from one run's curves."""

import numpy as np

from experiments import overprovisioning
from reduce_jax.stages import calibration


def _summary():
    """F=3 grid rates x K=2 maps; amounts 0..4 steps, the grid {0, 2, 4}; 3 study chips."""
    ok_from = lambda s: [0.95 if a >= s else 0.5 for a in range(5)]  # noqa: E731
    acc = [[ok_from(0), ok_from(0)], [ok_from(1), ok_from(2)], [ok_from(3), ok_from(4)]]
    return {
        "target_accuracy": 0.9,
        "baseline": {"steps_per_epoch": 4},
        "config": {"topup_epochs": 0.25, "max_topup_epochs": 0.5},
        "resilience": {
            "retrain_epochs": [0.0, 0.25, 0.5, 0.75, 1.0],
            "retrain_steps": [0, 1, 2, 3, 4],
            "grid_epochs": [0.0, 0.5, 1.0],
            "accuracy": np.transpose(acc, (0, 2, 1)).tolist(),  # [F, A, K]
            "measured_rates_by_measure": {"pe": [0.0, 0.1, 0.2]},
        },
        "resilience_map": {"rate_measure": "pe"},
        "predictor_study": {
            "accuracy": [ok_from(0), ok_from(1), ok_from(3)],
            "measures": {"pe": {"rates": [0.0, 0.05, 0.15]}},
        },
    }


def test_rows_rebuild_the_map_and_read_each_chip_off_its_own_curve():
    rows = {
        (r["axis"], r["statistic"], r["interpolation"]): r
        for r in overprovisioning.rows(_summary())
    }
    assert len(rows) == 2 * len(calibration.STATISTICS) * 2  # axes x statistics x interpolations
    # Dense axis, min, conservative: the map needs 0, 2, 4 steps; the chips get 0, 2, 4
    # against needs 0, 1, 3 (oracle 4 steps = 1 epoch, Reduce 6 steps = 1.5 epochs).
    r = rows[("dense", "min", "conservative")]
    assert r["oracle_epochs"] == 1.0 and r["reduce_epochs"] == 1.5
    assert r["reduce_over_oracle"] == 1.5 and r["under"] == 0 and r["missed"] == 0
    # On the grid alone the needs round up to grid amounts: 0, 2, 4.
    g = rows[("grid", "min", "conservative")]
    assert g["oracle_epochs"] == 1.5 and g["reduce_over_oracle"] == 1.0
    # The median map selects less; the chips it under-provisions are topped up.
    m = rows[("dense", "quantile:0.5", "conservative")]
    assert m["reduce_epochs"] <= r["reduce_epochs"] and m["missed"] == 0


def test_rows_read_the_curves_against_what_the_runs_decisions_required():
    # With a validation margin the curves are read against the target plus the margin:
    # 0.96 is above every accuracy, so no amount serves any chip.
    strict = dict(_summary(), validation_target_accuracy=0.96)
    for r in overprovisioning.rows(strict):
        assert r["oracle_epochs"] == 0 and r["reduce_over_oracle"] is None
