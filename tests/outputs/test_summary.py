"""``Summary.to_json``: the one place where results become plain JSON (inf/NaN -> null)."""

import dataclasses
import json

import numpy as np
import pytest

from reduce_jax import files
from reduce_jax.config import ReduceConfig
from reduce_jax.outputs.summary import Baseline, Summary, _plain
from reduce_jax.stages import (
    calibration,
    cost,
    grouping,
    policies,
    predictor,
    resilience,
    retraining,
)

SPE = 10


def test_plain_converts_numpy_and_non_finite_values():
    obj = dict(
        a=np.array([1.5, np.inf, -np.inf, np.nan]),
        b=(np.int64(3), np.float32(0.5), np.bool_(True)),
        c=[dict(d=float("nan"), e=np.array([[1, 2]]))],
        s="x",
        n=None,
    )
    out = _plain(obj)
    assert out == dict(
        a=[1.5, None, None, None], b=[3, 0.5, True], c=[dict(d=None, e=[[1, 2]])], s="x", n=None
    )
    assert type(out["b"][0]) is int and type(out["b"][2]) is bool
    json.dumps(out, allow_nan=False)


def _summary() -> Summary:
    """A hand-made run of 3 chips: chip 2 above the grid, grouped chips 0 and 1."""
    cfg = ReduceConfig(
        fault_rates=(0.0, 0.2), retrain_epochs=(0.0, 1.0), maps_per_rate=2, grouping="greedy"
    )
    analysis = resilience.Analysis(
        accuracy=np.full((2, 2, 2), 0.9),
        diverged=np.zeros((2, 2), bool),
        amount_epochs=np.array([0.0, 1.0]),
        amount_steps=np.array([0, 10]),
    )
    rmap = resilience.ResilienceMap(
        weights=dict(pe=np.full((4, 4), 1 / 16)),
        grid_rates=dict(pe=np.array([0.0, 0.2])),
        rate_measure="pe",
        required_epochs=np.array([0.0, np.inf]),
        required_steps=np.array([0.0, np.inf]),
        statistic_accuracy=np.full((2, 2), 0.9),
        amount_epochs=np.array([0.0, 1.0]),
        amount_steps=np.array([0, 10]),
    )
    status = np.array([resilience.OK, resilience.OK, resilience.ABOVE_GRID])
    assignment = resilience.Assignment(
        rates=dict(pe=np.array([0.0, 0.1, 0.5])), steps=np.array([0.0, 10.0, np.inf]), status=status
    )
    per_chip = retraining.ChipOutcome(
        members=np.arange(3)[:, None],
        steps=np.array([0, 10, 0]),
        retrained=np.array([True, True, False]),
        accuracy_before=np.array([0.9, 0.8, 0.3]),
        accuracy_after=np.array([0.9, 0.92, 0.3]),
        test_accuracy_after=np.array([0.89, 0.91, 0.31]),
        topup_steps=np.array([0, 5, 0]),
        diverged=np.zeros(3, bool),
        member_accuracy=np.array([[0.9], [0.92], [0.3]]),
        meets_target=np.array([True, True, False]),
    )
    table = (
        per_chip.take(np.array([0]))
        .widen(2)
        ._replace(
            members=np.array([[0, 1]]),
            member_accuracy=np.array([[0.91, 0.93]]),
            steps=np.array([10]),
        )
    )
    grouped = grouping.GroupedOutcome(
        retrainings=table,
        fused_pe_rate=np.array([0.1]),
        fused_rate=np.array([0.1]),
        split=np.array([False]),
        split_from=np.array([-1]),
        served_by=np.array([0, 0, -1]),
        accuracy_after=np.array([0.91, 0.93, 0.3]),
        diverged=np.zeros(3, bool),
    )
    chips = cost.chip_results(assignment, per_chip, 0.88, grouped)
    study = predictor.PredictorStudy(
        requested_rates=np.array([0.0, 0.2]),
        analysis=resilience.Analysis(
            np.full((2, 2, 1), 0.9), np.zeros((2, 1), bool), np.array([0.0, 1.0]), np.array([0, 10])
        ),
        needed_steps=np.array([0.0, np.inf]),
        scores=dict(measures={}, best_measure=None),
    )
    return Summary(
        config=cfg,
        overwrite=False,
        baseline=Baseline(
            accuracy=0.9,
            test_accuracy=0.89,
            steps=100,
            accuracy_at_training=0.9,
            reused=False,
            source="trained",
        ),
        test_target=0.88,
        decision_target=0.88,
        steps_per_epoch=SPE,
        analysis=analysis,
        rmap=rmap,
        assignment=assignment,
        chips=chips,
        grouped=grouped,
        cost=cost.summarize(chips, 1.0, 4.0, SPE, grouped),
        predictor=study,
        policies=policies.compare(
            dict(
                adaptive=policies.Policy(3, 40, 6, 3, 2),
                reduce=policies.Policy(3, 15, 3, 2, 2),
            ),
            analysis,
            policies.Compute(step_flops=2.0, eval_flops=float("nan"), steps_per_epoch=SPE),
        ),
        calibration=calibration.Choice(
            "mean", "linear", [dict(statistic="mean", total_epochs=1.5, missed=0)], 2
        ),
        mapping=[dict(name="k", shape=(2, 3), matrix=(2, 3), tiles=1, utilisation=0.5)],
        inputs=dict(model="mlp", dataset="digits", image_shape=[8, 8, 1], num_classes=10),
        timing=dict(wall_s=1.0),
    )


def test_to_json_writes_null_for_unrecoverable_and_missing_values(tmp_path):
    s = _summary().to_json()
    files.write_json_atomic(str(tmp_path / "s.json"), s)  # refuses NaN and inf
    assert s["resilience_map"]["required_epochs"] == [0.0, None]
    assert s["resilience_map"]["required_steps"] == [0, None]
    chips = s["chips"]
    assert [c["selected_steps"] for c in chips] == [0, 10, None]
    assert [c["selected_epochs"] for c in chips] == [0.0, 1.0, None]
    assert [c["status"] for c in chips] == ["ok", "ok", "above_grid"]
    assert [c["group"] for c in chips] == [0, 0, None]
    assert [c["grouped_accuracy_after"] for c in chips] == [0.91, 0.93, None]
    assert s["groups"][0]["members"] == [0, 1] and s["groups"][0]["split_from"] is None
    assert s["groups"][0]["member_accuracy"] == [0.91, 0.93]
    assert s["predictor_study"]["needed_epochs"] == [0.0, None]
    assert s["mapping"][0]["shape"] == [2, 3]
    assert s["cost"]["chips_unrecoverable"] == 1 and s["cost"]["groups"] == 1
    assert [c["meets_target_test"] for c in chips] == [True, True, False]
    # An evaluation pass without a flop count (NaN) leaves the compute unknown: null.
    assert s["policies"]["reduce"]["train_epochs"] == 1.5
    assert s["policies"]["reduce"]["compute_epochs"] is None
    assert s["policies"]["eval_pass_flops"] is None
    assert s["policies"]["break_even_vs_adaptive"] == 5  # in training epochs: no eval flops
    assert s["policies"]["unit"] == "train_epochs"
    assert "break_even_chips" not in s["cost"]
    assert s["resilience_map"]["calibration"]["statistic"] == "mean"
    assert s["baseline_test_accuracy"] == 0.89
    assert list(s) == [
        "baseline_accuracy",
        "baseline_test_accuracy",
        "target_accuracy",
        "validation_target_accuracy",
        "baseline",
        "resilience",
        "resilience_map",
        "chips",
        "groups",
        "cost",
        "policies",
        "predictor_study",
        "config",
        "timing",
        "mapping",
        "inputs",
        "warnings",
    ]
    assert s["baseline"]["source"] == "trained"


def test_headline_names_the_cheapest_policy_its_break_even_and_both_splits():
    line = _summary().headline()
    assert "\n" not in line
    # No flop count for evaluation here: every figure is in training epochs, and says so.
    assert "3 chips in training epochs (no flop count for evaluation)" in line
    assert "Reduce 1.50 + analysis 4.00, adaptive 4.00" in line
    # Per chip adaptive 4/3, Reduce 1.5/3: 0.83 saved a chip pays for 4 epochs at 5 chips.
    assert "cheapest without Reduce: adaptive; Reduce breaks even with it at 5 chips" in line
    assert "chips meeting the target (validation/test): Reduce 2/2 of 3, adaptive 3/2 of 3" in line
    assert line.endswith("1 not served (above the grid or unrecoverable)")


def _with_policies(summary: Summary, found: dict, eval_flops: float = 5.0) -> Summary:
    compute = policies.Compute(step_flops=1.0, eval_flops=eval_flops, steps_per_epoch=SPE)
    comparison = policies.compare(found, summary.analysis, compute)
    return dataclasses.replace(summary, policies=comparison)


def test_headline_says_never_and_the_fixed_sample_in_compute_epochs():
    """Adaptive cheaper per chip than Reduce: Reduce never breaks even with it; the fixed
    policy's counts are of its sample; the unit is compute epochs, evaluation included."""
    s = _with_policies(
        _summary(),
        dict(
            reduce=policies.Policy(3, 15, 3, 2, 2),
            fixed=policies.Policy(3, 30, 3, 1, 1, sampled_chips=2),
            adaptive=policies.Policy(3, 6, 5, 3, 3),
        ),
    )
    line = s.headline()
    # An evaluation is 5 steps' flops: Reduce (15 + 15) / 10, adaptive (6 + 25) / 10.
    assert "3 chips in compute epochs (training + evaluation): Reduce 3.00 + analysis" in line
    assert "adaptive 3.10" in line and "fixed 4.50" in line
    assert "cheapest without Reduce: adaptive; Reduce breaks even with it at " in line
    cheaper = _with_policies(
        _summary(),
        dict(
            reduce=policies.Policy(3, 15, 3, 2, 2),
            fixed=policies.Policy(3, 30, 3, 1, 1, sampled_chips=2),
            adaptive=policies.Policy(3, 6, 3, 3, 3),
        ),
    )
    line = cheaper.headline()
    assert (
        "cheapest without Reduce: adaptive; Reduce never breaks even with it (with fixed: at"
        in line
    )
    assert "fixed 1/1 of 2 sampled" in line
    pol = cheaper.to_json()["policies"]
    assert pol["unit"] == "compute_epochs" and pol["cheapest_alternative"] == "adaptive"
    assert pol["break_even_vs_cheapest"] is None and pol["break_even_vs_adaptive"] is None
    # The analysis, 2 rates x 2 maps to 10 steps with 2 evaluations each, costs
    # (4 * 10 + 8 * 5) / 10 = 8 compute epochs; fixed costs 4.50 / 3 = 1.5 a chip, Reduce
    # 3.00 / 3 = 1.0: 8 / 0.5 = 16 chips.
    assert pol["break_even_vs_fixed"] == 16 == cost.break_even_chips(8.0, 1.5 - 1.0)
    assert "(with fixed: at 16 chips)" in line
    assert pol["fixed"]["chips"] == 3 and pol["fixed"]["chips_measured"] == 2
    assert pol["fixed"]["sampled"] and not pol["adaptive"]["sampled"]
    # The fixed policy's cost counts every chip, not its sample.
    assert pol["fixed"]["train_steps"] == 30 and pol["fixed"]["eval_passes"] == 3


def test_headline_without_other_policies_says_so():
    s = _with_policies(_summary(), dict(reduce=policies.Policy(3, 15, 3, 2, 2)))
    assert "no other policy run (--compare_policies=false)" in s.headline()
    assert s.to_json()["policies"]["cheapest_alternative"] is None


def test_the_recommendation_rounds_audit_and_regions_reach_the_headline_and_the_json():
    """Online cheapest for 3 chips, analysis included (Reduce 3.00 + 8 analysis): the
    headline recommends it; rounds, the early-stop audit and the regions table are in
    ``summary.json``, the regions from the same per-chip counts."""
    found = dict(
        reduce=policies.Policy(3, 15, 3, 2, 2, rounds_mean=1.0, rounds_max=1),
        adaptive=policies.Policy(3, 6, 5, 3, 3, rounds_mean=5 / 3, rounds_max=3),
        online=policies.Policy(3, 6, 2.5, 3, 3, rounds_mean=4 / 3, rounds_max=2),
    )
    compute = policies.Compute(step_flops=1.0, eval_flops=5.0, steps_per_epoch=SPE)
    comparison = policies.compare(found, _summary().analysis, compute, {"online": (4, 1)})
    s = dataclasses.replace(_summary(), policies=comparison)
    assert "recommended for 3 chips: online (cheapest)" in s.headline()
    pol = s.to_json()["policies"]
    assert pol["recommended"] == "online" and pol["cheapest_alternative"] == "online"
    assert pol["online"]["eval_passes"] == 2.5 and pol["online"]["rounds_max"] == 2
    assert pol["adaptive"]["rounds_mean"] == pytest.approx(5 / 3)
    assert pol["early_stop_audit"] == {
        "online": {"verifications": 4, "false_rejects": 1, "same_decision": 0.75}
    }
    w = pol["where_each_wins"]
    regions = policies.where_each_wins(comparison)
    assert w["cheapest"] == regions.cheapest and len(w["cheapest"]) == len(w["eval_pass_epochs"])
    assert all(len(row) == len(w["chips"]) for row in w["cheapest"])
    assert w["measured_eval_pass_epochs"] == pytest.approx(5.0 / SPE)
