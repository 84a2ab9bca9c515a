"""``--arithmetic=int8``: the whole study on the int8 array (the baseline quantized after
training, retraining quantization-aware), against the same study in float32."""

import dataclasses

import numpy as np
import pytest

from reduce_jax import config, pipeline


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_run_config):
    """The same small study in float32 and in int8 (no policies, no predictor study)."""
    base = small_run_config(
        str(tmp_path_factory.mktemp("f32")), compare_policies=False, predictor_chips=0
    )
    out = {"float32": pipeline.run(base)}
    int8 = dataclasses.replace(base, workdir=str(tmp_path_factory.mktemp("i8")), arithmetic="int8")
    out["int8"] = pipeline.run(int8)
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


def test_arithmetic_is_validated():
    with pytest.raises(config.ConfigError, match="--arithmetic='int4'; allowed: float32, int8"):
        config.validate(config.ReduceConfig(dataset="digits", arithmetic="int4"))
