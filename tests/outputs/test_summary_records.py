"""``summary.json`` record by record: every chip's and group's fields, the baseline, the
analysis and the predictor study, on the hand-made run of ``test_summary._summary``."""

import dataclasses

import numpy as np
from test_summary import _summary

from reduce_jax.stages import policies


def test_every_chip_record_has_its_results_in_epochs_and_on_both_splits():
    s = _summary().to_json()
    chips = s["chips"]
    assert [c["chip"] for c in chips] == [0, 1, 2]
    assert [c["pe_fault_rate"] for c in chips] == [0.0, 0.1, 0.5]
    assert [c["topup_steps"] for c in chips] == [0, 5, 0]
    assert [c["topup_epochs"] for c in chips] == [0.0, 0.5, 0.0]  # 10 steps an epoch
    assert [c["accuracy_before"] for c in chips] == [0.9, 0.8, 0.3]
    assert [c["accuracy_after"] for c in chips] == [0.9, 0.92, 0.3]
    assert [c["test_accuracy_after"] for c in chips] == [0.89, 0.91, 0.31]
    assert [c["meets_target"] for c in chips] == [True, True, False]
    assert [c["grouped_meets_target"] for c in chips] == [True, True, False]


def test_group_records_have_their_members_steps_and_outcome():
    (group,) = _summary().to_json()["groups"]
    assert group["group"] == 0 and group["members"] == [0, 1]
    assert group["diverged"] is False and group["meets_target"] is True
    assert group["split"] is False and group["split_from"] is None


def test_the_baseline_the_analysis_and_the_predictor_study_in_the_json():
    s = _summary().to_json()
    assert s["baseline"]["steps"] == 100 and s["baseline"]["steps_per_epoch"] == 10
    assert s["baseline"]["accuracy_at_training"] == 0.9
    res = s["resilience"]
    assert np.asarray(res["accuracy"]).shape == (2, 2, 2) and res["accuracy"][0][0] == [0.9, 0.9]
    assert res["diverged"] == [[False, False], [False, False]]
    assert res["retrain_steps"] == [0, 10]
    study = s["predictor_study"]
    assert study["accuracy"] == [[0.9, 0.9], [0.9, 0.9]]
    assert study["diverged"] == [False, False]
    assert study["epochs"] == 2.0  # 2 chips to 1 epoch


def test_the_headline_says_never_where_reduce_costs_more_a_chip():
    found = dict(
        reduce=policies.Policy(3, 60, 3, 2, 2),  # 2 epochs a chip
        adaptive=policies.Policy(3, 6, 3, 3, 3),  # 0.2 a chip
    )
    compute = policies.Compute(step_flops=1.0, eval_flops=float("nan"), steps_per_epoch=10)
    s = _summary()
    s = dataclasses.replace(s, policies=policies.compare(found, s.analysis, compute))
    line = s.headline()
    assert "Reduce never breaks even with it" in line
    assert s.policies.recommended == "adaptive"
    assert "recommended for 3 chips: adaptive (cheapest); cheapest without Reduce" in line
    assert s.to_json()["policies"]["recommended"] == "adaptive"


def test_a_run_without_a_recommendation_does_not_recommend():
    s = _summary()
    empty = policies.compare({}, s.analysis, s.policies.compute)
    assert empty.recommended is None
    line = dataclasses.replace(s, policies=empty).headline()
    assert "recommended" not in line and "no other policy run" in line


def test_the_headline_says_never_for_another_alternative_too():
    found = dict(
        reduce=policies.Policy(3, 60, 3, 2, 2),
        fixed=policies.Policy(3, 30, 3, 3, 3),  # 1 epoch a chip: less than Reduce's 2
        adaptive=policies.Policy(3, 6, 3, 3, 3),
    )
    compute = policies.Compute(step_flops=1.0, eval_flops=float("nan"), steps_per_epoch=10)
    s = _summary()
    line = dataclasses.replace(s, policies=policies.compare(found, s.analysis, compute)).headline()
    assert "Reduce never breaks even with it (with fixed: never)" in line
