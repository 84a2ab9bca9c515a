"""The map bundle: saved and loaded back whole, versioned, fingerprinted, updatable."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from reduce_jax import config, data
from reduce_jax.engine import train
from reduce_jax.errors import ConfigError
from reduce_jax.nets import models
from reduce_jax.outputs import map_bundle
from reduce_jax.stages import resilience, retraining


@pytest.fixture(scope="module")
def split_digits(digits):
    return data.split_validation(digits, 0.1)


def _abstract(net, ds):
    return jax.eval_shape(lambda: models.init_variables(net, jax.random.key(0), ds.image_shape))


@pytest.fixture
def bundle(tiny_mlp, tiny_mlp_variables, split_digits):
    rng = np.random.default_rng(0)
    rmap = resilience.ResilienceMap(
        weights={"pe": np.full((8, 8), 1 / 64), "effective": rng.random((8, 8))},
        grid_rates={"pe": np.array([0.0, 0.1, 0.3]), "effective": np.array([0.0, 0.12, 0.31])},
        rate_measure="pe",
        required_epochs=np.array([0.0, 0.5, np.inf]),
        required_steps=np.array([0.0, 11.0, np.inf]),
        statistic_accuracy=rng.random((3, 4)),
        amount_epochs=np.array([0.0, 0.25, 0.5, 1.0]),
        amount_steps=np.array([0, 6, 11, 21]),
        statistic="quantile:0.25",
        interpolation="linear",
    )
    cfg = config.ReduceConfig(
        dataset="digits", model="mlp", array_rows=8, array_cols=8, fault_rates=(0, 0.1, 0.3),
        retrain_epochs=(0, 0.5, 1), maps_per_rate=4, topup_epochs=0.25, max_topup_epochs=1.0,
        batch_size=64, seed=7,
    )  # fmt: skip
    spe = 21
    policy = retraining.Verification(
        decision_target=0.9, test_target=0.88,
        topup_steps=int(train.epochs_to_steps(cfg.topup_epochs, spe)),
        max_topup_steps=int(train.epochs_to_steps(cfg.max_topup_epochs, spe)),
    )  # fmt: skip
    return map_bundle.of_study(
        cfg, rmap, tiny_mlp_variables, _abstract(tiny_mlp, split_digits), split_digits,
        policy=policy, steps_per_epoch=spe, fixed_epochs=1.0, analysis_epochs=3 * 4 * 1.0,
        augment=False, validation_split="held_out", model_id="mlp", dataset_id="digits",
    )  # fmt: skip


def _equal(a: map_bundle.MapBundle, b: map_bundle.MapBundle) -> None:
    chex_equal = lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # noqa: E731
    jax.tree.map(chex_equal, a.variables, b.variables)
    jax.tree.map(chex_equal, tuple(a.rmap), tuple(b.rmap))
    jax.tree.map(chex_equal, tuple(a.observations), tuple(b.observations))
    for field in map_bundle.MapBundle._fields:
        if field not in ("variables", "rmap", "observations"):
            assert getattr(a, field) == getattr(b, field), field


def test_saved_and_loaded_back_whole(bundle, tmp_path):
    map_bundle.save_map(str(tmp_path / "map"), bundle)
    loaded = map_bundle.load_map(str(tmp_path / "map"))
    _equal(loaded, bundle)
    assert loaded.recipe.topup_steps == 6 and loaded.recipe.max_topup_steps == 21
    assert loaded.recipe.seed == 7 and loaded.split == map_bundle.Split("held_out", 0.1, 1293, 144)
    assert loaded.fixed_epochs == 1.0 and loaded.analysis_epochs == 3 * 4 * 1.0
    # A study's workdir finds its map/.
    _equal(map_bundle.load_map(str(tmp_path)), bundle)


def test_fingerprint_of_structure_weights_data_and_split(bundle, tiny_mlp, tiny_mlp_variables):
    fp = bundle.fingerprint
    assert [p for p, _, _ in fp.structure] == [
        "params/fc1/bias", "params/fc1/kernel", "params/out/bias", "params/out/kernel",
    ]  # fmt: skip
    assert fp.structure[1] == ("params/fc1/kernel", (64, 16), "float32")
    assert len({fp.model, fp.weights, fp.data, fp.split}) == 4
    assert fp.weights == map_bundle.arrays_sha256(jax.tree.leaves(tiny_mlp_variables))


def test_a_mismatch_is_refused_naming_the_part(bundle, tiny_mlp, tiny_mlp_variables, digits):
    def check(net, variables, ds, match):
        found = map_bundle.fingerprint(_abstract(net, ds), variables, ds)
        where = dict(model="MODEL", weights="WEIGHTS", data="DATA", split="SPLIT")
        with pytest.raises(ConfigError, match=match):
            map_bundle.check_fingerprint(bundle, found, where)

    split = data.split_validation(digits, 0.1)
    wider = models.MLP(num_classes=10, hidden=(20,))
    check(wider, tiny_mlp_variables, split, r"MODEL is not the map's model \(mlp\): variable "
          r"params/fc1/bias is \[16\] float32 in the map but \[20\] float32")  # fmt: skip
    other = jax.tree.map(lambda x: x * 2, tiny_mlp_variables)
    check(tiny_mlp, other, split, "WEIGHTS: the baseline weights differ")
    check(tiny_mlp, tiny_mlp_variables, data.split_validation(digits, 0.2), "SPLIT")
    flipped = data.Dataset.from_arrays(
        split.train_images, split.train_labels, split.test_images[::-1], split.test_labels[::-1],
        x_val=split.val_images, y_val=split.val_labels, name="digits",
    )  # fmt: skip
    check(tiny_mlp, tiny_mlp_variables, flipped, "DATA: the training and test data differ")
    same = map_bundle.fingerprint(_abstract(tiny_mlp, split), tiny_mlp_variables, split)
    map_bundle.check_fingerprint(bundle, same, {})  # the study's own: accepted


def test_no_bundle_an_unfinished_one_and_a_newer_version_are_refused(bundle, tmp_path):
    with pytest.raises(ConfigError, match="no map bundle"):
        map_bundle.load_map(str(tmp_path))  # an old workdir without map/
    path = str(tmp_path / "map")
    map_bundle.save_map(path, bundle)
    meta = os.path.join(path, "bundle.json")
    with open(meta) as f:
        saved = json.load(f)
    with open(meta, "w") as f:
        json.dump(dict(saved, version=map_bundle.VERSION + 1), f)
    with pytest.raises(ConfigError, match=f"version {map_bundle.VERSION + 1}; this reduce_jax"):
        map_bundle.load_map(path)
    fp = dict(saved["fingerprint"], weights="0" * 64)
    with open(meta, "w") as f:
        json.dump(dict(saved, fingerprint=fp), f)
    with pytest.raises(ConfigError, match="do not match the bundle's checksum"):
        map_bundle.load_map(path)
    os.remove(meta)  # what a kill during save_map leaves
    with pytest.raises(ConfigError, match="no map bundle"):
        map_bundle.load_map(path)


def test_a_missing_or_damaged_part_is_refused_naming_the_bundle(bundle, tmp_path):
    path = str(tmp_path / "map")
    where = re.escape(path)
    map_bundle.save_map(path, bundle)
    arrays = os.path.join(path, "map.npz")
    with np.load(arrays) as npz:
        saved = {k: npz[k] for k in npz.files}
    np.savez(arrays, **{k: v for k, v in saved.items() if k != "observed_rates"})
    with pytest.raises(
        ConfigError, match=rf"^{where}: a damaged map bundle \(KeyError: .*observed_rates"
    ):
        map_bundle.load_map(path)
    np.savez(arrays, **{k: v for k, v in saved.items() if k != "required_steps"})
    with pytest.raises(
        ConfigError, match=rf"^{where}: a damaged map bundle \(KeyError: .*required_steps"
    ):
        map_bundle.load_map(path)
    os.remove(arrays)
    with pytest.raises(
        ConfigError, match=rf"^{where}: a damaged map bundle \(FileNotFoundError: .*map\.npz"
    ):
        map_bundle.load_map(path)
    map_bundle.save_map(path, bundle)
    meta = os.path.join(path, "bundle.json")
    with open(meta) as f:
        fields = json.load(f)
    with open(meta, "w") as f:
        json.dump({k: v for k, v in fields.items() if k != "fixed_epochs"}, f)
    with pytest.raises(
        ConfigError, match=rf"^{where}: a damaged map bundle \(KeyError: 'fixed_epochs'"
    ):
        map_bundle.load_map(path)


def test_the_map_is_a_value_updated_and_saved_again(bundle, tmp_path):
    more = bundle.observe([0.05, 0.2], [4.0, np.inf]).observe([0.1], [11.0])
    assert len(bundle.observations.rates) == 0  # the original is unchanged
    np.testing.assert_array_equal(more.observations.rates, [0.05, 0.2, 0.1])
    refined = more.with_map(more.rmap._replace(required_steps=np.array([0.0, 8.0, 30.0])))
    path = str(tmp_path / "map")
    map_bundle.save_map(path, bundle)
    map_bundle.save_map(path, refined)  # replaces the bundle in place
    loaded = map_bundle.load_map(path)
    _equal(loaded, refined)
    np.testing.assert_array_equal(loaded.observations.needed_steps, [4.0, np.inf, 11.0])
    with pytest.raises(ValueError, match="rate measure and grid"):
        bundle.with_map(bundle.rmap._replace(rate_measure="effective"))
