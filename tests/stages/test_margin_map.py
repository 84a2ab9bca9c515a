"""What ``--validation_margin`` does to the resilience map itself, in one small run."""

import numpy as np
import pytest

from reduce_jax import pipeline
from reduce_jax.stages import resilience


def test_the_map_is_read_at_the_target_plus_the_margin(tmp_path, small_run_config):
    """The map of a run with a margin is the analysis read at the decision target (the
    target plus the margin), every rate's amount at least the plain target's; the top-ups
    and the chips Reduce calls met are judged against it too, the test set against the
    target alone."""
    margin = 0.04
    cfg = small_run_config(str(tmp_path), validation_margin=margin, compare_policies=False)
    run = pipeline.run(cfg)
    assert run.decision_target == pytest.approx(run.test_target + margin)
    a, rmap = run.analysis, run.rmap
    at_decision, stat = resilience.required_amounts(
        a.accuracy, a.amount_epochs, run.decision_target, rmap.statistic
    )
    np.testing.assert_array_equal(rmap.required_epochs, at_decision)
    np.testing.assert_array_equal(rmap.statistic_accuracy, stat)
    at_target, _ = resilience.required_amounts(
        a.accuracy, a.amount_epochs, run.test_target, rmap.statistic
    )
    assert np.all(at_decision >= at_target)
    # Where the statistic lies between the two targets, the margin asks for more.
    between = (stat >= run.test_target) & (stat < run.decision_target)
    if between.any():
        assert np.any(at_decision > at_target)
    ch = run.chips
    retrained = ch.selected_steps >= 0
    np.testing.assert_array_equal(
        ch.meets_target[retrained],
        (ch.accuracy_after >= run.decision_target)[retrained]
        & (ch.status[retrained] != "diverged"),
    )
    np.testing.assert_array_equal(
        ch.meets_target_test[retrained],
        (ch.test_accuracy_after >= run.test_target)[retrained]
        & (ch.status[retrained] != "diverged"),
    )
