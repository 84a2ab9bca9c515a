"""A study repeated over seeds: every headline number with its mean and spread."""

import json
import logging
import os

import numpy as np
import pytest

from reduce_jax import seeds


def _summary(reduce_epochs, meets, ratio):
    return {
        "baseline_accuracy": 0.9,
        "cost": {"reduce_epochs": reduce_epochs, "chips_meeting_target": meets},
        "policies": {
            "reduce": {"compute_epochs": reduce_epochs + 1, "chips_meeting_target": meets},
            "adaptive": {"compute_epochs": 3.0, "chips_meeting_target": 8},
            "analysis": {"compute_epochs": 10.0},
            "break_even_vs_adaptive": None,
        },
        "predictor_study": None if ratio is None else {"reduce_over_oracle": ratio},
    }


def test_aggregate_gives_values_mean_and_sample_std_and_skips_missing_values():
    out = seeds.aggregate([_summary(2.0, 7, 1.2), _summary(4.0, 8, None), _summary(3.0, 6, 1.4)])
    m = out["cost.reduce_epochs"]
    assert m["values"] == [2.0, 4.0, 3.0] and m["mean"] == 3.0
    assert m["std"] == pytest.approx(np.std([2.0, 4.0, 3.0], ddof=1))
    assert out["policies.reduce.compute_epochs"]["mean"] == 4.0
    assert out["policies.adaptive.chips_meeting_target"]["std"] == 0.0
    assert "policies.analysis.chips_meeting_target" not in out  # a cost, not a policy
    assert out["policies.analysis.compute_epochs"]["mean"] == 10.0
    ratio = out["predictor_study.reduce_over_oracle"]
    assert ratio["values"] == [1.2, None, 1.4] and ratio["mean"] == pytest.approx(1.3)
    assert out["policies.break_even_vs_adaptive"] == dict(values=[None] * 3, mean=None, std=None)
    assert "cost.reduce_epochs" in seeds.table(out)


@pytest.mark.slow
def test_run_seeds_runs_each_seed_in_its_own_workdir(tmp_path, small_run_config):
    cfg = small_run_config(str(tmp_path), compare_policies=False, baseline_epochs=2.0)
    out = seeds.run_seeds(cfg, 2)
    assert out["seeds"] == [0, 1]
    for w in out["workdirs"]:
        assert os.path.isfile(os.path.join(w, "summary.json"))
    with open(tmp_path / "seeds.json") as f:
        assert json.load(f) == out
    runs = [json.load(open(os.path.join(w, "summary.json"))) for w in out["workdirs"]]
    assert out["metrics"]["cost.reduce_epochs"]["values"] == [
        r["cost"]["reduce_epochs"] for r in runs
    ]
    assert runs[0]["config"]["seed"] == 0 and runs[1]["config"]["seed"] == 1


def test_a_run_stream_depends_on_its_name_and_the_seed_not_on_its_position():
    """``Keys.from_seed`` folds each field's name into the seed's key: a stream added in front
    of the others, or fields reordered, leave every other stream as it was."""
    from typing import NamedTuple

    import jax

    from reduce_jax import pipeline

    class Reordered(NamedTuple):
        added: jax.Array
        policies: jax.Array
        baseline: jax.Array

    data = lambda k: np.asarray(jax.random.key_data(k))  # noqa: E731
    keys = pipeline.Keys.from_seed(3)
    other = pipeline.Keys.from_seed.__func__(Reordered, 3)
    np.testing.assert_array_equal(data(other.baseline), data(keys.baseline))
    np.testing.assert_array_equal(data(other.policies), data(keys.policies))
    streams = [data(k).tobytes() for k in (*keys, other.added)]
    assert len(set(streams)) == len(streams)  # every stream its own
    expected = jax.random.fold_in(jax.random.key(3), pipeline.stream_id("chips"))
    np.testing.assert_array_equal(data(keys.chips), data(expected))
    assert data(pipeline.Keys.from_seed(4).chips).tobytes() != data(keys.chips).tobytes()


def test_spread_needs_two_values_for_a_std_and_one_for_a_mean():
    assert seeds.spread([]) == dict(values=[], mean=None, std=None)
    assert seeds.spread([None, 2.5]) == dict(values=[None, 2.5], mean=2.5, std=None)
    two = seeds.spread([1.0, 3.0])
    assert two["mean"] == 2.0 and two["std"] == pytest.approx(np.sqrt(2.0))  # ddof=1
    ints = seeds.spread([1, 2])
    assert isinstance(ints["mean"], float) and ints["mean"] == 1.5


def test_every_runs_policies_are_aggregated_even_one_only_the_first_run_has():
    first, second = _summary(2.0, 7, 1.2), _summary(4.0, 8, 1.4)
    first["policies"]["fixed"] = {"compute_epochs": 16.0, "chips_meeting_target": 8}
    out = seeds.aggregate([first, second])
    assert out["policies.fixed.compute_epochs"] == dict(values=[16.0, None], mean=16.0, std=None)
    assert "policies.adaptive.compute_epochs" in out and "policies.reduce.train_epochs" in out


def test_table_prints_mean_std_and_values_and_skips_metrics_without_a_mean():
    metrics = {
        "cost.reduce_epochs": dict(values=[2.0, None, 4.0], mean=3.0, std=1.41421),
        "baseline_accuracy": dict(values=[0.95], mean=0.95, std=None),
        "policies.break_even_vs_fixed": dict(values=[None], mean=None, std=None),
    }
    width = len("policies.break_even_vs_fixed")  # names align on the longest, shown or not
    assert seeds.table(metrics) == (
        f"{'cost.reduce_epochs':<{width}}  3 +- 1.414  (2, -, 4)\n"
        f"{'baseline_accuracy':<{width}}  0.95  (0.95)"
    )


def test_run_seeds_gives_each_seed_its_workdir_and_writes_seeds_json(
    tmp_path, small_run_config, monkeypatch, caplog
):
    from reduce_jax import pipeline

    calls = []

    class Run:
        def __init__(self, cfg):
            self.cfg = cfg

        def to_json(self):
            return {"baseline_accuracy": 0.9 + self.cfg.seed / 100, "cost": {}, "policies": {}}

    def fake_run(cfg, overwrite=False):
        calls.append((cfg.seed, cfg.workdir, overwrite, cfg.num_chips))
        return Run(cfg)

    monkeypatch.setattr(pipeline, "run", fake_run)
    cfg = small_run_config(str(tmp_path), seed=5)
    # The absl logger's own level: an earlier run in the same process may have raised it.
    with caplog.at_level(logging.INFO, logger="absl"):
        out = seeds.run_seeds(cfg, 3, overwrite=True)
    workdirs = [str(tmp_path / f"seed_{s}") for s in (5, 6, 7)]
    assert f"seed 5 (1 of 3) in {workdirs[0]}" in caplog.text
    assert f"seed 7 (3 of 3) in {workdirs[2]}" in caplog.text
    assert calls == [(s, w, True, 8) for s, w in zip((5, 6, 7), workdirs, strict=True)]
    assert out["seeds"] == [5, 6, 7] and out["workdirs"] == workdirs
    assert out["metrics"]["baseline_accuracy"]["values"] == pytest.approx([0.95, 0.96, 0.97])
    with open(tmp_path / "seeds.json") as f:
        assert json.load(f) == out
    calls.clear()
    seeds.run_seeds(cfg, 1)
    assert calls == [(5, workdirs[0], False, 8)]
    with pytest.raises(ValueError, match="--seeds=0 must be >= 1"):
        seeds.run_seeds(cfg, 0)
