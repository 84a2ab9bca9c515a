"""``--arithmetic=int8``: the whole study on the int8 array (the baseline quantized after
training, retraining quantization-aware), against the same study in float32; and
``--mitigation=fault-aware``: the same int8 study with stuck bits in the faulty PEs instead
of bypass, and its chips served again from its map."""

import csv
import dataclasses
import os

import jax
import numpy as np
import pytest

import reduce_jax
from reduce_jax import config, pipeline
from reduce_jax.hardware import faults
from reduce_jax.outputs import chip_store

FAULT_AWARE = dict(arithmetic="int8", mitigation="fault-aware", stuck_site_probs=(0.5, 0.5, 0.0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_run_config):
    """The same small study in float32, in int8, and in int8 fault-aware (no policies, no
    predictor study; the fault-aware chips from a file, their weights saved)."""
    rates = np.r_[np.full(3, 0.03), np.full(3, 0.2)]
    maps = faults.FaultSpec("bernoulli", 8, 8).sample(jax.random.key(3), rates)
    path = str(tmp_path_factory.mktemp("maps") / "chips.npz")
    faults.save_fault_maps(path, maps)
    base = small_run_config(
        str(tmp_path_factory.mktemp("f32")), compare_policies=False, predictor_chips=0
    )
    out = {"float32": pipeline.run(base)}
    int8 = dataclasses.replace(base, workdir=str(tmp_path_factory.mktemp("i8")), arithmetic="int8")
    out["int8"] = pipeline.run(int8)
    aware = dataclasses.replace(
        base,
        workdir=str(tmp_path_factory.mktemp("aware")),
        chip_fault_maps=path,
        save_chip_weights=True,
        **FAULT_AWARE,
    )
    out["fault-aware"] = pipeline.run(aware)
    out["maps"] = path
    return out


def test_the_int8_study_quantizes_the_same_baseline_and_runs_on_the_int8_array(runs):
    f32, i8 = runs["float32"], runs["int8"]
    # The same float baseline (trained alike), read in int8: within a point on the digits.
    assert i8.baseline.steps == f32.baseline.steps
    assert abs(i8.baseline.accuracy - f32.baseline.accuracy) <= 0.01
    assert abs(i8.baseline.test_accuracy - f32.baseline.test_accuracy) <= 0.01
    # Every analysis chip computed on the int8 array: some accuracy differs from float32.
    assert not np.array_equal(i8.analysis.accuracy, f32.analysis.accuracy)
    np.testing.assert_allclose(i8.analysis.accuracy, f32.analysis.accuracy, atol=0.1)
    assert i8.config.arithmetic == "int8" and i8.to_json()["config"]["arithmetic"] == "int8"
    # Retrained chips meet the target as in float32 (decided on the int8 chips).
    ok = i8.chips.status == "ok"
    assert np.all(i8.chips.accuracy_after[ok] >= i8.decision_target)


def test_the_fault_aware_study_keeps_its_stuck_bits_in_the_forward_pass(runs):
    i8, aware = runs["int8"], runs["fault-aware"]
    # A fault-free chip is the same int8 chip under either mitigation: the same baseline.
    assert aware.baseline.accuracy == i8.baseline.accuracy
    assert aware.baseline.test_accuracy == i8.baseline.test_accuracy
    # The analysis chips have the same PE maps; at rate 0 they are the same chips, at the
    # other rates stuck bits act where bypass zeroed weights: other accuracies.
    a, b = aware.analysis.accuracy, i8.analysis.accuracy  # [F, K, A]
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1:], b[1:])
    assert aware.to_json()["config"]["mitigation"] == "fault-aware"


def test_a_fault_aware_chip_is_stored_with_nothing_bypassed(runs):
    aware = runs["fault-aware"]
    workdir = aware.config.workdir
    with np.load(os.path.join(workdir, chip_store.STORE_DIR, chip_store.BASELINE_FILE)) as z:
        params = chip_store.unflatten({k: z[k] for k in z.files})["params"]
    steps = np.maximum(aware.chips.selected_steps, 0) + aware.chips.topup_steps
    maps = faults.load_fault_maps(runs["maps"], 8, 8)
    assert np.any((steps == 0) & maps.any(axis=(1, 2))) and np.any(steps > 0)
    for chip in range(len(steps)):
        got = jax.tree.leaves(reduce_jax.load_chip(workdir, chip)["params"])
        same = [np.array_equal(g, p) for g, p in zip(got, jax.tree.leaves(params), strict=True)]
        if steps[chip] == 0:  # a faulty chip given 0 epochs: the baseline, no weight zeroed
            assert all(same), chip
        else:  # retrained around its stuck bits: its weights moved
            assert not all(same), chip


def test_a_fault_aware_studys_chips_served_from_its_map_are_the_studys(runs, tmp_path):
    aware = runs["fault-aware"]
    study = aware.config.workdir
    out = str(tmp_path / "served")
    reduce_jax.retrain_chips(os.path.join(study, "map"), runs["maps"], workdir=out)
    # The same maps give the same stuck bits, so the same outcome, chip by chip.
    cols = ("chip", "status", "selected_steps", "topup_steps", "accuracy_after")
    with open(os.path.join(out, "chips.csv")) as f:
        mine = [{k: r[k] for k in cols} for r in csv.DictReader(f)]
    with open(os.path.join(study, "chips.csv")) as f:
        theirs = [{k: r[k] for k in cols} for r in csv.DictReader(f)]
    assert mine == theirs
    # The int8 bypass study has the same baseline (the same fingerprint) but other hardware:
    # its chips never join this workdir.
    bypass_map = os.path.join(runs["int8"].config.workdir, "map")
    with pytest.raises(config.ConfigError, match="or its chips' hardware"):
        reduce_jax.retrain_chips(bypass_map, runs["maps"], workdir=out, first_chip_id=100)


def test_arithmetic_is_validated():
    with pytest.raises(config.ConfigError, match="--arithmetic='int4'; allowed: float32, int8"):
        config.validate(config.ReduceConfig(dataset="digits", arithmetic="int4"))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(mitigation="fault-aware"), "--mitigation=fault-aware needs --arithmetic=int8"),
        (dict(FAULT_AWARE, grouping="greedy"), "--grouping=greedy fuses chips' maps"),
        (dict(mitigation="stuck"), "--mitigation='stuck'; allowed: bypass, fault-aware"),
        (dict(stuck_site_probs=(0.5, 0.5)), "--stuck_site_probs=0.5,0.5 must be 3 prob"),
        (dict(stuck_site_probs=(0.5, 0.6, 0.0)), "--stuck_site_probs=0.5,0.6,0 must sum to 1"),
        (dict(stuck_p_one=1.5), r"--stuck_p_one=1.5 is outside \[0, 1\]"),
        (dict(stuck_bits="low"), "--stuck_bits='low'; allowed: uniform, high, msb"),
    ],
)
def test_mitigation_and_stuck_bits_are_validated(changes, message):
    with pytest.raises(config.ConfigError, match=message):
        config.validate(config.ReduceConfig(dataset="digits", **changes), dataset_files=False)
